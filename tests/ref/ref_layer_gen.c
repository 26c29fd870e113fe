/* Random layers for the tests: FP32 weights N(0, 1/sqrt(K)) quantised to NVFP4 by the spec's
 * algorithm (an own, plain implementation, so the tests do not trust the library's quantiser),
 * random biases, routing bias and SwiGLU parameters, and activation scales calibrated on a
 * random batch as ModelOpt would. Never zeros. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ref_moe.h"

void ref_random_fill(testing_rng *rng, void *data, fp4moe_dtype dtype, int64_t n, double stddev)
{
    for (int64_t i = 0; i < n; i++) {
        double v;
        do {
            v = ref_round_dtype(stddev * testing_normal(rng), dtype);
        } while (v == 0.0);
        ref_store(data, dtype, i, v);
    }
}

/* The spec's quantiser (section 2) on one row, to codes: FP32 arithmetic, IEEE division. */
static void quantise_row(const float *x, int64_t cols, float g, uint8_t *packed, uint8_t *scales)
{
    const float rcp6 = 1.0f / 6.0f, rcp_g = 1.0f / g;
    for (int64_t b = 0; b < cols / 16; b++) {
        float amax = 0.0f;
        for (int i = 0; i < 16; i++) amax = fmaxf(amax, fabsf(x[b * 16 + i]));
        const double s = ref_round_e4m3(g * (amax * rcp6));
        scales[b] = ref_encode_e4m3(s);
        const float out_scale = amax != 0.0f ? 1.0f / ((float)s * rcp_g) : 0.0f;
        for (int i = 0; i < 16; i += 2) {
            uint8_t lo = ref_encode_e2m1(ref_round_e2m1(x[b * 16 + i] * out_scale));
            uint8_t hi = ref_encode_e2m1(ref_round_e2m1(x[b * 16 + i + 1] * out_scale));
            packed[b * 8 + i / 2] = (uint8_t)(lo | (hi << 4));
        }
    }
}

static float amax_of(const float *x, int64_t n)
{
    float a = 0.0f;
    for (int64_t i = 0; i < n; i++) a = fmaxf(a, fabsf(x[i]));
    return a;
}

/* Rows [row0, row1) of a [rows, cols] matrix with one quantisation scale from their amax;
 * returns the dequantisation scale 1/g. */
static float quantise_rows(const float *x, int64_t row0, int64_t row1, int64_t cols,
                           uint8_t *packed, uint8_t *scales)
{
    const float g = 6.0f * 448.0f / amax_of(x + row0 * cols, (row1 - row0) * cols);
    for (int64_t r = row0; r < row1; r++)
        quantise_row(x + r * cols, cols, g, packed + r * (cols / 2), scales + r * (cols / 16));
    return 1.0f / g;
}

static void *own(ref_layer *layer, size_t bytes)
{
    if (layer->num_owned >= (int)(sizeof layer->owned / sizeof layer->owned[0])) return NULL;
    void *p = calloc(bytes ? bytes : 1, 1);
    if (p) layer->owned[layer->num_owned++] = p;
    return p;
}

void ref_layer_free(ref_layer *layer)
{
    for (int i = 0; i < layer->num_owned; i++) free(layer->owned[i]);
    layer->num_owned = 0;
    memset(&layer->w, 0, sizeof layer->w);
}

static float *random_floats(ref_layer *layer, testing_rng *rng, int64_t n, double mean, double spread)
{
    float *p = own(layer, (size_t)n * sizeof(float));
    if (p)
        for (int64_t i = 0; i < n; i++) p[i] = (float)(mean + spread * (testing_uniform(rng) - 0.5) * 2.0);
    return p;
}

int ref_layer_generate(ref_layer *layer, const fp4moe_config *cfg, const ref_gen_options *opt,
                       testing_rng *rng)
{
    memset(layer, 0, sizeof *layer);
    layer->cfg = *cfg;
    const int64_t H = cfg->hidden_size, I = cfg->intermediate_size, N1 = ref_fc1_rows(cfg);
    const int64_t E = cfg->num_experts, e_loc = ref_local_experts(cfg);
    const int gated = N1 == 2 * I;
    fp4moe_weights *w = &layer->w;

    uint8_t *w1 = own(layer, (size_t)(e_loc * N1 * H / 2));
    uint8_t *w1s = own(layer, (size_t)(e_loc * N1 * H / 16));
    float *w1g = own(layer, (size_t)e_loc * sizeof(float));
    float *w1g2 = (gated && opt->half2_scale) ? own(layer, (size_t)e_loc * sizeof(float)) : NULL;
    uint8_t *w2 = own(layer, (size_t)(e_loc * H * I / 2));
    uint8_t *w2s = own(layer, (size_t)(e_loc * H * I / 16));
    float *w2g = own(layer, (size_t)e_loc * sizeof(float));
    float *dense = malloc((size_t)((N1 > H ? N1 : H) * (H > I ? H : I)) * sizeof(float));
    float *calib = malloc((size_t)(8 * H) * sizeof(float));
    if (!w1 || !w1s || !w1g || (gated && opt->half2_scale && !w1g2) || !w2 || !w2s || !w2g ||
        !dense || !calib)
        goto fail;
    for (int64_t e = 0; e < e_loc; e++) {
        ref_random_fill(rng, dense, FP4MOE_DTYPE_F32, N1 * H, 1.0 / sqrt((double)H));
        /* a per-half scale only differs when the halves' amax differ: make them */
        if (w1g2)
            for (int64_t i = I * H; i < N1 * H; i++) dense[i] *= 1.7f;
        uint8_t *p = w1 + e * N1 * (H / 2), *sc = w1s + e * N1 * (H / 16);
        if (w1g2) {
            w1g[e] = quantise_rows(dense, 0, I, H, p, sc);
            w1g2[e] = quantise_rows(dense, I, N1, H, p, sc);
        } else {
            w1g[e] = quantise_rows(dense, 0, N1, H, p, sc);
        }
        ref_random_fill(rng, dense, FP4MOE_DTYPE_F32, H * I, 1.0 / sqrt((double)I));
        w2g[e] = quantise_rows(dense, 0, H, I, w2 + e * H * (I / 2), w2s + e * H * (I / 16));
    }
    w->w1 = w1;
    w->w1_scale = w1s;
    w->w1_global_scale = w1g;
    w->w1_global_scale_half2 = w1g2;
    w->w2 = w2;
    w->w2_scale = w2s;
    w->w2_global_scale = w2g;
    w->w1_scale_layout = FP4MOE_SCALE_LINEAR;
    w->w2_scale_layout = FP4MOE_SCALE_LINEAR;
    if (opt->biases) {
        float *b1 = own(layer, (size_t)(e_loc * N1) * sizeof(float));
        float *b2 = own(layer, (size_t)(e_loc * H) * sizeof(float));
        if (!b1 || !b2) goto fail;
        ref_random_fill(rng, b1, FP4MOE_DTYPE_F32, e_loc * N1, 0.5);
        ref_random_fill(rng, b2, FP4MOE_DTYPE_F32, e_loc * H, 0.1);
        w->b1 = b1;
        w->b2 = b2;
    }
    if (opt->routing_bias) {
        float *rb = own(layer, (size_t)E * sizeof(float));
        if (!rb) goto fail;
        ref_random_fill(rng, rb, FP4MOE_DTYPE_F32, E, 0.3);
        w->routing_bias = rb;
    }
    if (opt->per_expert_swiglu) {
        w->swiglu_alpha = random_floats(layer, rng, e_loc, 1.5, 0.5);
        w->swiglu_beta = random_floats(layer, rng, e_loc, 0.5, 0.5);
        w->swiglu_limit = random_floats(layer, rng, e_loc, 2.5, 1.5);
        if (!w->swiglu_alpha || !w->swiglu_beta || !w->swiglu_limit) goto fail;
    }
    w->a1_global_scale = own(layer, (size_t)e_loc * sizeof(float));
    w->a2_global_scale = own(layer, (size_t)e_loc * sizeof(float));
    w->fc2_input_fp8_scale = own(layer, (size_t)e_loc * sizeof(float));
    if (!w->a1_global_scale || !w->a2_global_scale || !w->fc2_input_fp8_scale) goto fail;
    ref_random_fill(rng, calib, FP4MOE_DTYPE_F32, 8 * H, 1.0);
    if (ref_layer_calibrate(layer, calib, 8) != 0) goto fail;
    free(dense);
    free(calib);
    return 0;
fail:
    free(dense);
    free(calib);
    ref_layer_free(layer);
    return -1;
}

fp4moe_weights ref_weights_slice(const fp4moe_config *c, const fp4moe_weights *all, int64_t e0)
{
    const int64_t n1 = ref_fc1_rows(c), h = c->hidden_size, inter = c->intermediate_size;
    fp4moe_weights w = *all;
#define SLICE(field, per) \
    if (w.field) w.field += e0 * (per)
    SLICE(w1, n1 * h / 2);
    SLICE(w1_scale, n1 * h / 16);
    SLICE(w1_global_scale, 1);
    SLICE(w1_global_scale_half2, 1);
    SLICE(w2, h * inter / 2);
    SLICE(w2_scale, h * inter / 16);
    SLICE(w2_global_scale, 1);
    SLICE(b1, n1);
    SLICE(b2, h);
    SLICE(a1_global_scale, 1);
    SLICE(a2_global_scale, 1);
    SLICE(fc2_input_fp8_scale, 1);
    SLICE(swiglu_alpha, 1);
    SLICE(swiglu_beta, 1);
    SLICE(swiglu_limit, 1);
#undef SLICE
    return w;
}

fp4moe_weights ref_layer_slice_weights(const ref_layer *layer, int64_t e0)
{
    return ref_weights_slice(&layer->cfg, &layer->w, e0);
}
