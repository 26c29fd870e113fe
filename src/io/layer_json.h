/* The layer configuration as JSON (the CLI's --config), and the names of the enumerations.
 *
 * Keys (all optional; absent keys keep fp4moe_config_init's defaults):
 *   num_experts, top_k, hidden_size, intermediate_size, n_group, topk_group,
 *   local_expert_offset, local_num_experts, decode_threshold, max_tokens      integers
 *   routed_scaling_factor, swiglu_alpha, swiglu_beta                          numbers
 *   swiglu_limit                                                              number, or null = +inf
 *   norm_topk_prob, fc2_input_fp8, apply_router_weight_on_input               true/false
 *   activation    swiglu geglu geglu_tanh relu2 silu gelu identity
 *   routing       softmax_topk renormalize renormalize_naive topk sigmoid sigmoid_renorm
 *                 topk_sigmoid deepseek_v3 llama4 minimax2
 *   precision     w4a16 w4a4
 *   gate_up_order gate_up up_gate
 * Unknown keys, duplicate keys, wrong types and values that do not fit the field are errors that
 * name the key. Whether the values make a valid layer is fp4moe_config_validate's business. */
#ifndef FP4MOE_IO_LAYER_JSON_H
#define FP4MOE_IO_LAYER_JSON_H

#include <stddef.h>

#include "fp4moe.h"

/* A configuration is a few hundred bytes; longer texts are refused before parsing. */
#define LAYER_JSON_MAX_BYTES (1 << 20)

/* 0 on success (cfg filled); nonzero with err set otherwise (cfg then unspecified). text need not
 * be NUL-terminated. */
int layer_config_from_json(const char *text, size_t len, fp4moe_config *cfg, char *err,
                           size_t err_bytes);

/* Every key, in a fixed order, floats printed to round-trip exactly; malloc'd (free with free()).
 * NULL when out of memory or when cfg holds a value JSON cannot carry (an enum out of range, a
 * non-finite float other than swiglu_limit = +inf, which is written as null). */
char *layer_config_to_json(const fp4moe_config *cfg);

/* Names as in the JSON. *_name returns NULL for a value outside the enumeration; *_from_name
 * returns 0 on success, nonzero (and leaves *out alone) for an unknown name. */
const char *activation_name(fp4moe_activation activation);
int activation_from_name(const char *name, fp4moe_activation *out);
const char *routing_name(fp4moe_routing routing);
int routing_from_name(const char *name, fp4moe_routing *out);
const char *precision_name(fp4moe_precision precision);
int precision_from_name(const char *name, fp4moe_precision *out);
const char *gate_up_order_name(fp4moe_gate_up_order order);
int gate_up_order_from_name(const char *name, fp4moe_gate_up_order *out);

#endif
