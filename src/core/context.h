/* The context: backend choice, thread count, and the per-context error message. */
#ifndef FP4MOE_CORE_CONTEXT_H
#define FP4MOE_CORE_CONTEXT_H

#include "fp4moe.h"

#define FP4MOE_MESSAGE_BYTES 512

struct fp4moe_context {
    fp4moe_backend backend; /* resolved: CPU or CUDA */
    int num_threads;        /* >= 1 */
    int cuda_device;
    char description[160];
    char last_error[FP4MOE_MESSAGE_BYTES];
};

/* Records a formatted message on ctx (ctx may be NULL) and returns status, so that checks read
 *     if (x == NULL) return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "x is NULL");   */
fp4moe_status fp4moe_fail(fp4moe_context *ctx, fp4moe_status status, const char *format, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* Clears the message at the start of a public call. */
void fp4moe_clear_error(fp4moe_context *ctx);

#endif
