/* Built instead of the CUDA sources when no CUDA compiler is found: the backend is simply
 * unavailable, so AUTO resolves to the CPU. */
#include <stdio.h>

#include "cuda_backend.h"

int cuda_backend_available(int device)
{
    (void)device;
    return 0;
}

void cuda_backend_describe(int device, char *out, size_t out_bytes)
{
    snprintf(out, out_bytes, "cuda (not built; device %d)", device);
}

const backend_ops *cuda_backend_get_ops(void) { return NULL; }

int cuda_buffer_alloc(int device, size_t bytes, void **out, char *why, size_t why_bytes)
{
    (void)device, (void)bytes, (void)out;
    snprintf(why, why_bytes, "built without CUDA");
    return 1;
}

void cuda_buffer_free(int device, void *buffer) { (void)device, (void)buffer; }

int cuda_buffer_copy(int device, void *dst, const void *src, size_t bytes, int to_device,
                     char *why, size_t why_bytes)
{
    (void)device, (void)dst, (void)src, (void)bytes, (void)to_device;
    snprintf(why, why_bytes, "built without CUDA");
    return 1;
}

int cuda_stream_synchronize(int device, void *stream, char *why, size_t why_bytes)
{
    (void)device, (void)stream;
    snprintf(why, why_bytes, "built without CUDA");
    return 1;
}

/* Expert parallelism's device path (src/ep/ep_device.h): never taken without CUDA. */
#include "../ep/ep_device.h"

int ep_device_pack(const void *hidden, size_t row_bytes, const int32_t *ids,
                   const int64_t *row_index, int64_t slots, int64_t k, void *send, void *stream)
{
    (void)hidden, (void)row_bytes, (void)ids, (void)row_index, (void)slots, (void)k, (void)send,
        (void)stream;
    return -1;
}

int ep_device_unpack(const void *recv, int64_t rows, size_t rec_bytes, size_t row_bytes,
                     void *rows_hidden, int32_t *rows_ids, void *stream)
{
    (void)recv, (void)rows, (void)rec_bytes, (void)row_bytes, (void)rows_hidden, (void)rows_ids,
        (void)stream;
    return -1;
}

int ep_device_combine(const float *results, const int64_t *result_row, const float *weights,
                      int64_t t, int64_t k, int64_t h, const float *token_scale,
                      int skip_finalize, void *out, int out_dtype, void *stream)
{
    (void)results, (void)result_row, (void)weights, (void)t, (void)k, (void)h, (void)token_scale,
        (void)skip_finalize, (void)out, (void)out_dtype, (void)stream;
    return -1;
}

int ep_device_fill_nan(float *p, int64_t count, void *stream)
{
    (void)p, (void)count, (void)stream;
    return -1;
}

int ep_device_w4a4_reciprocals(const float *g, int64_t experts, float *rcp6, float *out_scale)
{
    (void)g, (void)experts, (void)rcp6, (void)out_scale;
    return -1;
}

const char *ep_device_error_string(int code)
{
    (void)code;
    return "built without CUDA";
}
