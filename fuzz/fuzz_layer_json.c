/* libFuzzer target: layer_config_from_json on arbitrary text. An accepted configuration must
 * survive layer_config_to_json -> layer_config_from_json unchanged. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "io/layer_json.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fp4moe_config cfg, back;
    char err[256];
    if (layer_config_from_json((const char *)data, size, &cfg, err, sizeof err) != 0) {
        if (memchr(err, '\0', sizeof err) == NULL) abort();
        return 0;
    }
    char *text = layer_config_to_json(&cfg);
    if (text == NULL) abort(); /* everything the parser accepts must be writable */
    if (layer_config_from_json(text, strlen(text), &back, err, sizeof err) != 0) abort();
    free(text);
    /* Field by field: the struct may hold padding. Floats compare as values (-0 == 0). */
    if (cfg.num_experts != back.num_experts || cfg.top_k != back.top_k ||
        cfg.hidden_size != back.hidden_size || cfg.intermediate_size != back.intermediate_size ||
        cfg.activation != back.activation || cfg.swiglu_alpha != back.swiglu_alpha ||
        cfg.swiglu_beta != back.swiglu_beta || cfg.swiglu_limit != back.swiglu_limit ||
        cfg.gate_up_order != back.gate_up_order || cfg.routing != back.routing ||
        cfg.n_group != back.n_group || cfg.topk_group != back.topk_group ||
        cfg.norm_topk_prob != back.norm_topk_prob ||
        cfg.routed_scaling_factor != back.routed_scaling_factor ||
        cfg.apply_router_weight_on_input != back.apply_router_weight_on_input ||
        cfg.local_expert_offset != back.local_expert_offset ||
        cfg.local_num_experts != back.local_num_experts || cfg.precision != back.precision ||
        cfg.fc2_input_fp8 != back.fc2_input_fp8 || cfg.decode_threshold != back.decode_threshold ||
        cfg.max_tokens != back.max_tokens)
        abort();
    return 0;
}
