/* The CUDA backend's entry points, callable from C. When the library is built without CUDA,
 * cuda_stub.c provides versions that report the backend as unavailable. */
#ifndef FP4MOE_CUDA_BACKEND_H
#define FP4MOE_CUDA_BACKEND_H

#include "../core/plan.h"

#ifdef __cplusplus
extern "C" {
#endif

/* 1 when a GPU of compute capability >= 8.0 is usable at this ordinal and the CUDA backend
 * implements forward passes. Never fails loudly: no GPU, no driver -> 0. */
int cuda_backend_available(int device);
/* "cuda (NVIDIA H100 80GB HBM3, sm_90)" */
void cuda_backend_describe(int device, char *out, size_t out_bytes);
/* Device memory helpers behind fp4moe_buffer_* (0 on success, else a message in why). */
int cuda_buffer_alloc(int device, size_t bytes, void **out, char *why, size_t why_bytes);
void cuda_buffer_free(int device, void *buffer);
int cuda_buffer_copy(int device, void *dst, const void *src, size_t bytes, int to_device,
                     char *why, size_t why_bytes);
int cuda_stream_synchronize(int device, void *stream, char *why, size_t why_bytes);

/* The backend's operations (valid only when cuda_backend_available). */
const backend_ops *cuda_backend_get_ops(void);

#ifdef __cplusplus
}
#endif
#endif
