/* Contexts: resolve the backend once, remember the thread count and the last error message. */
#include "context.h"

#include <omp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../cpu/cpu_backend.h"
#include "../cuda/cuda_backend.h"

fp4moe_status fp4moe_fail(fp4moe_context *ctx, fp4moe_status status, const char *format, ...)
{
    if (ctx != NULL) {
        va_list args;
        va_start(args, format);
        vsnprintf(ctx->last_error, sizeof ctx->last_error, format, args);
        va_end(args);
    }
    return status;
}

void fp4moe_clear_error(fp4moe_context *ctx)
{
    if (ctx != NULL) ctx->last_error[0] = '\0';
}

int fp4moe_version(void) { return FP4MOE_VERSION; }

const char *fp4moe_status_string(fp4moe_status status)
{
    switch (status) {
    case FP4MOE_SUCCESS: return "success";
    case FP4MOE_ERROR_INVALID_ARGUMENT: return "invalid argument";
    case FP4MOE_ERROR_UNSUPPORTED: return "unsupported by this backend";
    case FP4MOE_ERROR_OUT_OF_MEMORY: return "out of memory";
    case FP4MOE_ERROR_WORKSPACE_TOO_SMALL: return "workspace too small";
    case FP4MOE_ERROR_CORRUPT_DATA: return "corrupt serialised data";
    case FP4MOE_ERROR_VERSION_MISMATCH: return "serialised by an incompatible version";
    case FP4MOE_ERROR_BACKEND_UNAVAILABLE: return "backend unavailable";
    case FP4MOE_ERROR_CUDA: return "CUDA error";
    case FP4MOE_ERROR_INTERNAL: return "internal error";
    }
    return "unknown status";
}

void fp4moe_context_options_init(fp4moe_context_options *options)
{
    if (options == NULL) return;
    memset(options, 0, sizeof *options);
    options->backend = FP4MOE_BACKEND_AUTO;
}

fp4moe_status fp4moe_context_create(const fp4moe_context_options *options, fp4moe_context **out)
{
    if (out == NULL) return FP4MOE_ERROR_INVALID_ARGUMENT;
    *out = NULL;
    fp4moe_context_options defaults;
    fp4moe_context_options_init(&defaults);
    if (options == NULL) options = &defaults;
    if (options->backend != FP4MOE_BACKEND_AUTO && options->backend != FP4MOE_BACKEND_CPU &&
        options->backend != FP4MOE_BACKEND_CUDA)
        return FP4MOE_ERROR_INVALID_ARGUMENT;
    if (options->num_threads < 0 || options->num_threads > 4096 || options->cuda_device < 0)
        return FP4MOE_ERROR_INVALID_ARGUMENT;

    fp4moe_backend backend = options->backend;
    int cuda_ok = cuda_backend_available(options->cuda_device);
    if (backend == FP4MOE_BACKEND_CUDA && !cuda_ok) return FP4MOE_ERROR_BACKEND_UNAVAILABLE;
    if (backend == FP4MOE_BACKEND_AUTO) backend = cuda_ok ? FP4MOE_BACKEND_CUDA : FP4MOE_BACKEND_CPU;

    fp4moe_context *ctx = calloc(1, sizeof *ctx);
    if (ctx == NULL) return FP4MOE_ERROR_OUT_OF_MEMORY;
    ctx->backend = backend;
    ctx->cuda_device = options->cuda_device;
    ctx->num_threads = options->num_threads > 0 ? options->num_threads : omp_get_num_procs();
    if (ctx->num_threads < 1) ctx->num_threads = 1;
    if (backend == FP4MOE_BACKEND_CPU)
        snprintf(ctx->description, sizeof ctx->description, "cpu (%s kernels, %d threads)",
                 cpu_kernel_isa(), ctx->num_threads);
    else
        cuda_backend_describe(ctx->cuda_device, ctx->description, sizeof ctx->description);
    *out = ctx;
    return FP4MOE_SUCCESS;
}

void fp4moe_context_destroy(fp4moe_context *ctx) { free(ctx); }

fp4moe_backend fp4moe_context_backend(const fp4moe_context *ctx)
{
    return ctx != NULL ? ctx->backend : FP4MOE_BACKEND_CPU;
}

const char *fp4moe_context_description(const fp4moe_context *ctx)
{
    return ctx != NULL ? ctx->description : "";
}

const char *fp4moe_last_error(const fp4moe_context *ctx) { return ctx != NULL ? ctx->last_error : ""; }
