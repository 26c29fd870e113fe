/* Model presets: the routed-expert shapes of real MoE layers (spec section 8). */
#ifndef FP4MOE_CLI_PRESETS_H
#define FP4MOE_CLI_PRESETS_H

#include "fp4moe.h"

typedef struct preset {
    const char *name;
    fp4moe_config cfg;
    int has_routing_bias;
    int has_biases; /* b1, b2 (gpt-oss) */
} preset;

/* Fills *out for a preset name; returns 0 on success. */
int preset_find(const char *name, preset *out);
/* The names, NULL-terminated. */
const char *const *preset_names(void);

#endif
