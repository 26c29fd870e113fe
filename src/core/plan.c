/* Plans: validate the caller's weights, keep an owned canonical copy (linear scales; the CPU
 * backend repacks straight from the caller's codes and keeps only its own layout), hand it to
 * the backend to repack, and release everything on destroy. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../cpu/cpu_backend.h"
#include "../cuda/cuda_backend.h"
#include "../format/format.h"
#include "plan.h"

void plan_weights_free(plan_weights *w)
{
    if (w == NULL) return;
    if (w->codes_borrowed) w->w1 = w->w2 = NULL;
    void *arrays[] = {w->w1, w->w1_scale, w->w1_global, w->w1_global_half2, w->w2, w->w2_scale,
                      w->w2_global, w->b1, w->b2, w->routing_bias, w->a1_global, w->a2_global,
                      w->fc2_input_fp8_scale, w->swiglu_alpha, w->swiglu_beta, w->swiglu_limit};
    for (size_t i = 0; i < sizeof arrays / sizeof arrays[0]; i++) free(arrays[i]);
    memset(w, 0, sizeof *w);
}

void plan_drop_matrices(fp4moe_plan *plan)
{
    plan_weights *w = &plan->w;
    if (!w->codes_borrowed) {
        free(w->w1);
        free(w->w2);
    }
    free(w->w1_scale);
    free(w->w2_scale);
    w->w1 = w->w2 = w->w1_scale = w->w2_scale = NULL;
    w->codes_borrowed = 0;
    plan->matrices_in_backend = 1;
}

/* Copies count floats, each required to pass the check named by `rule`. */
typedef enum value_rule { ANY_VALUE, FINITE, FINITE_POSITIVE, POSITIVE_OR_INF } value_rule;

static int value_ok(float v, value_rule rule)
{
    switch (rule) {
    case ANY_VALUE: return 1;
    case FINITE: return isfinite(v);
    case FINITE_POSITIVE: return isfinite(v) && v > 0.0f;
    case POSITIVE_OR_INF: return !isnan(v) && v > 0.0f;
    }
    return 0;
}

static const char *rule_text(value_rule rule)
{
    switch (rule) {
    case FINITE: return "finite";
    case FINITE_POSITIVE: return "finite and > 0";
    case POSITIVE_OR_INF: return "> 0 (or +inf)";
    default: return "any value";
    }
}

static fp4moe_status copy_floats(fp4moe_context *ctx, const char *name, const float *src,
                                 int64_t count, value_rule rule, float **dst)
{
    if ((uintptr_t)src % sizeof(float) != 0)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s is not 4-byte aligned", name);
    for (int64_t i = 0; i < count; i++)
        if (!value_ok(src[i], rule))
            return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s[%lld] = %g must be %s",
                               name, (long long)i, (double)src[i], rule_text(rule));
    *dst = malloc((size_t)count * sizeof(float));
    if (*dst == NULL)
        return fp4moe_fail(ctx, FP4MOE_ERROR_OUT_OF_MEMORY, "cannot allocate %s", name);
    memcpy(*dst, src, (size_t)count * sizeof(float));
    return FP4MOE_SUCCESS;
}

static fp4moe_status fill_floats(fp4moe_context *ctx, const char *name, float value,
                                 int64_t count, float **dst)
{
    *dst = malloc((size_t)count * sizeof(float));
    if (*dst == NULL)
        return fp4moe_fail(ctx, FP4MOE_ERROR_OUT_OF_MEMORY, "cannot allocate %s", name);
    for (int64_t i = 0; i < count; i++) (*dst)[i] = value;
    return FP4MOE_SUCCESS;
}

/* Copies one projection's scales (experts stacked, each in `layout`) into linear form and
 * rejects NaN codes: a NaN block scale would poison a whole output row silently. */
static fp4moe_status copy_scales(fp4moe_context *ctx, const char *name, const uint8_t *src,
                                 fp4moe_scale_layout layout, int64_t experts, int64_t rows,
                                 int64_t cols, uint8_t **dst)
{
    if (layout != FP4MOE_SCALE_LINEAR && layout != FP4MOE_SCALE_SWIZZLED_128x4)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                           "%s layout = %d is not a fp4moe_scale_layout", name, (int)layout);
    size_t per_expert_in = scale_matrix_bytes(rows, cols, layout);
    size_t per_expert_out = (size_t)(rows * (cols / 16));
    *dst = malloc((size_t)experts * per_expert_out);
    if (*dst == NULL)
        return fp4moe_fail(ctx, FP4MOE_ERROR_OUT_OF_MEMORY, "cannot allocate %s", name);
    for (int64_t e = 0; e < experts; e++) {
        uint8_t *out = *dst + (size_t)e * per_expert_out;
        scales_to_linear(src + (size_t)e * per_expert_in, layout, rows, cols, out);
        for (size_t i = 0; i < per_expert_out; i++)
            if ((out[i] & 0x7f) == 0x7f)
                return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                                   "%s: expert %lld row %lld block %lld holds the E4M3 NaN code",
                                   name, (long long)e, (long long)(i / (size_t)(cols / 16)),
                                   (long long)(i % (size_t)(cols / 16)));
    }
    return FP4MOE_SUCCESS;
}

static fp4moe_status copy_bytes(fp4moe_context *ctx, const char *name, const uint8_t *src,
                                int64_t count, uint8_t **dst)
{
    *dst = malloc((size_t)count);
    if (*dst == NULL)
        return fp4moe_fail(ctx, FP4MOE_ERROR_OUT_OF_MEMORY, "cannot allocate %s (%lld bytes)",
                           name, (long long)count);
    memcpy(*dst, src, (size_t)count);
    return FP4MOE_SUCCESS;
}

#define TRY(expr)                                                                               \
    do {                                                                                        \
        fp4moe_status try_status_ = (expr);                                                     \
        if (try_status_ != FP4MOE_SUCCESS) {                                                    \
            plan_weights_free(&w);                                                              \
            return try_status_;                                                                 \
        }                                                                                       \
    } while (0)

/* The plan's own copy of the caller's weights (scales made linear, every value checked);
 * with borrow_codes the codes are not copied but pointed at (see plan_weights). */
static fp4moe_status copy_weights(fp4moe_context *ctx, const fp4moe_config *c,
                                  const fp4moe_weights *in, int borrow_codes, plan_weights *out)
{
    const fp4moe_status bad = FP4MOE_ERROR_INVALID_ARGUMENT;
    const char *missing = in->w1 == NULL                ? "w1"
                          : in->w1_scale == NULL        ? "w1_scale"
                          : in->w1_global_scale == NULL ? "w1_global_scale"
                          : in->w2 == NULL              ? "w2"
                          : in->w2_scale == NULL        ? "w2_scale"
                          : in->w2_global_scale == NULL ? "w2_global_scale"
                                                        : NULL;
    if (missing != NULL) return fp4moe_fail(ctx, bad, "weights->%s is NULL", missing);
    if (in->routing_bias != NULL && !plan_routing_takes_bias(c->routing))
        return fp4moe_fail(ctx, bad,
                           "routing_bias is given but routing method %d takes none (only "
                           "softmax_topk, renormalize, renormalize_naive, deepseek_v3, minimax2)",
                           (int)c->routing);
    if (c->precision == FP4MOE_PRECISION_W4A4 &&
        (in->a1_global_scale == NULL || in->a2_global_scale == NULL))
        return fp4moe_fail(ctx, bad, "precision w4a4 needs a1_global_scale and a2_global_scale");
    if (c->fc2_input_fp8 && in->fc2_input_fp8_scale == NULL)
        return fp4moe_fail(ctx, bad, "fc2_input_fp8 needs fc2_input_fp8_scale");
    if (in->w1_global_scale_half2 != NULL && fp4moe_config_fc1_rows(c) != 2 * c->intermediate_size)
        return fp4moe_fail(ctx, bad, "w1_global_scale_half2 needs a gated activation");

    const int64_t e_loc = c->local_num_experts, n1 = fp4moe_config_fc1_rows(c);
    const int64_t h = c->hidden_size, inter = c->intermediate_size;
    plan_weights w;
    memset(&w, 0, sizeof w);
    if (borrow_codes) {
        w.w1 = (uint8_t *)(uintptr_t)in->w1; /* read only, and only during plan creation */
        w.w2 = (uint8_t *)(uintptr_t)in->w2;
        w.codes_borrowed = 1;
    } else {
        TRY(copy_bytes(ctx, "w1", in->w1, plan_w1_bytes(c), &w.w1));
        TRY(copy_bytes(ctx, "w2", in->w2, plan_w2_bytes(c), &w.w2));
    }
    TRY(copy_scales(ctx, "w1_scale", in->w1_scale, in->w1_scale_layout, e_loc, n1, h, &w.w1_scale));
    TRY(copy_scales(ctx, "w2_scale", in->w2_scale, in->w2_scale_layout, e_loc, h, inter,
                    &w.w2_scale));
    TRY(copy_floats(ctx, "w1_global_scale", in->w1_global_scale, e_loc, FINITE_POSITIVE,
                    &w.w1_global));
    TRY(copy_floats(ctx, "w1_global_scale_half2",
                    in->w1_global_scale_half2 ? in->w1_global_scale_half2 : in->w1_global_scale,
                    e_loc, FINITE_POSITIVE, &w.w1_global_half2));
    TRY(copy_floats(ctx, "w2_global_scale", in->w2_global_scale, e_loc, FINITE_POSITIVE,
                    &w.w2_global));
    if (in->b1) TRY(copy_floats(ctx, "b1", in->b1, e_loc * n1, FINITE, &w.b1));
    if (in->b2) TRY(copy_floats(ctx, "b2", in->b2, e_loc * h, FINITE, &w.b2));
    if (in->routing_bias)
        TRY(copy_floats(ctx, "routing_bias", in->routing_bias, c->num_experts, FINITE,
                        &w.routing_bias));
    if (c->precision == FP4MOE_PRECISION_W4A4) {
        TRY(copy_floats(ctx, "a1_global_scale", in->a1_global_scale, e_loc, FINITE_POSITIVE,
                        &w.a1_global));
        TRY(copy_floats(ctx, "a2_global_scale", in->a2_global_scale, e_loc, FINITE_POSITIVE,
                        &w.a2_global));
    }
    if (c->fc2_input_fp8)
        TRY(copy_floats(ctx, "fc2_input_fp8_scale", in->fc2_input_fp8_scale, e_loc,
                        FINITE_POSITIVE, &w.fc2_input_fp8_scale));
    if (in->swiglu_alpha) TRY(copy_floats(ctx, "swiglu_alpha", in->swiglu_alpha, e_loc, FINITE, &w.swiglu_alpha));
    else TRY(fill_floats(ctx, "swiglu_alpha", c->swiglu_alpha, e_loc, &w.swiglu_alpha));
    if (in->swiglu_beta) TRY(copy_floats(ctx, "swiglu_beta", in->swiglu_beta, e_loc, FINITE, &w.swiglu_beta));
    else TRY(fill_floats(ctx, "swiglu_beta", c->swiglu_beta, e_loc, &w.swiglu_beta));
    if (in->swiglu_limit)
        TRY(copy_floats(ctx, "swiglu_limit", in->swiglu_limit, e_loc, POSITIVE_OR_INF, &w.swiglu_limit));
    else TRY(fill_floats(ctx, "swiglu_limit", c->swiglu_limit, e_loc, &w.swiglu_limit));
    *out = w;
    return FP4MOE_SUCCESS;
}
#undef TRY

static const backend_ops *ops_for(const fp4moe_context *ctx)
{
    return ctx->backend == FP4MOE_BACKEND_CUDA ? cuda_backend_get_ops() : &cpu_backend_ops;
}

fp4moe_status plan_assemble(fp4moe_context *ctx, const fp4moe_config *cfg, plan_weights *w,
                            fp4moe_plan **out)
{
    fp4moe_plan *plan = calloc(1, sizeof *plan);
    if (plan == NULL) {
        plan_weights_free(w);
        return fp4moe_fail(ctx, FP4MOE_ERROR_OUT_OF_MEMORY, "cannot allocate the plan");
    }
    plan->ctx = ctx;
    plan->cfg = *cfg;
    plan->e_loc = cfg->local_num_experts;
    plan->n1 = fp4moe_config_fc1_rows(cfg);
    plan->gated = plan->n1 == 2 * cfg->intermediate_size;
    plan->w = *w;
    memset(w, 0, sizeof *w);
    plan->ops = ops_for(ctx);
    if (plan->ops == NULL) {
        fp4moe_plan_destroy(plan);
        return fp4moe_fail(ctx, FP4MOE_ERROR_BACKEND_UNAVAILABLE, "the context's backend has no operations");
    }
    fp4moe_status status = plan->ops->prepare(plan);
    if (status != FP4MOE_SUCCESS) {
        plan->ops = NULL; /* prepare cleans up after itself on failure */
        fp4moe_plan_destroy(plan);
        return status;
    }
    *out = plan;
    return FP4MOE_SUCCESS;
}

fp4moe_status fp4moe_plan_create(fp4moe_context *ctx, const fp4moe_config *cfg,
                                 const fp4moe_weights *weights, fp4moe_plan **out)
{
    if (ctx == NULL) return FP4MOE_ERROR_INVALID_ARGUMENT;
    fp4moe_clear_error(ctx);
    if (out == NULL) return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "out is NULL");
    *out = NULL;
    if (weights == NULL) return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "weights is NULL");
    fp4moe_config normal;
    fp4moe_status status = plan_normalise_config(ctx, cfg, &normal);
    if (status != FP4MOE_SUCCESS) return status;
    plan_weights w;
    /* A backend that keeps only its own layout repacks straight from the caller's codes. */
    const backend_ops *ops = ops_for(ctx);
    status = copy_weights(ctx, &normal, weights, ops != NULL && ops->export_matrix != NULL, &w);
    if (status != FP4MOE_SUCCESS) return status;
    return plan_assemble(ctx, &normal, &w, out);
}

void fp4moe_plan_destroy(fp4moe_plan *plan)
{
    if (plan == NULL) return;
    if (plan->ops != NULL) plan->ops->release(plan);
    plan_weights_free(&plan->w);
    free(plan);
}

fp4moe_status fp4moe_plan_get_config(const fp4moe_plan *plan, fp4moe_config *out)
{
    if (plan == NULL) return FP4MOE_ERROR_INVALID_ARGUMENT;
    fp4moe_clear_error(plan->ctx);
    if (out == NULL) return fp4moe_fail(plan->ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "out is NULL");
    *out = plan->cfg;
    return FP4MOE_SUCCESS;
}

fp4moe_status fp4moe_plan_workspace_size(const fp4moe_plan *plan, int64_t num_tokens,
                                         size_t *bytes)
{
    if (plan == NULL) return FP4MOE_ERROR_INVALID_ARGUMENT;
    fp4moe_clear_error(plan->ctx);
    if (bytes == NULL) return fp4moe_fail(plan->ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "bytes is NULL");
    if (num_tokens < 1 || num_tokens > plan->cfg.max_tokens)
        return fp4moe_fail(plan->ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                           "num_tokens = %lld must be in [1, max_tokens = %lld]",
                           (long long)num_tokens, (long long)plan->cfg.max_tokens);
    *bytes = plan->ops->workspace_size(plan, num_tokens);
    return FP4MOE_SUCCESS;
}
