/* Layer configuration: defaults, checks, normalisation. Every rule of the spec that can be
 * checked without the weights lives here, with a message that names the attribute. */
#include <math.h>
#include <string.h>

#include "plan.h"

/* Sizes beyond these are not real models and would push index products towards 2^63. */
#define MAX_EXPERTS (1 << 20)
#define MAX_DIM (1 << 20)
#define MAX_TOKENS_LIMIT (1ll << 31)

void fp4moe_config_init(fp4moe_config *cfg)
{
    if (cfg == NULL) return;
    memset(cfg, 0, sizeof *cfg);
    cfg->activation = FP4MOE_ACT_SWIGLU;
    cfg->swiglu_alpha = 1.0f;
    cfg->swiglu_beta = 0.0f;
    cfg->swiglu_limit = INFINITY;
    cfg->gate_up_order = FP4MOE_GATE_UP;
    cfg->routing = FP4MOE_ROUTING_RENORMALIZE_NAIVE;
    cfg->n_group = 1;
    cfg->topk_group = 1;
    cfg->norm_topk_prob = 1;
    cfg->routed_scaling_factor = 1.0f;
    cfg->precision = FP4MOE_PRECISION_W4A16;
    /* the CUDA decode path (warp-per-tile GEMVs) beats the grouped GEMMs up to ~5.5 (token,
     * slot) rows per expert on the H100 with 16-bit hidden states, ~10 with FP32 ones (resolved
     * by the CUDA backend per call; docs/PERF.md "crossover"); the peers (TensorRT-LLM's plugin,
     * FlashInfer) split at 16 tokens */
    cfg->decode_threshold = FP4MOE_DECODE_THRESHOLD_AUTO;
    cfg->max_tokens = 16384;
}

static int activation_is_gated(fp4moe_activation a)
{
    return a == FP4MOE_ACT_SWIGLU || a == FP4MOE_ACT_GEGLU || a == FP4MOE_ACT_GEGLU_TANH;
}

static int activation_is_valid(fp4moe_activation a)
{
    return (int)a >= FP4MOE_ACT_SWIGLU && (int)a <= FP4MOE_ACT_IDENTITY;
}

int64_t fp4moe_config_fc1_rows(const fp4moe_config *cfg)
{
    if (cfg == NULL || !activation_is_valid(cfg->activation)) return 0;
    return activation_is_gated(cfg->activation) ? 2 * cfg->intermediate_size
                                                : cfg->intermediate_size;
}

fp4moe_status plan_normalise_config(fp4moe_context *ctx, const fp4moe_config *in,
                                    fp4moe_config *out)
{
    const fp4moe_status bad = FP4MOE_ERROR_INVALID_ARGUMENT;
    if (in == NULL) return fp4moe_fail(ctx, bad, "config is NULL");
    fp4moe_config c = *in;

    if (c.num_experts < 1 || c.num_experts > MAX_EXPERTS)
        return fp4moe_fail(ctx, bad, "num_experts = %lld must be in [1, %d]",
                           (long long)c.num_experts, MAX_EXPERTS);
    int64_t max_k = c.num_experts < 32 ? c.num_experts : 32;
    if (c.top_k < 1 || c.top_k > max_k)
        return fp4moe_fail(ctx, bad, "top_k = %d must be in [1, min(num_experts, 32) = %lld]",
                           c.top_k, (long long)max_k);
    if (c.hidden_size < 16 || c.hidden_size > MAX_DIM || c.hidden_size % 16 != 0)
        return fp4moe_fail(ctx, bad, "hidden_size = %lld must be a positive multiple of 16 (<= %d)",
                           (long long)c.hidden_size, MAX_DIM);
    if (c.intermediate_size < 16 || c.intermediate_size > MAX_DIM || c.intermediate_size % 16 != 0)
        return fp4moe_fail(ctx, bad,
                           "intermediate_size = %lld must be a positive multiple of 16 (<= %d)",
                           (long long)c.intermediate_size, MAX_DIM);
    if (!activation_is_valid(c.activation))
        return fp4moe_fail(ctx, bad, "activation = %d is not a fp4moe_activation", (int)c.activation);
    if (c.gate_up_order != FP4MOE_GATE_UP && c.gate_up_order != FP4MOE_UP_GATE)
        return fp4moe_fail(ctx, bad, "gate_up_order = %d is not a fp4moe_gate_up_order",
                           (int)c.gate_up_order);
    if (isnan(c.swiglu_alpha) || isinf(c.swiglu_alpha) || isnan(c.swiglu_beta) ||
        isinf(c.swiglu_beta))
        return fp4moe_fail(ctx, bad, "swiglu_alpha and swiglu_beta must be finite");
    if (isnan(c.swiglu_limit) || c.swiglu_limit <= 0.0f)
        return fp4moe_fail(ctx, bad, "swiglu_limit = %g must be > 0 (+inf for none)",
                           (double)c.swiglu_limit);

    if ((int)c.routing < FP4MOE_ROUTING_SOFTMAX_TOPK || (int)c.routing > FP4MOE_ROUTING_TOPK_SIGMOID)
        return fp4moe_fail(ctx, bad, "routing = %d is not a fp4moe_routing", (int)c.routing);
    if (c.n_group < 1 || c.num_experts % c.n_group != 0)
        return fp4moe_fail(ctx, bad, "n_group = %d must be >= 1 and divide num_experts = %lld",
                           c.n_group, (long long)c.num_experts);
    if (c.topk_group < 1 || c.topk_group > c.n_group)
        return fp4moe_fail(ctx, bad, "topk_group = %d must be in [1, n_group = %d]", c.topk_group,
                           c.n_group);
    if (c.routing == FP4MOE_ROUTING_DEEPSEEK_V3 &&
        (int64_t)c.topk_group * (c.num_experts / c.n_group) < c.top_k)
        return fp4moe_fail(ctx, bad,
                           "deepseek_v3: topk_group (%d) groups of %lld experts hold fewer than "
                           "top_k = %d experts",
                           c.topk_group, (long long)(c.num_experts / c.n_group), c.top_k);
    if (c.norm_topk_prob != 0 && c.norm_topk_prob != 1)
        return fp4moe_fail(ctx, bad, "norm_topk_prob = %d must be 0 or 1", c.norm_topk_prob);
    if (!isfinite(c.routed_scaling_factor))
        return fp4moe_fail(ctx, bad, "routed_scaling_factor must be finite");
    if (c.apply_router_weight_on_input != 0 && c.apply_router_weight_on_input != 1)
        return fp4moe_fail(ctx, bad, "apply_router_weight_on_input = %d must be 0 or 1",
                           c.apply_router_weight_on_input);
    if (c.routing == FP4MOE_ROUTING_LLAMA4) {
        if (c.top_k != 1)
            return fp4moe_fail(ctx, bad, "llama4 routing needs top_k = 1, got %d", c.top_k);
        c.apply_router_weight_on_input = 1;
    }
    if (c.apply_router_weight_on_input && c.top_k != 1)
        return fp4moe_fail(ctx, bad, "apply_router_weight_on_input needs top_k = 1, got %d",
                           c.top_k);

    if (c.local_expert_offset < 0 || c.local_expert_offset >= c.num_experts)
        return fp4moe_fail(ctx, bad, "local_expert_offset = %lld must be in [0, num_experts = %lld)",
                           (long long)c.local_expert_offset, (long long)c.num_experts);
    if (c.local_num_experts == 0) c.local_num_experts = c.num_experts - c.local_expert_offset;
    if (c.local_num_experts < 1 || c.local_num_experts > c.num_experts - c.local_expert_offset)
        return fp4moe_fail(ctx, bad,
                           "local_num_experts = %lld must be in [1, num_experts - "
                           "local_expert_offset = %lld]",
                           (long long)c.local_num_experts,
                           (long long)(c.num_experts - c.local_expert_offset));

    if (c.precision != FP4MOE_PRECISION_W4A16 && c.precision != FP4MOE_PRECISION_W4A4)
        return fp4moe_fail(ctx, bad, "precision = %d is not a fp4moe_precision", (int)c.precision);
    if (c.fc2_input_fp8 != 0 && c.fc2_input_fp8 != 1)
        return fp4moe_fail(ctx, bad, "fc2_input_fp8 = %d must be 0 or 1", c.fc2_input_fp8);
    if (c.fc2_input_fp8 && c.precision != FP4MOE_PRECISION_W4A16)
        return fp4moe_fail(ctx, bad, "fc2_input_fp8 goes with precision w4a16 only");
    if (c.decode_threshold < FP4MOE_DECODE_THRESHOLD_AUTO || c.decode_threshold > MAX_TOKENS_LIMIT)
        return fp4moe_fail(ctx, bad, "decode_threshold = %lld must be in [0, 2^31] or -1 (auto)",
                           (long long)c.decode_threshold);
    if (c.max_tokens < 1 || c.max_tokens > MAX_TOKENS_LIMIT)
        return fp4moe_fail(ctx, bad, "max_tokens = %lld must be in [1, 2^31]",
                           (long long)c.max_tokens);
    if (out != NULL) *out = c;
    return FP4MOE_SUCCESS;
}

fp4moe_status fp4moe_config_validate(fp4moe_context *ctx, const fp4moe_config *cfg)
{
    fp4moe_clear_error(ctx);
    return plan_normalise_config(ctx, cfg, NULL);
}

int plan_routing_takes_bias(fp4moe_routing routing)
{
    return routing == FP4MOE_ROUTING_SOFTMAX_TOPK || routing == FP4MOE_ROUTING_RENORMALIZE ||
           routing == FP4MOE_ROUTING_RENORMALIZE_NAIVE || routing == FP4MOE_ROUTING_DEEPSEEK_V3 ||
           routing == FP4MOE_ROUTING_MINIMAX2;
}

int64_t plan_w1_bytes(const fp4moe_config *cfg)
{
    return cfg->local_num_experts * fp4moe_config_fc1_rows(cfg) * (cfg->hidden_size / 2);
}

int64_t plan_w1_scale_bytes(const fp4moe_config *cfg)
{
    return cfg->local_num_experts * fp4moe_config_fc1_rows(cfg) * (cfg->hidden_size / 16);
}

int64_t plan_w2_bytes(const fp4moe_config *cfg)
{
    return cfg->local_num_experts * cfg->hidden_size * (cfg->intermediate_size / 2);
}

int64_t plan_w2_scale_bytes(const fp4moe_config *cfg)
{
    return cfg->local_num_experts * cfg->hidden_size * (cfg->intermediate_size / 16);
}
