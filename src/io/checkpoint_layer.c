/* One MoE layer of an NVFP4 checkpoint into a plan: per-expert ModelOpt tensors assembled into
 * the canonical stacked layout, and the layer's router (weight, correction bias, logits). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/context.h"
#include "io/checkpoint.h"

void fp4moe_checkpoint_plan_options_init(fp4moe_checkpoint_plan_options *o)
{
    if (o == NULL) return;
    memset(o, 0, sizeof *o);
    fp4moe_config c;
    fp4moe_config_init(&c);
    o->precision = FP4MOE_PRECISION_W4A16;
    o->max_tokens = c.max_tokens;
    o->decode_threshold = c.decode_threshold;
    o->gate_up_order = FP4MOE_GATE_UP;
}

static fp4moe_status lookup_layer(fp4moe_context *ctx, const char *fn, const fp4moe_checkpoint *ckpt,
                                  int64_t layer, const ckpt_layer **out)
{
    if (ckpt == NULL) return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: ckpt is NULL", fn);
    int32_t index;
    fp4moe_status status = fp4moe_checkpoint_find_layer(ctx, ckpt, layer, &index);
    if (status != FP4MOE_SUCCESS) return status;
    *out = &ckpt->layers[index];
    return FP4MOE_SUCCESS;
}

/* The checked tensors of one projection of one expert. */
typedef struct proj_tensors {
    const st_tensor *weight, *scale;
    float ws2, input_scale;
} proj_tensors;

static int get_proj(const fp4moe_checkpoint *ckpt, const ckpt_layer *L, int64_t expert,
                    ckpt_proj proj, proj_tensors *p)
{
    char name[CKPT_MAX_NAME + 64];
    ckpt_expert_tensor_name(name, sizeof name, L, expert, proj, CKPT_WEIGHT);
    p->weight = ckpt_find(ckpt, name);
    ckpt_expert_tensor_name(name, sizeof name, L, expert, proj, CKPT_WEIGHT_SCALE);
    p->scale = ckpt_find(ckpt, name);
    ckpt_expert_tensor_name(name, sizeof name, L, expert, proj, CKPT_WEIGHT_SCALE_2);
    const st_tensor *s2 = ckpt_find(ckpt, name);
    ckpt_expert_tensor_name(name, sizeof name, L, expert, proj, CKPT_INPUT_SCALE);
    const st_tensor *in = ckpt_find(ckpt, name);
    /* Shapes and dtypes were checked at open (the layer has no problems); re-check the sizes
     * this copy relies on, so a bug there cannot become an over-read. */
    if (p->weight == NULL || p->scale == NULL || s2 == NULL || s2->bytes != 4) return -1;
    memcpy(&p->ws2, s2->data, 4);
    p->input_scale = 0.0f;
    if (in != NULL && in->bytes == 4) memcpy(&p->input_scale, in->data, 4);
    return 0;
}

fp4moe_status fp4moe_checkpoint_plan_create(fp4moe_context *ctx, const fp4moe_checkpoint *ckpt,
                                            int64_t layer,
                                            const fp4moe_checkpoint_plan_options *options,
                                            fp4moe_plan **out)
{
    static const char fn[] = "fp4moe_checkpoint_plan_create";
    fp4moe_clear_error(ctx);
    if (out == NULL) return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: out is NULL", fn);
    *out = NULL;
    const ckpt_layer *L = NULL;
    fp4moe_status status = lookup_layer(ctx, fn, ckpt, layer, &L);
    if (status != FP4MOE_SUCCESS) return status;
    fp4moe_checkpoint_plan_options defaults;
    fp4moe_checkpoint_plan_options_init(&defaults);
    const fp4moe_checkpoint_plan_options *o = options != NULL ? options : &defaults;
    if (L->num_problems > 0)
        return fp4moe_fail(ctx, FP4MOE_ERROR_CORRUPT_DATA,
                           "%s: layer %lld ('%s') has %d problem(s); 'fp4moe info' lists them", fn,
                           (long long)layer, L->prefix, L->num_problems);
    if (!L->quantized)
        return fp4moe_fail(ctx, FP4MOE_ERROR_UNSUPPORTED,
                           "%s: layer %lld ('%s') has unquantised %s experts; quantise the checkpoint "
                           "first (fp4moe quantize)", fn, (long long)layer, L->prefix,
                           st_dtype_name(L->weight_dtype));
    if (o->precision == FP4MOE_PRECISION_W4A4 && !L->has_input_scales)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                           "%s: W4A4 needs input_scale on every projection; layer %lld has none", fn,
                           (long long)layer);
    fp4moe_config cfg = L->config;
    if (o->top_k > 0) cfg.top_k = o->top_k;
    if (cfg.top_k <= 0)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                           "%s: top-k unknown: config.json has no \"num_experts_per_tok\" (set "
                           "options.top_k)", fn);
    cfg.precision = o->precision;
    cfg.max_tokens = o->max_tokens;
    cfg.decode_threshold = o->decode_threshold;
    cfg.local_expert_offset = o->local_expert_offset;
    cfg.local_num_experts = o->local_num_experts;
    cfg.gate_up_order = o->gate_up_order;
    status = fp4moe_config_validate(ctx, &cfg);
    if (status != FP4MOE_SUCCESS) return status;

    const int64_t e_loc = cfg.local_num_experts ? cfg.local_num_experts : cfg.num_experts - cfg.local_expert_offset;
    const int64_t h = cfg.hidden_size, i_size = cfg.intermediate_size;
    const int64_t n1 = fp4moe_config_fc1_rows(&cfg);
    const size_t w1_bytes = (size_t)(n1 * h / 2), w1s_bytes = (size_t)(n1 * h / 16);
    const size_t w2_bytes = (size_t)(h * i_size / 2), w2s_bytes = (size_t)(h * i_size / 16);
    const size_t half1 = (size_t)(i_size * h / 2), half1s = (size_t)(i_size * h / 16);
    uint8_t *w1 = malloc((size_t)e_loc * w1_bytes), *w1s = malloc((size_t)e_loc * w1s_bytes);
    uint8_t *w2 = malloc((size_t)e_loc * w2_bytes), *w2s = malloc((size_t)e_loc * w2s_bytes);
    float *scales = calloc((size_t)(6 * e_loc + cfg.num_experts), sizeof(float));
    if (w1 == NULL || w1s == NULL || w2 == NULL || w2s == NULL || scales == NULL) {
        status = fp4moe_fail(ctx, FP4MOE_ERROR_OUT_OF_MEMORY, "%s: out of memory for layer %lld",
                             fn, (long long)layer);
        goto done;
    }
    float *g1 = scales, *g1_half2 = scales + e_loc, *g2 = scales + 2 * e_loc;
    float *a1 = scales + 3 * e_loc, *a2 = scales + 4 * e_loc, *bias = scales + 6 * e_loc;
    for (int64_t e = 0; e < e_loc; e++) {
        const int64_t j = cfg.local_expert_offset + e;
        proj_tensors gate = {0}, up, down;
        if ((L->gated && get_proj(ckpt, L, j, CKPT_GATE, &gate)) || get_proj(ckpt, L, j, CKPT_UP, &up) ||
            get_proj(ckpt, L, j, CKPT_DOWN, &down) || up.weight->bytes != half1 ||
            up.scale->bytes != half1s || down.weight->bytes != w2_bytes || down.scale->bytes != w2s_bytes ||
            (L->gated && (gate.weight->bytes != half1 || gate.scale->bytes != half1s))) {
            status = fp4moe_fail(ctx, FP4MOE_ERROR_INTERNAL, "%s: expert %lld of layer %lld changed "
                                 "since the checkpoint was checked", fn, (long long)j, (long long)layer);
            goto done;
        }
        uint8_t *dst = w1 + (size_t)e * w1_bytes, *dst_s = w1s + (size_t)e * w1s_bytes;
        /* Rows [0, I) then [I, 2I): gate then up in GATE_UP order (HF, vLLM w13). */
        const proj_tensors *first = L->gated && cfg.gate_up_order == FP4MOE_GATE_UP ? &gate : &up;
        const proj_tensors *second = first == &gate ? &up : &gate;
        memcpy(dst, first->weight->data, half1);
        memcpy(dst_s, first->scale->data, half1s);
        g1[e] = first->ws2;
        if (L->gated) {
            memcpy(dst + half1, second->weight->data, half1);
            memcpy(dst_s + half1s, second->scale->data, half1s);
            g1_half2[e] = second->ws2;
        }
        memcpy(w2 + (size_t)e * w2_bytes, down.weight->data, w2_bytes);
        memcpy(w2s + (size_t)e * w2s_bytes, down.scale->data, w2s_bytes);
        g2[e] = down.ws2;
        /* One activation scale serves gate and up (ModelOpt shares it); should they differ, the
         * larger amax keeps every input in range. */
        const float in1 = L->gated && gate.input_scale > up.input_scale ? gate.input_scale : up.input_scale;
        a1[e] = in1 > 0 ? 1.0f / in1 : 0.0f;
        a2[e] = down.input_scale > 0 ? 1.0f / down.input_scale : 0.0f;
    }
    if (L->bias != NULL)
        for (int64_t e = 0; e < cfg.num_experts; e++) bias[e] = ckpt_load_float(L->bias->data, L->bias->dtype, e);

    fp4moe_weights w;
    memset(&w, 0, sizeof w);
    w.w1 = w1;
    w.w1_scale = w1s;
    w.w1_global_scale = g1;
    w.w1_global_scale_half2 = L->gated && L->split_gate_up_scale ? g1_half2 : NULL;
    w.w2 = w2;
    w.w2_scale = w2s;
    w.w2_global_scale = g2;
    w.w1_scale_layout = FP4MOE_SCALE_LINEAR;
    w.w2_scale_layout = FP4MOE_SCALE_LINEAR;
    w.routing_bias = L->bias != NULL ? bias : NULL;
    if (cfg.precision == FP4MOE_PRECISION_W4A4) {
        w.a1_global_scale = a1;
        w.a2_global_scale = a2;
    }
    status = fp4moe_plan_create(ctx, &cfg, &w, out);
done:
    free(w1);
    free(w1s);
    free(w2);
    free(w2s);
    free(scales);
    return status;
}

fp4moe_status fp4moe_checkpoint_router_weight(fp4moe_context *ctx, const fp4moe_checkpoint *ckpt,
                                              int64_t layer, float *out)
{
    static const char fn[] = "fp4moe_checkpoint_router_weight";
    fp4moe_clear_error(ctx);
    const ckpt_layer *L = NULL;
    fp4moe_status status = lookup_layer(ctx, fn, ckpt, layer, &L);
    if (status != FP4MOE_SUCCESS) return status;
    if (out == NULL) return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: out is NULL", fn);
    if (L->router == NULL)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: layer %lld has no router '%s.gate.weight'",
                           fn, (long long)layer, L->prefix);
    const int64_t n = L->num_experts * L->hidden;
    for (int64_t i = 0; i < n; i++) out[i] = ckpt_load_float(L->router->data, L->router->dtype, i);
    return FP4MOE_SUCCESS;
}

fp4moe_status fp4moe_checkpoint_routing_bias(fp4moe_context *ctx, const fp4moe_checkpoint *ckpt,
                                             int64_t layer, float *out)
{
    static const char fn[] = "fp4moe_checkpoint_routing_bias";
    fp4moe_clear_error(ctx);
    const ckpt_layer *L = NULL;
    fp4moe_status status = lookup_layer(ctx, fn, ckpt, layer, &L);
    if (status != FP4MOE_SUCCESS) return status;
    if (out == NULL) return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: out is NULL", fn);
    if (L->bias == NULL)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                           "%s: layer %lld has no '%s.gate.e_score_correction_bias'", fn,
                           (long long)layer, L->prefix);
    for (int64_t e = 0; e < L->num_experts; e++) out[e] = ckpt_load_float(L->bias->data, L->bias->dtype, e);
    return FP4MOE_SUCCESS;
}

fp4moe_status fp4moe_checkpoint_router_logits(fp4moe_context *ctx, const fp4moe_checkpoint *ckpt,
                                              int64_t layer, int64_t num_tokens,
                                              const void *hidden, fp4moe_dtype hidden_dtype,
                                              float *logits)
{
    static const char fn[] = "fp4moe_checkpoint_router_logits";
    fp4moe_clear_error(ctx);
    const ckpt_layer *L = NULL;
    fp4moe_status status = lookup_layer(ctx, fn, ckpt, layer, &L);
    if (status != FP4MOE_SUCCESS) return status;
    if (hidden == NULL || logits == NULL)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: %s is NULL", fn,
                           hidden == NULL ? "hidden" : "logits");
    if (hidden_dtype != FP4MOE_DTYPE_F32 && hidden_dtype != FP4MOE_DTYPE_F16 && hidden_dtype != FP4MOE_DTYPE_BF16)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: hidden dtype %d is not F32, F16 or BF16",
                           fn, (int)hidden_dtype);
    if (num_tokens < 1 || num_tokens > ((int64_t)1 << 40) / (L->hidden + L->num_experts))
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: num_tokens %lld out of range", fn,
                           (long long)num_tokens);
    const int64_t e_count = L->num_experts, h = L->hidden;
    float *w = malloc((size_t)(e_count * h) * sizeof(float));
    float *x = malloc((size_t)h * sizeof(float));
    if (w == NULL || x == NULL) {
        free(w);
        free(x);
        return fp4moe_fail(ctx, FP4MOE_ERROR_OUT_OF_MEMORY, "%s: out of memory", fn);
    }
    status = fp4moe_checkpoint_router_weight(ctx, ckpt, layer, w);
    for (int64_t t = 0; status == FP4MOE_SUCCESS && t < num_tokens; t++) {
        for (int64_t k = 0; k < h; k++) x[k] = ckpt_load_float(hidden, hidden_dtype, t * h + k);
        for (int64_t e = 0; e < e_count; e++) {
            const float *row = w + e * h;
            double sum = 0.0;
            for (int64_t k = 0; k < h; k++) sum += (double)x[k] * (double)row[k];
            logits[t * e_count + e] = (float)sum;
        }
    }
    free(w);
    free(x);
    return status;
}
