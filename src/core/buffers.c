/* Backend memory helpers: host memory on the CPU backend, device memory on CUDA. */
#include <stdlib.h>
#include <string.h>

#include "../cuda/cuda_backend.h"
#include "context.h"

fp4moe_status fp4moe_buffer_alloc(fp4moe_context *ctx, size_t bytes, void **out)
{
    if (ctx == NULL) return FP4MOE_ERROR_INVALID_ARGUMENT;
    fp4moe_clear_error(ctx);
    if (out == NULL) return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "out is NULL");
    *out = NULL;
    if (ctx->backend == FP4MOE_BACKEND_CUDA) {
        char why[256];
        if (cuda_buffer_alloc(ctx->cuda_device, bytes, out, why, sizeof why))
            return fp4moe_fail(ctx, FP4MOE_ERROR_OUT_OF_MEMORY, "%zu bytes: %s", bytes, why);
        return FP4MOE_SUCCESS;
    }
    size_t rounded = ((bytes ? bytes : 1) + 255) / 256 * 256;
    if (rounded < bytes) return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "bytes overflows");
    *out = aligned_alloc(256, rounded);
    if (*out == NULL)
        return fp4moe_fail(ctx, FP4MOE_ERROR_OUT_OF_MEMORY, "cannot allocate %zu bytes", bytes);
    return FP4MOE_SUCCESS;
}

void fp4moe_buffer_free(fp4moe_context *ctx, void *buffer)
{
    if (ctx == NULL || buffer == NULL) return;
    if (ctx->backend == FP4MOE_BACKEND_CUDA) cuda_buffer_free(ctx->cuda_device, buffer);
    else free(buffer);
}

static fp4moe_status copy(fp4moe_context *ctx, void *dst, const void *src, size_t bytes,
                          int to_device)
{
    if (ctx == NULL) return FP4MOE_ERROR_INVALID_ARGUMENT;
    fp4moe_clear_error(ctx);
    if ((dst == NULL || src == NULL) && bytes > 0)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "NULL buffer");
    if (bytes == 0) return FP4MOE_SUCCESS;
    if (ctx->backend == FP4MOE_BACKEND_CUDA) {
        char why[256];
        if (cuda_buffer_copy(ctx->cuda_device, dst, src, bytes, to_device, why, sizeof why))
            return fp4moe_fail(ctx, FP4MOE_ERROR_CUDA, "%s", why);
        return FP4MOE_SUCCESS;
    }
    memmove(dst, src, bytes);
    return FP4MOE_SUCCESS;
}

fp4moe_status fp4moe_buffer_upload(fp4moe_context *ctx, void *dst, const void *host_src, size_t bytes)
{
    return copy(ctx, dst, host_src, bytes, 1);
}

fp4moe_status fp4moe_buffer_download(fp4moe_context *ctx, void *host_dst, const void *src, size_t bytes)
{
    return copy(ctx, host_dst, src, bytes, 0);
}

fp4moe_status fp4moe_synchronize(fp4moe_context *ctx, void *stream)
{
    if (ctx == NULL) return FP4MOE_ERROR_INVALID_ARGUMENT;
    fp4moe_clear_error(ctx);
    if (ctx->backend != FP4MOE_BACKEND_CUDA) return FP4MOE_SUCCESS;
    char why[256];
    if (cuda_stream_synchronize(ctx->cuda_device, stream, why, sizeof why))
        return fp4moe_fail(ctx, FP4MOE_ERROR_CUDA, "%s", why);
    return FP4MOE_SUCCESS;
}
