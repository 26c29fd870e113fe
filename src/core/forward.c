/* The forward and routing entry points: argument checks common to every backend, then the
 * backend's operation. Nothing here reads the tensors themselves (they may be device memory). */
#include <stdint.h>
#include <string.h>

#include "../format/format.h"
#include "plan.h"

void fp4moe_forward_args_init(fp4moe_forward_args *args)
{
    if (args == NULL) return;
    memset(args, 0, sizeof *args);
    args->hidden_dtype = FP4MOE_DTYPE_F32;
    args->router_logits_dtype = FP4MOE_DTYPE_F32;
    args->topk_weights_dtype = FP4MOE_DTYPE_F32;
    args->output_dtype = FP4MOE_DTYPE_F32;
}

static int is_activation_dtype(fp4moe_dtype d)
{
    return d == FP4MOE_DTYPE_F32 || d == FP4MOE_DTYPE_F16 || d == FP4MOE_DTYPE_BF16;
}

/* Tensors must be aligned to their element size (a misaligned float is undefined behaviour on
 * the host and a fault on the GPU). Returns the name of the first offender, or NULL. */
static const char *misaligned(const void *const *ptrs, const size_t *align, const char *const *names,
                              int count)
{
    for (int i = 0; i < count; i++)
        if (ptrs[i] != NULL && align[i] > 1 && (uintptr_t)ptrs[i] % align[i] != 0) return names[i];
    return NULL;
}

/* Two byte ranges [a, a+na) and [b, b+nb) overlap. */
static int overlaps(const void *a, size_t na, const void *b, size_t nb)
{
    if (a == NULL || b == NULL || na == 0 || nb == 0) return 0;
    uintptr_t pa = (uintptr_t)a, pb = (uintptr_t)b;
    return pa < pb + nb && pb < pa + na;
}

static fp4moe_status check_workspace(fp4moe_plan *plan, int64_t num_tokens, const void *workspace,
                                     size_t workspace_bytes)
{
    size_t need = plan->ops->workspace_size(plan, num_tokens);
    if (workspace_bytes < need)
        return fp4moe_fail(plan->ctx, FP4MOE_ERROR_WORKSPACE_TOO_SMALL,
                           "workspace_bytes = %zu, this call needs %zu", workspace_bytes, need);
    if (need > 0 && workspace == NULL)
        return fp4moe_fail(plan->ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "workspace is NULL");
    if ((uintptr_t)workspace % 256 != 0)
        return fp4moe_fail(plan->ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                           "workspace must be 256-byte aligned");
    return FP4MOE_SUCCESS;
}

static fp4moe_status check_tokens(fp4moe_plan *plan, int64_t num_tokens)
{
    if (num_tokens < 1 || num_tokens > plan->cfg.max_tokens)
        return fp4moe_fail(plan->ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                           "num_tokens = %lld must be in [1, max_tokens = %lld]",
                           (long long)num_tokens, (long long)plan->cfg.max_tokens);
    return FP4MOE_SUCCESS;
}

/* routed: 1 for fp4moe_forward_routed (ids + weights), 0 for logits. */
static fp4moe_status forward_common(fp4moe_plan *plan, const fp4moe_forward_args *a, int routed,
                                    void *workspace, size_t workspace_bytes, void *stream)
{
    if (plan == NULL) return FP4MOE_ERROR_INVALID_ARGUMENT;
    fp4moe_context *ctx = plan->ctx;
    const fp4moe_status bad = FP4MOE_ERROR_INVALID_ARGUMENT;
    fp4moe_clear_error(ctx);
    if (a == NULL) return fp4moe_fail(ctx, bad, "args is NULL");
    fp4moe_status status = check_tokens(plan, a->num_tokens);
    if (status != FP4MOE_SUCCESS) return status;
    const int64_t t = a->num_tokens, k = plan->cfg.top_k, h = plan->cfg.hidden_size;
    const int64_t e = plan->cfg.num_experts;

    if (a->hidden_states == NULL) return fp4moe_fail(ctx, bad, "hidden_states is NULL");
    if (!is_activation_dtype(a->hidden_dtype))
        return fp4moe_fail(ctx, bad, "hidden_dtype = %d must be F32, F16 or BF16", (int)a->hidden_dtype);
    if (a->output == NULL) return fp4moe_fail(ctx, bad, "output is NULL");
    if (a->output_dtype != FP4MOE_DTYPE_F32 && a->output_dtype != a->hidden_dtype)
        return fp4moe_fail(ctx, bad, "output_dtype = %s must be F32 or the hidden dtype (%s)",
                           dtype_name(a->output_dtype), dtype_name(a->hidden_dtype));
    if (a->skip_finalize != 0 && a->skip_finalize != 1)
        return fp4moe_fail(ctx, bad, "skip_finalize = %d must be 0 or 1", a->skip_finalize);

    if (routed) {
        if (a->topk_ids == NULL) return fp4moe_fail(ctx, bad, "topk_ids is NULL");
        if (a->topk_weights == NULL) return fp4moe_fail(ctx, bad, "topk_weights is NULL");
        if (!is_activation_dtype(a->topk_weights_dtype))
            return fp4moe_fail(ctx, bad, "topk_weights_dtype = %d must be F32, F16 or BF16",
                               (int)a->topk_weights_dtype);
    } else {
        if (a->router_logits == NULL) return fp4moe_fail(ctx, bad, "router_logits is NULL");
        if (!is_activation_dtype(a->router_logits_dtype))
            return fp4moe_fail(ctx, bad, "router_logits_dtype = %d must be F32, F16 or BF16",
                               (int)a->router_logits_dtype);
    }

    {
        const void *ptrs[] = {a->hidden_states, a->output, routed ? NULL : a->router_logits,
                              routed ? a->topk_ids : NULL, routed ? a->topk_weights : NULL,
                              a->per_token_scale, a->topk_ids_out, a->topk_weights_out};
        const size_t align[] = {dtype_size(a->hidden_dtype), dtype_size(a->output_dtype),
                                dtype_size(a->router_logits_dtype), 4,
                                dtype_size(a->topk_weights_dtype), 4, 4, 4};
        static const char *const names[] = {"hidden_states", "output", "router_logits", "topk_ids",
                                            "topk_weights", "per_token_scale", "topk_ids_out",
                                            "topk_weights_out"};
        const char *which = misaligned(ptrs, align, names, 8);
        if (which != NULL)
            return fp4moe_fail(ctx, bad, "%s is not aligned to its element size", which);
    }

    /* The output may replace the input in place (same pointer, same shape and dtype), and must
     * not overlap anything else the call reads or writes. */
    const size_t out_rows = (size_t)(a->skip_finalize ? t * k : t);
    const size_t out_bytes = out_rows * (size_t)h * dtype_size(a->output_dtype);
    const size_t x_bytes = (size_t)(t * h) * dtype_size(a->hidden_dtype);
    int in_place = a->output == a->hidden_states && !a->skip_finalize &&
                   a->output_dtype == a->hidden_dtype;
    if (!in_place && overlaps(a->output, out_bytes, a->hidden_states, x_bytes))
        return fp4moe_fail(ctx, bad, "output overlaps hidden_states (only exact in-place is allowed)");
    const void *others[] = {routed ? NULL : a->router_logits, routed ? a->topk_ids : NULL,
                            routed ? a->topk_weights : NULL, a->per_token_scale,
                            routed ? NULL : a->topk_ids_out, routed ? NULL : a->topk_weights_out};
    const size_t other_bytes[] = {(size_t)(t * e) * dtype_size(a->router_logits_dtype),
                                  (size_t)(t * k) * 4,
                                  (size_t)(t * k) * dtype_size(a->topk_weights_dtype),
                                  (size_t)t * 4, (size_t)(t * k) * 4, (size_t)(t * k) * 4};
    static const char *const other_names[] = {"router_logits", "topk_ids", "topk_weights",
                                              "per_token_scale", "topk_ids_out",
                                              "topk_weights_out"};
    for (int i = 0; i < 6; i++)
        if (overlaps(a->output, out_bytes, others[i], other_bytes[i]))
            return fp4moe_fail(ctx, bad, "output overlaps %s", other_names[i]);
    status = check_workspace(plan, t, workspace, workspace_bytes);
    if (status != FP4MOE_SUCCESS) return status;

    forward_call call;
    memset(&call, 0, sizeof call);
    call.num_tokens = t;
    call.hidden_states = a->hidden_states;
    call.hidden_dtype = a->hidden_dtype;
    if (routed) {
        call.topk_ids = a->topk_ids;
        call.topk_weights = a->topk_weights;
        call.topk_weights_dtype = a->topk_weights_dtype;
    } else {
        call.router_logits = a->router_logits;
        call.router_logits_dtype = a->router_logits_dtype;
        call.topk_ids_out = a->topk_ids_out;
        call.topk_weights_out = a->topk_weights_out;
    }
    call.per_token_scale = a->per_token_scale;
    call.output = a->output;
    call.output_dtype = a->output_dtype;
    call.finalize = !a->skip_finalize;
    return plan->ops->forward(plan, &call, workspace, workspace_bytes, stream);
}

fp4moe_status fp4moe_forward(fp4moe_plan *plan, const fp4moe_forward_args *args, void *workspace,
                             size_t workspace_bytes, void *stream)
{
    return forward_common(plan, args, 0, workspace, workspace_bytes, stream);
}

fp4moe_status fp4moe_forward_routed(fp4moe_plan *plan, const fp4moe_forward_args *args,
                                    void *workspace, size_t workspace_bytes, void *stream)
{
    return forward_common(plan, args, 1, workspace, workspace_bytes, stream);
}

fp4moe_status fp4moe_route(fp4moe_plan *plan, int64_t num_tokens, const void *router_logits,
                           fp4moe_dtype router_logits_dtype, int32_t *topk_ids_out,
                           float *topk_weights_out, void *workspace, size_t workspace_bytes,
                           void *stream)
{
    if (plan == NULL) return FP4MOE_ERROR_INVALID_ARGUMENT;
    fp4moe_context *ctx = plan->ctx;
    const fp4moe_status bad = FP4MOE_ERROR_INVALID_ARGUMENT;
    fp4moe_clear_error(ctx);
    fp4moe_status status = check_tokens(plan, num_tokens);
    if (status != FP4MOE_SUCCESS) return status;
    if (router_logits == NULL) return fp4moe_fail(ctx, bad, "router_logits is NULL");
    if (!is_activation_dtype(router_logits_dtype))
        return fp4moe_fail(ctx, bad, "router_logits_dtype = %d must be F32, F16 or BF16",
                           (int)router_logits_dtype);
    if (topk_ids_out == NULL) return fp4moe_fail(ctx, bad, "topk_ids_out is NULL");
    if (topk_weights_out == NULL) return fp4moe_fail(ctx, bad, "topk_weights_out is NULL");
    {
        const void *ptrs[] = {router_logits, topk_ids_out, topk_weights_out};
        const size_t align[] = {dtype_size(router_logits_dtype), 4, 4};
        static const char *const names[] = {"router_logits", "topk_ids_out", "topk_weights_out"};
        const char *which = misaligned(ptrs, align, names, 3);
        if (which != NULL)
            return fp4moe_fail(ctx, bad, "%s is not aligned to its element size", which);
    }
    size_t n = (size_t)(num_tokens * plan->cfg.top_k) * 4;
    if (overlaps(topk_ids_out, n, topk_weights_out, n))
        return fp4moe_fail(ctx, bad, "topk_ids_out overlaps topk_weights_out");
    status = check_workspace(plan, num_tokens, workspace, workspace_bytes);
    if (status != FP4MOE_SUCCESS) return status;
    return plan->ops->route(plan, num_tokens, router_logits, router_logits_dtype, topk_ids_out,
                            topk_weights_out, workspace, workspace_bytes, stream);
}
