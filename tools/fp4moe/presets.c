/* The preset table. Values from the models' published configs (spec section 8). */
#include "presets.h"

#include <string.h>

static const char *const names[] = {"qwen3-30b-a3b",       "nemotron3-nano-30b-a3b",
                                    "nemotron3-super-120b-a12b", "deepseek-v3",
                                    "gpt-oss-120b",        "llama4-scout",
                                    NULL};

const char *const *preset_names(void) { return names; }

int preset_find(const char *name, preset *out)
{
    memset(out, 0, sizeof *out);
    fp4moe_config *c = &out->cfg;
    fp4moe_config_init(c);
    if (strcmp(name, "qwen3-30b-a3b") == 0) {
        c->num_experts = 128, c->top_k = 8, c->hidden_size = 2048, c->intermediate_size = 768;
        c->activation = FP4MOE_ACT_SWIGLU;
        c->routing = FP4MOE_ROUTING_RENORMALIZE_NAIVE;
    } else if (strcmp(name, "nemotron3-nano-30b-a3b") == 0 ||
               strcmp(name, "nemotron3-super-120b-a12b") == 0) {
        int super = name[10] == 's';
        c->num_experts = super ? 512 : 128, c->top_k = super ? 22 : 6;
        c->hidden_size = super ? 1024 : 2688, c->intermediate_size = super ? 2688 : 1856;
        c->activation = FP4MOE_ACT_RELU2;
        c->routing = FP4MOE_ROUTING_DEEPSEEK_V3;
        c->n_group = 1, c->topk_group = 1, c->norm_topk_prob = 1, c->routed_scaling_factor = 2.5f;
        out->has_routing_bias = 1;
    } else if (strcmp(name, "deepseek-v3") == 0) {
        c->num_experts = 256, c->top_k = 8, c->hidden_size = 7168, c->intermediate_size = 2048;
        c->activation = FP4MOE_ACT_SWIGLU;
        c->routing = FP4MOE_ROUTING_DEEPSEEK_V3;
        c->n_group = 8, c->topk_group = 4, c->norm_topk_prob = 1, c->routed_scaling_factor = 2.5f;
        out->has_routing_bias = 1;
    } else if (strcmp(name, "gpt-oss-120b") == 0) {
        c->num_experts = 128, c->top_k = 4, c->hidden_size = 2880, c->intermediate_size = 2880;
        c->activation = FP4MOE_ACT_SWIGLU;
        c->swiglu_alpha = 1.702f, c->swiglu_beta = 1.0f, c->swiglu_limit = 7.0f;
        c->routing = FP4MOE_ROUTING_RENORMALIZE;
        out->has_biases = 1;
    } else if (strcmp(name, "llama4-scout") == 0) {
        c->num_experts = 16, c->top_k = 1, c->hidden_size = 5120, c->intermediate_size = 8192;
        c->activation = FP4MOE_ACT_SWIGLU;
        c->routing = FP4MOE_ROUTING_LLAMA4;
    } else {
        return 1;
    }
    for (const char *const *n = names; *n; n++)
        if (strcmp(*n, name) == 0) out->name = *n;
    return 0;
}
