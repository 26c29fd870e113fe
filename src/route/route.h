/* Routing: router logits of one token -> k expert ids and weights, for every method of the
 * spec's table (section 4). The CPU backend calls this per token; the CUDA routing kernels are
 * tested against it. */
#ifndef FP4MOE_ROUTE_H
#define FP4MOE_ROUTE_H

#include <stdint.h>

#include "fp4moe.h"

typedef struct route_params {
    fp4moe_routing method;
    int64_t num_experts; /* E */
    int32_t top_k;
    int32_t n_group;
    int32_t topk_group;
    int32_t norm_topk_prob;
    float routed_scaling_factor;
    const float *bias; /* [E] or NULL */
} route_params;

/* FP32 scratch a call to route_token needs. */
int64_t route_scratch_floats(int64_t num_experts);

/* Routes one token. logits: [E] in FP32. ids: [k] global ids, weights: [k], in the order of
 * selection (best first; ties toward the lower expert index; NaN ranks below every number).
 * Assumes params were validated (plan_normalise_config). */
void route_token(const route_params *params, const float *logits, int32_t *ids, float *weights,
                 float *scratch);

#endif
