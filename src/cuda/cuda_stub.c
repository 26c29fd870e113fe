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
