/* Random NVFP4 layers for demo and bench. */
#include "synthetic.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t next_u64(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ull;
}

void synthetic_fill_normal(float *x, int64_t n, float stddev, uint64_t seed)
{
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    /* Sum of four uniforms, scaled to unit variance: close enough to a normal for weights,
     * and several times faster than Box-Muller on a 604M-value layer. */
    const float scale = stddev * sqrtf(3.0f) / 65536.0f;
    for (int64_t i = 0; i < n; i++) {
        uint64_t r = next_u64(&s);
        int32_t sum = (int32_t)(r & 0xffff) + (int32_t)((r >> 16) & 0xffff) +
                      (int32_t)((r >> 32) & 0xffff) + (int32_t)(r >> 48) - 2 * 65536;
        x[i] = (float)sum * scale;
    }
}

static void *own(synthetic_layer *l, size_t bytes)
{
    if (l->num_owned >= (int)(sizeof l->owned / sizeof l->owned[0])) return NULL;
    void *p = malloc(bytes ? bytes : 1);
    if (p != NULL) l->owned[l->num_owned++] = p;
    return p;
}

static void fill_random_codes(uint8_t *packed, int64_t packed_bytes, uint8_t *scales,
                              int64_t scale_count, uint64_t seed)
{
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 7;
    for (int64_t i = 0; i < packed_bytes; i += 8) {
        uint64_t r = next_u64(&s);
        int64_t n = packed_bytes - i < 8 ? packed_bytes - i : 8;
        memcpy(packed + i, &r, (size_t)n);
    }
    /* E4M3 codes 0x30..0x47: 0.5 .. 3.75, the range a real quantiser produces for most blocks. */
    for (int64_t i = 0; i < scale_count; i++) scales[i] = (uint8_t)(0x30 + next_u64(&s) % 24);
}

/* Quantises experts [experts, rows, cols] of N(0, 1/sqrt(cols)) weights, one expert at a time
 * (bounded memory), experts spread over threads. */
static int quantise_random(int64_t experts, int64_t rows, int64_t cols, uint64_t seed,
                           uint8_t *packed, uint8_t *scales, float *global)
{
    int failed = 0;
#pragma omp parallel
    {
        float *x = malloc((size_t)(rows * cols) * sizeof(float));
        if (x == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t e = 0; e < experts; e++) {
            if (x == NULL) continue;
            synthetic_fill_normal(x, rows * cols, 1.0f / sqrtf((float)cols), seed + (uint64_t)e);
            fp4moe_status st = fp4moe_nvfp4_quantize_experts(
                NULL, x, FP4MOE_DTYPE_F32, 1, rows, cols, packed + e * rows * (cols / 2),
                scales + e * rows * (cols / 16), FP4MOE_SCALE_LINEAR, global + e);
            if (st != FP4MOE_SUCCESS) {
#pragma omp atomic write
                failed = 1;
            }
        }
        free(x);
    }
    return failed;
}

int synthetic_layer_create(const fp4moe_config *cfg, int routing_bias, int biases,
                           synthetic_mode mode, uint64_t seed, synthetic_layer *out)
{
    memset(out, 0, sizeof *out);
    out->cfg = *cfg;
    const int64_t e = cfg->num_experts;
    const int64_t e_loc = cfg->local_num_experts ? cfg->local_num_experts : e - cfg->local_expert_offset;
    const int64_t n1 = fp4moe_config_fc1_rows(cfg), h = cfg->hidden_size, i = cfg->intermediate_size;
    fp4moe_weights *w = &out->weights;
    uint8_t *w1 = own(out, (size_t)(e_loc * n1 * h / 2));
    uint8_t *w1s = own(out, (size_t)(e_loc * n1 * h / 16));
    float *g1 = own(out, (size_t)e_loc * sizeof(float));
    uint8_t *w2 = own(out, (size_t)(e_loc * h * i / 2));
    uint8_t *w2s = own(out, (size_t)(e_loc * h * i / 16));
    float *g2 = own(out, (size_t)e_loc * sizeof(float));
    if (!w1 || !w1s || !g1 || !w2 || !w2s || !g2) goto oom;
    if (mode == SYNTHETIC_QUANTISED) {
        if (quantise_random(e_loc, n1, h, seed, w1, w1s, g1) ||
            quantise_random(e_loc, h, i, seed + 1000003, w2, w2s, g2)) {
            fprintf(stderr, "fp4moe: quantising the random weights failed\n");
            synthetic_layer_free(out);
            return 1;
        }
    } else {
        fill_random_codes(w1, e_loc * n1 * h / 2, w1s, e_loc * n1 * h / 16, seed);
        fill_random_codes(w2, e_loc * h * i / 2, w2s, e_loc * h * i / 16, seed + 1);
        /* |code * scale| averages ~3; scale the rows to the N(0, 1/sqrt(K)) weights' size. */
        for (int64_t x = 0; x < e_loc; x++) {
            g1[x] = 1.0f / (3.0f * sqrtf((float)h));
            g2[x] = 1.0f / (3.0f * sqrtf((float)i));
        }
    }
    w->w1 = w1, w->w1_scale = w1s, w->w1_global_scale = g1;
    w->w2 = w2, w->w2_scale = w2s, w->w2_global_scale = g2;
    if (routing_bias) {
        float *b = own(out, (size_t)e * sizeof(float));
        if (!b) goto oom;
        /* Small beside the spread of the top sigmoid scores (logits of sd 2 put the chosen
         * ones within ~0.05 of each other): a bias of sd 0.1 steered every token to the same
         * experts (deepseek-v3, T = 1024: 133 of 256 experts touched, the busiest with 311
         * slots for a mean of 32), a load no trained model has, as its bias exists to balance
         * the load. At sd 0.001 the load is balanced (docs/PERF.md, "Routing of the
         * benchmarks"). */
        synthetic_fill_normal(b, e, 0.001f, seed + 17);
        w->routing_bias = b;
    }
    if (biases) {
        float *b1 = own(out, (size_t)(e_loc * n1) * sizeof(float));
        float *b2 = own(out, (size_t)(e_loc * h) * sizeof(float));
        if (!b1 || !b2) goto oom;
        synthetic_fill_normal(b1, e_loc * n1, 0.1f, seed + 19);
        synthetic_fill_normal(b2, e_loc * h, 0.1f, seed + 23);
        w->b1 = b1, w->b2 = b2;
    }
    if (cfg->precision == FP4MOE_PRECISION_W4A4 || cfg->fc2_input_fp8) {
        /* Calibrated activation scales for N(0,1) inputs: amax about 4.5. */
        float *a1 = own(out, (size_t)e_loc * sizeof(float));
        float *a2 = own(out, (size_t)e_loc * sizeof(float));
        if (!a1 || !a2) goto oom;
        for (int64_t x = 0; x < e_loc; x++) a1[x] = a2[x] = 6.0f * 448.0f / 4.5f;
        if (cfg->precision == FP4MOE_PRECISION_W4A4) w->a1_global_scale = a1, w->a2_global_scale = a2;
        else {
            for (int64_t x = 0; x < e_loc; x++) a2[x] = 448.0f / 4.5f;
            w->fc2_input_fp8_scale = a2;
        }
    }
    return 0;
oom:
    fprintf(stderr, "fp4moe: out of memory building a random layer\n");
    synthetic_layer_free(out);
    return 1;
}

void synthetic_layer_free(synthetic_layer *layer)
{
    for (int i = 0; i < layer->num_owned; i++) free(layer->owned[i]);
    memset(layer, 0, sizeof *layer);
}
