/* Random layers for demo and bench: weights drawn N(0, 1/sqrt(K)) and quantised to NVFP4 by the
 * library's own quantiser (the real thing), or random codes with realistic scales (fast, for
 * benchmarks of large presets where only the bytes matter). */
#ifndef FP4MOE_CLI_SYNTHETIC_H
#define FP4MOE_CLI_SYNTHETIC_H

#include <stdint.h>

#include "fp4moe.h"

typedef struct synthetic_layer {
    fp4moe_config cfg;
    fp4moe_weights weights; /* points into the owned buffers below */
    void *owned[16];
    int num_owned;
} synthetic_layer;

typedef enum synthetic_mode {
    SYNTHETIC_QUANTISED = 0,   /* random FP32 weights through fp4moe_nvfp4_quantize_experts */
    SYNTHETIC_RANDOM_CODES = 1 /* random E2M1 codes and E4M3 scales around 2^-2 .. 2^1 */
} synthetic_mode;

/* Returns 0 on success (prints the reason on failure). */
int synthetic_layer_create(const fp4moe_config *cfg, int routing_bias, int biases,
                           synthetic_mode mode, uint64_t seed, synthetic_layer *out);
void synthetic_layer_free(synthetic_layer *layer);

/* n values of a normal distribution with the given deviation (approximate: sum of uniforms). */
void synthetic_fill_normal(float *x, int64_t n, float stddev, uint64_t seed);

#endif
