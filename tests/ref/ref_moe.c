/* The float64 reference layer: see ref_moe.h. Plain loops, no cleverness: every step of
 * docs/DESIGN.md "The function, exactly" appears once, in order, in ref_forward. */
#include "ref_moe.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ number formats */
/* A format with mant_bits stored mantissa bits, smallest normal exponent emin and largest
 * finite value max_finite. Rounding divides by the quantum at x's binade (a power of two, so
 * exact) and rounds to the nearest integer, ties to even, which is the even-mantissa rule. */
typedef struct ref_format {
    int mant_bits;
    int emin;
    double max_finite;
    int saturate; /* 1: clamp to max_finite (satfinite); 0: overflow to inf */
} ref_format;

static const ref_format format_e2m1 = {1, 0, 6.0, 1};
static const ref_format format_e4m3 = {3, -6, 448.0, 1};
static const ref_format format_bf16 = {7, -126, 3.38953138925153547590470800371487866880e38, 0};
static const ref_format format_f16 = {10, -14, 65504.0, 0};

static double quantum_of(const ref_format *f, double a)
{
    int e;
    frexp(a, &e); /* a in [2^(e-1), 2^e) */
    e -= 1;
    if (e < f->emin) e = f->emin;
    return ldexp(1.0, e - f->mant_bits);
}

static double clip_format(const ref_format *f, double r)
{
    if (r > f->max_finite) return f->saturate ? f->max_finite : INFINITY;
    return r;
}

static double round_magnitude(const ref_format *f, double x)
{
    if (isnan(x) || x == 0.0) return x;
    double a = fabs(x);
    if (isinf(a)) return copysign(f->saturate ? f->max_finite : INFINITY, x);
    double q = quantum_of(f, a);
    return copysign(clip_format(f, nearbyint(a / q) * q), x);
}

/* Rounds x to format f. When ties is given, counts x as a near tie if a rounding boundary lies
 * within REF_NEAR_TIE_REL * max(|x|, mag) of it (rounding is monotone: the ends of that window
 * round differently), where mag is the typical magnitude of x's row; the jump a flip would make,
 * relative to mag, is accumulated squared. */
static double round_format(const ref_format *f, double x, double mag, ref_tie_counter *ties)
{
    if (ties) {
        const double window = REF_NEAR_TIE_REL * fmax(fabs(x), mag);
        ties->total++;
        /* a boundary inside the window only matters when the jump across it dwarfs the window:
         * tiny values round on a grid finer than the FP32 noise, and a flip there is noise too */
        const double below = round_magnitude(f, x - window), above = round_magnitude(f, x + window);
        if (window > 0 && below != above && fabs(above - below) > 4.0 * window) {
            ties->near_ties++;
            if (mag > 0) ties->jump_sq += (above - below) * (above - below) / (mag * mag);
        }
    }
    return round_magnitude(f, x);
}

double ref_round_e2m1(double x) { return round_format(&format_e2m1, x, 0, NULL); }
double ref_round_e4m3(double x) { return round_format(&format_e4m3, x, 0, NULL); }
double ref_round_bf16(double x) { return round_format(&format_bf16, x, 0, NULL); }
double ref_round_f16(double x) { return round_format(&format_f16, x, 0, NULL); }

double ref_e2m1_value(uint8_t code)
{
    int e = (code >> 1) & 3, m = code & 1;
    double v = e == 0 ? 0.5 * m : ldexp(1.0 + 0.5 * m, e - 1);
    return (code & 8) ? -v : v;
}

double ref_e4m3_value(uint8_t code)
{
    int e = (code >> 3) & 15, m = code & 7;
    if (e == 15 && m == 7) return NAN;
    double v = e == 0 ? ldexp((double)m, -9) : ldexp(1.0 + m / 8.0, e - 7);
    return (code & 0x80) ? -v : v;
}

double ref_bf16_value(uint16_t bits)
{
    uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

double ref_f16_value(uint16_t bits)
{
    int e = (bits >> 10) & 31, m = bits & 1023;
    double v;
    if (e == 31)
        v = m ? NAN : INFINITY;
    else if (e == 0)
        v = ldexp((double)m, -24);
    else
        v = ldexp(1.0 + m / 1024.0, e - 15);
    return (bits & 0x8000) ? -v : v;
}

uint8_t ref_encode_e2m1(double x)
{
    for (uint8_t c = 0; c < 16; c++)
        if (ref_e2m1_value(c) == x && (signbit(x) != 0) == ((c & 8) != 0)) return c;
    return 0x7;
}

uint8_t ref_encode_e4m3(double x)
{
    for (unsigned c = 0; c < 256; c++)
        if (ref_e4m3_value((uint8_t)c) == x && (signbit(x) != 0) == ((c & 0x80) != 0))
            return (uint8_t)c;
    return 0x7f;
}

uint16_t ref_encode_bf16(double x)
{
    if (isnan(x)) return 0x7fc0;
    float f = (float)ref_round_bf16(x); /* exact: a bf16 value is a float */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)(u >> 16);
}

uint16_t ref_encode_f16(double x)
{
    if (isnan(x)) return 0x7e00;
    double r = ref_round_f16(x);
    uint16_t sign = signbit(r) ? 0x8000 : 0;
    double a = fabs(r);
    if (isinf(a)) return sign | 0x7c00;
    if (a < ldexp(1.0, -14)) return sign | (uint16_t)(a * ldexp(1.0, 24));
    int e;
    frexp(a, &e);
    e -= 1;
    uint16_t mant = (uint16_t)((ldexp(a, -e) - 1.0) * 1024.0);
    return sign | (uint16_t)((e + 15) << 10) | mant;
}

size_t ref_dtype_bytes(fp4moe_dtype dtype)
{
    return dtype == FP4MOE_DTYPE_F32 ? 4 : (dtype == FP4MOE_DTYPE_F16 || dtype == FP4MOE_DTYPE_BF16) ? 2 : 0;
}

double ref_load(const void *data, fp4moe_dtype dtype, int64_t i)
{
    if (dtype == FP4MOE_DTYPE_F32) return ((const float *)data)[i];
    if (dtype == FP4MOE_DTYPE_F16) return ref_f16_value(((const uint16_t *)data)[i]);
    if (dtype == FP4MOE_DTYPE_BF16) return ref_bf16_value(((const uint16_t *)data)[i]);
    return NAN;
}

void ref_store(void *data, fp4moe_dtype dtype, int64_t i, double value)
{
    if (dtype == FP4MOE_DTYPE_F32) ((float *)data)[i] = (float)value;
    if (dtype == FP4MOE_DTYPE_F16) ((uint16_t *)data)[i] = ref_encode_f16(value);
    if (dtype == FP4MOE_DTYPE_BF16) ((uint16_t *)data)[i] = ref_encode_bf16(value);
}

double ref_round_dtype(double x, fp4moe_dtype dtype)
{
    if (dtype == FP4MOE_DTYPE_F16) return ref_round_f16(x);
    if (dtype == FP4MOE_DTYPE_BF16) return ref_round_bf16(x);
    return (float)x;
}

/* Rounding to a 16-bit activation dtype with near-tie counting (F32: unchanged, the contract's
 * round_act is the identity there and the reference keeps its double). */
static double round_act(double x, fp4moe_dtype dtype, double mag, ref_tie_counter *ties)
{
    if (dtype == FP4MOE_DTYPE_F16) return round_format(&format_f16, x, mag, ties);
    if (dtype == FP4MOE_DTYPE_BF16) return round_format(&format_bf16, x, mag, ties);
    return x;
}

static double rms_of(const double *x, int64_t n)
{
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += x[i] * x[i];
    return n > 0 ? sqrt(s / (double)n) : 0.0;
}

/* ------------------------------------------------------------------ NVFP4 activation quantiser */
void ref_nvfp4_fake_quantize(const float *x, int64_t cols, float g, double *out,
                             ref_tie_counter *ties)
{
    double sum_sq = 0;
    for (int64_t i = 0; i < cols; i++) sum_sq += (double)x[i] * x[i];
    const double row_rms = sqrt(sum_sq / (double)cols);
    const float rcp6 = 1.0f / 6.0f; /* rcp(6) of the spec, IEEE division standing in */
    const float rcp_g = 1.0f / g;
    for (int64_t b = 0; b < cols; b += 16) {
        float amax = 0.0f;
        for (int i = 0; i < 16; i++) amax = fmaxf(amax, fabsf(x[b + i]));
        const float sf = g * (amax * rcp6);
        /* a flip of the block scale re-rounds all 16 values: count it as 16 jumps of a quarter
         * of the block's amax */
        ref_tie_counter scale_ties = {0, 0, 0.0};
        const double s = round_format(&format_e4m3, sf, sf, ties ? &scale_ties : NULL);
        if (ties && scale_ties.near_ties) {
            ties->near_ties += 16;
            ties->jump_sq += 16.0 * (0.25 * amax / row_rms) * (0.25 * amax / row_rms);
        }
        /* the spec's step 3 tests amax != 0; "some versions test s != 0": testing both keeps a
         * block whose scale underflows to 0 at 0 instead of 0 * inf = NaN */
        const float out_scale = (amax != 0.0f && s != 0.0) ? 1.0f / ((float)s * rcp_g) : 0.0f;
        for (int i = 0; i < 16; i++) {
            const float v = x[b + i] * out_scale;
            out[b + i] = round_format(&format_e2m1, v, row_rms * out_scale, ties) * s;
        }
    }
}

/* ------------------------------------------------------------------ routing */
int64_t ref_fc1_rows(const fp4moe_config *cfg)
{
    const int gated = cfg->activation == FP4MOE_ACT_SWIGLU || cfg->activation == FP4MOE_ACT_GEGLU ||
                      cfg->activation == FP4MOE_ACT_GEGLU_TANH;
    return gated ? 2 * cfg->intermediate_size : cfg->intermediate_size;
}

int64_t ref_local_experts(const fp4moe_config *cfg)
{
    /* 0: every expert from the offset on (all of them when the offset is 0) */
    return cfg->local_num_experts > 0 ? cfg->local_num_experts
                                      : cfg->num_experts - cfg->local_expert_offset;
}

static double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

typedef struct ranked {
    float key;
    int32_t id;
} ranked;

/* Best first: larger key, then lower id; NaN after every number. */
static int ranked_compare(const void *pa, const void *pb)
{
    const ranked *a = pa, *b = pb;
    int na = isnan(a->key), nb = isnan(b->key);
    if (na != nb) return na ? 1 : -1;
    if (!na && a->key != b->key) return a->key > b->key ? -1 : 1;
    return (a->id > b->id) - (a->id < b->id);
}

static int uses_logit_bias(fp4moe_routing m)
{
    return m == FP4MOE_ROUTING_SOFTMAX_TOPK || m == FP4MOE_ROUTING_RENORMALIZE ||
           m == FP4MOE_ROUTING_RENORMALIZE_NAIVE;
}

/* One token. z: the FP32 logits (+ bias in FP32 for the softmax family). Selection keys are the
 * exact scores rounded once to FP32 (the contract computes scores in FP32: equal FP32 scores
 * tie toward the lower index); weights are computed in double from the same FP32 inputs. */
static void route_one(const fp4moe_config *cfg, const float *bias, const float *logits,
                      int32_t *ids, double *weights, ranked *list, double *score, float *z)
{
    const int64_t E = cfg->num_experts;
    const int k = cfg->top_k;
    const fp4moe_routing m = cfg->routing;
    int any_nan = 0;
    for (int64_t e = 0; e < E; e++) {
        z[e] = (bias && uses_logit_bias(m)) ? logits[e] + bias[e] : logits[e];
        if (isnan(z[e])) any_nan = 1;
    }
    /* score[e]: the quantity selected on, in double */
    if (m == FP4MOE_ROUTING_SOFTMAX_TOPK || m == FP4MOE_ROUTING_RENORMALIZE_NAIVE) {
        double mx = -INFINITY, sum = 0;
        for (int64_t e = 0; e < E; e++)
            if (!isnan(z[e]) && z[e] > mx) mx = z[e];
        for (int64_t e = 0; e < E; e++)
            if (!isnan(z[e])) sum += exp((double)z[e] - mx);
        for (int64_t e = 0; e < E; e++) score[e] = isnan(z[e]) ? NAN : exp((double)z[e] - mx) / sum;
    } else if (m == FP4MOE_ROUTING_SIGMOID || m == FP4MOE_ROUTING_SIGMOID_RENORM) {
        for (int64_t e = 0; e < E; e++) score[e] = sigmoid(z[e]);
    } else if (m == FP4MOE_ROUTING_DEEPSEEK_V3 || m == FP4MOE_ROUTING_MINIMAX2) {
        /* b = s + bias: the sum is FP32 in the contract */
        for (int64_t e = 0; e < E; e++) {
            float s = (float)sigmoid(z[e]);
            score[e] = bias ? (double)(s + bias[e]) : (double)s;
        }
    } else {
        for (int64_t e = 0; e < E; e++) score[e] = z[e];
    }

    int64_t n = 0;
    if (m == FP4MOE_ROUTING_DEEPSEEK_V3 && cfg->topk_group < cfg->n_group) {
        const int64_t G = cfg->n_group, gs = E / G;
        ranked *groups = list + E; /* list has room for 2E */
        for (int64_t g = 0; g < G; g++) {
            for (int64_t i = 0; i < gs; i++) list[i] = (ranked){(float)score[g * gs + i], (int32_t)i};
            qsort(list, (size_t)gs, sizeof *list, ranked_compare);
            float gscore = gs == 1 ? list[0].key : list[0].key + list[1].key; /* FP32 sum */
            groups[g] = (ranked){gscore, (int32_t)g};
        }
        qsort(groups, (size_t)G, sizeof *groups, ranked_compare);
        for (int64_t r = 0; r < cfg->topk_group; r++) {
            int64_t g = groups[r].id;
            for (int64_t i = 0; i < gs; i++) list[n++] = (ranked){(float)score[g * gs + i], (int32_t)(g * gs + i)};
        }
    } else {
        for (int64_t e = 0; e < E; e++) list[n++] = (ranked){(float)score[e], (int32_t)e};
    }
    qsort(list, (size_t)n, sizeof *list, ranked_compare);
    for (int j = 0; j < k; j++) ids[j] = list[j].id;

    double sum = 0;
    switch (m) {
    case FP4MOE_ROUTING_SOFTMAX_TOPK:
        for (int j = 0; j < k; j++) weights[j] = any_nan ? NAN : score[ids[j]];
        break;
    case FP4MOE_ROUTING_RENORMALIZE_NAIVE:
        for (int j = 0; j < k; j++) sum += any_nan ? NAN : score[ids[j]];
        for (int j = 0; j < k; j++) weights[j] = (any_nan ? NAN : score[ids[j]]) / sum;
        break;
    case FP4MOE_ROUTING_RENORMALIZE: {
        double mx = z[ids[0]];
        for (int j = 0; j < k; j++) sum += exp((double)z[ids[j]] - mx);
        for (int j = 0; j < k; j++) weights[j] = exp((double)z[ids[j]] - mx) / sum;
        break;
    }
    case FP4MOE_ROUTING_TOPK:
        for (int j = 0; j < k; j++) weights[j] = z[ids[j]];
        break;
    case FP4MOE_ROUTING_SIGMOID:
    case FP4MOE_ROUTING_TOPK_SIGMOID:
    case FP4MOE_ROUTING_LLAMA4:
        for (int j = 0; j < k; j++) weights[j] = sigmoid(z[ids[j]]);
        break;
    case FP4MOE_ROUTING_SIGMOID_RENORM:
        for (int j = 0; j < k; j++) sum += sigmoid(z[ids[j]]);
        for (int j = 0; j < k; j++)
            weights[j] = sigmoid(z[ids[j]]) / (cfg->norm_topk_prob ? fmax(sum, 1e-20) : 1.0);
        break;
    case FP4MOE_ROUTING_DEEPSEEK_V3:
        for (int j = 0; j < k; j++) sum += sigmoid(z[ids[j]]);
        for (int j = 0; j < k; j++)
            weights[j] = sigmoid(z[ids[j]]) / (cfg->norm_topk_prob ? sum : 1.0) *
                         (double)cfg->routed_scaling_factor;
        break;
    case FP4MOE_ROUTING_MINIMAX2:
        for (int j = 0; j < k; j++) sum += sigmoid(z[ids[j]]);
        for (int j = 0; j < k; j++)
            weights[j] = sigmoid(z[ids[j]]) * (double)cfg->routed_scaling_factor / (sum + 1e-20);
        break;
    }
}

int ref_route(const ref_layer *layer, int64_t num_tokens, const void *logits,
              fp4moe_dtype logits_dtype, int32_t *ids, double *weights)
{
    const fp4moe_config *cfg = &layer->cfg;
    const int64_t E = cfg->num_experts;
    ranked *list = malloc(2 * (size_t)E * sizeof *list);
    double *score = malloc((size_t)E * sizeof *score);
    float *row = malloc((size_t)E * sizeof *row);
    float *z = malloc((size_t)E * sizeof *z);
    int rc = (list && score && row && z) ? 0 : -1;
    for (int64_t t = 0; rc == 0 && t < num_tokens; t++) {
        for (int64_t e = 0; e < E; e++) row[e] = (float)ref_load(logits, logits_dtype, t * E + e);
        route_one(cfg, layer->w.routing_bias, row, ids + t * cfg->top_k,
                  weights + t * cfg->top_k, list, score, z);
    }
    free(list);
    free(score);
    free(row);
    free(z);
    return rc;
}

/* ------------------------------------------------------------------ activations (spec 5) */
static double gelu_erf(double x) { return 0.5 * x * (1.0 + erf(x / sqrt(2.0))); }
static double gelu_tanh(double x)
{
    const double c = sqrt(2.0 / 3.14159265358979323846);
    return 0.5 * x * (1.0 + tanh(c * (x + 0.044715 * x * x * x)));
}

static double param_or(const float *per_expert, int64_t e, float scalar)
{
    return per_expert ? per_expert[e] : scalar;
}

/* h: FC1 output [N1] (bias added); u: [I]. */
static void activation(const ref_layer *layer, int64_t le, const double *h, double *u)
{
    const fp4moe_config *cfg = &layer->cfg;
    const int64_t I = cfg->intermediate_size;
    const double *gate = cfg->gate_up_order == FP4MOE_GATE_UP ? h : h + I;
    const double *up = cfg->gate_up_order == FP4MOE_GATE_UP ? h + I : h;
    const double alpha = param_or(layer->w.swiglu_alpha, le, cfg->swiglu_alpha);
    const double beta = param_or(layer->w.swiglu_beta, le, cfg->swiglu_beta);
    const double limit = param_or(layer->w.swiglu_limit, le, cfg->swiglu_limit);
    for (int64_t i = 0; i < I; i++) {
        switch (cfg->activation) {
        case FP4MOE_ACT_SWIGLU: {
            double g = fmin(gate[i], limit);
            double v = fmax(fmin(up[i], limit), -limit);
            u[i] = g * sigmoid(alpha * g) * (v + beta);
            break;
        }
        case FP4MOE_ACT_GEGLU: u[i] = gelu_erf(gate[i]) * up[i]; break;
        case FP4MOE_ACT_GEGLU_TANH: u[i] = gelu_tanh(gate[i]) * up[i]; break;
        case FP4MOE_ACT_RELU2: u[i] = h[i] > 0 ? h[i] * h[i] : 0.0; break;
        case FP4MOE_ACT_SILU: u[i] = h[i] * sigmoid(h[i]); break;
        case FP4MOE_ACT_GELU: u[i] = gelu_erf(h[i]); break;
        case FP4MOE_ACT_IDENTITY: u[i] = h[i]; break;
        }
    }
}

/* ------------------------------------------------------------------ the layer */
/* wq = e2m1(code) * e4m3(scale), exact in float, of one expert's [rows, cols] matrix. */
static void dequantise(const uint8_t *packed, const uint8_t *scales, int64_t rows, int64_t cols,
                       float *out)
{
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) {
            uint8_t byte = packed[r * (cols / 2) + c / 2];
            uint8_t code = (c & 1) ? (uint8_t)(byte >> 4) : (uint8_t)(byte & 0xf);
            out[r * cols + c] = (float)(ref_e2m1_value(code) * ref_e4m3_value(scales[r * (cols / 16) + c / 16]));
        }
}

static double dot(const double *a, const float *w, int64_t n)
{
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += a[i] * (double)w[i];
    return s;
}

typedef struct expert_scratch {
    float *wq1, *wq2;        /* [N1, H], [H, I] */
    double *x, *a, *h, *u, *c, *y;
    double *u_alt, *c_alt;   /* step 5 again with u's near ties rounded the other way */
    float *xf;               /* FP32 quantiser input */
} expert_scratch;

/* Step 5: the FC2 input c [I] of expert le from the activation output u (u_rms: its row's RMS,
 * the near ties' magnitude; xf: FP32 scratch); returns its scale sc. */
static float fc2_input(const ref_layer *layer, int64_t le, const double *u, double u_rms, float *xf, double *c,
                       ref_tie_counter *near_ties)
{
    const fp4moe_config *cfg = &layer->cfg;
    const fp4moe_weights *w = &layer->w;
    const int64_t I = cfg->intermediate_size;
    if (cfg->precision == FP4MOE_PRECISION_W4A4) {
        for (int64_t i = 0; i < I; i++) xf[i] = (float)u[i];
        ref_nvfp4_fake_quantize(xf, I, w->a2_global_scale[le], c, near_ties);
        return 1.0f / w->a2_global_scale[le];
    }
    if (cfg->fc2_input_fp8) {
        const float fs = w->fc2_input_fp8_scale[le];
        for (int64_t i = 0; i < I; i++) {
            const float v = (float)u[i] * fs; /* FP32 product */
            c[i] = round_format(&format_e4m3, v, u_rms * fs, near_ties);
        }
        return 1.0f / fs;
    }
    memcpy(c, u, (size_t)I * sizeof *c);
    return 1.0f;
}

/* One (token, slot) through local expert le: x [H] (already scaled with apply-on-input) -> y [H]. */
static void run_expert(const ref_layer *layer, int64_t le, fp4moe_dtype act_dtype,
                       const expert_scratch *s, int exact_input, ref_tie_counter *near_ties)
{
    const fp4moe_config *cfg = &layer->cfg;
    const fp4moe_weights *w = &layer->w;
    const int64_t H = cfg->hidden_size, I = cfg->intermediate_size, N1 = ref_fc1_rows(cfg);
    const int w4a4 = cfg->precision == FP4MOE_PRECISION_W4A4;

    /* step 2: expert input */
    float sa = 1.0f;
    if (w4a4) {
        for (int64_t i = 0; i < H; i++) s->xf[i] = (float)s->x[i];
        ref_nvfp4_fake_quantize(s->xf, H, w->a1_global_scale[le], s->a, exact_input ? NULL : near_ties);
        sa = 1.0f / w->a1_global_scale[le];
    } else {
        memcpy(s->a, s->x, (size_t)H * sizeof *s->a);
    }
    /* step 3: FC1, the scale product in FP32 */
    for (int64_t n = 0; n < N1; n++) {
        const float wg = (n >= I && w->w1_global_scale_half2) ? w->w1_global_scale_half2[le]
                                                              : w->w1_global_scale[le];
        const float scale = sa * wg;
        s->h[n] = dot(s->a, s->wq1 + n * H, H) * (double)scale + (w->b1 ? w->b1[le * N1 + n] : 0.0);
    }
    /* step 4: activation, then round to the activation dtype */
    activation(layer, le, s->h, s->u);
    const double u_rms = rms_of(s->u, I);
    /* A 16-bit u (the activation output) near a rounding boundary may land on either side in a
     * backend, and a quantised FC2 input (E4M3 or NVFP4, steps of 6-33%) then differs by a whole
     * step although u * s is no near tie itself: u_alt keeps the other side, for step 5's second
     * pass. Only u within an eighth of the near-tie window (a few FP32 roundings of u) counts:
     * the whole window made W4A4 tolerances up to 3x wider for flips that hardly happen. */
    const int quantised = w4a4 || cfg->fc2_input_fp8;
    int cascade = 0;
    for (int64_t i = 0; i < I; i++) {
        const double raw = s->u[i];
        s->u[i] = s->u_alt[i] = round_act(raw, act_dtype, u_rms, near_ties);
        if (quantised && act_dtype != FP4MOE_DTYPE_F32) {
            const double window = REF_NEAR_TIE_REL / 8 * fmax(fabs(raw), u_rms);
            const double lo = round_act(raw - window, act_dtype, 0, NULL);
            const double hi = round_act(raw + window, act_dtype, 0, NULL);
            if (lo != hi) s->u_alt[i] = lo == s->u[i] ? hi : lo, cascade = 1;
        }
    }
    /* step 5: FC2 input */
    const float sc = fc2_input(layer, le, s->u, u_rms, s->xf, s->c, near_ties);
    if (cascade && near_ties) {
        /* the FC2 inputs that differ when u's near ties go the other way: near ties of step 5 */
        fc2_input(layer, le, s->u_alt, u_rms, s->xf, s->c_alt, NULL);
        const double mag = rms_of(s->c, I);
        for (int64_t i = 0; i < I; i++) {
            if (s->c_alt[i] == s->c[i] || mag <= 0) continue;
            near_ties->near_ties++;
            near_ties->jump_sq += (s->c_alt[i] - s->c[i]) * (s->c_alt[i] - s->c[i]) / (mag * mag);
        }
    }
    /* step 6: FC2 */
    const float scale2 = sc * w->w2_global_scale[le];
    for (int64_t hh = 0; hh < H; hh++)
        s->y[hh] = dot(s->c, s->wq2 + hh * I, I) * (double)scale2 + (w->b2 ? w->b2[le * H + hh] : 0.0);
}

static void scratch_free(expert_scratch *s)
{
    free(s->wq1);
    free(s->wq2);
    free(s->x);
    free(s->a);
    free(s->h);
    free(s->u);
    free(s->c);
    free(s->y);
    free(s->xf);
    free(s->u_alt);
    free(s->c_alt);
}

static int scratch_alloc(expert_scratch *s, int64_t H, int64_t I, int64_t N1)
{
    memset(s, 0, sizeof *s);
    const int64_t wide = H > N1 ? H : N1;
    s->wq1 = malloc((size_t)(N1 * H) * sizeof(float));
    s->wq2 = malloc((size_t)(H * I) * sizeof(float));
    s->x = malloc((size_t)H * sizeof(double));
    s->a = malloc((size_t)H * sizeof(double));
    s->h = malloc((size_t)N1 * sizeof(double));
    s->u = malloc((size_t)I * sizeof(double));
    s->c = malloc((size_t)I * sizeof(double));
    s->y = malloc((size_t)H * sizeof(double));
    s->xf = malloc((size_t)wide * sizeof(float));
    s->u_alt = malloc((size_t)I * sizeof(double));
    s->c_alt = malloc((size_t)I * sizeof(double));
    if (s->wq1 && s->wq2 && s->x && s->a && s->h && s->u && s->c && s->y && s->xf && s->u_alt && s->c_alt)
        return 0;
    scratch_free(s);
    return -1;
}

/* round_out: F32 keeps the double; a 16-bit output is rounded, its near ties counted. */
static double round_output(double v, fp4moe_dtype dtype, double row_rms, ref_tie_counter *ties)
{
    if (dtype == FP4MOE_DTYPE_F32) return v;
    return round_act(v, dtype, row_rms, ties);
}

int ref_forward(const ref_layer *layer, const ref_args *args, double *out, int32_t *ids_out,
                double *weights_out, ref_stats *stats)
{
    const fp4moe_config *cfg = &layer->cfg;
    const int64_t T = args->num_tokens, H = cfg->hidden_size, I = cfg->intermediate_size;
    const int64_t N1 = ref_fc1_rows(cfg), k = cfg->top_k;
    const int64_t e0 = cfg->local_expert_offset, e_loc = ref_local_experts(cfg);
    const int on_input = cfg->apply_router_weight_on_input || cfg->routing == FP4MOE_ROUTING_LLAMA4;
    ref_stats counts = {{0, 0, 0.0}, {0, 0, 0.0}};
    ref_tie_counter *near_ties = &counts.inner;

    int32_t *ids = malloc((size_t)(T * k) * sizeof *ids);
    double *weights = malloc((size_t)(T * k) * sizeof *weights);
    double *acc = calloc((size_t)(T * H), sizeof *acc);
    expert_scratch s;
    int rc = (ids && weights && acc) ? scratch_alloc(&s, H, I, N1) : -1;
    if (rc != 0) {
        free(ids);
        free(weights);
        free(acc);
        return -1;
    }

    /* step 1: routing */
    if (args->router_logits) {
        rc = ref_route(layer, T, args->router_logits, args->router_logits_dtype, ids, weights);
    } else {
        for (int64_t i = 0; i < T * k; i++) {
            ids[i] = args->topk_ids[i];
            weights[i] = ref_load(args->topk_weights, args->topk_weights_dtype, i);
        }
    }
    const int64_t out_rows = args->finalize ? T : T * k;
    for (int64_t i = 0; i < out_rows * H; i++) out[i] = 0.0;

    for (int64_t le = 0; rc == 0 && le < e_loc; le++) {
        int used = 0;
        for (int64_t i = 0; i < T * k; i++) used |= ids[i] == e0 + le;
        if (!used) continue;
        dequantise(layer->w.w1 + le * N1 * (H / 2), layer->w.w1_scale + le * N1 * (H / 16), N1, H, s.wq1);
        dequantise(layer->w.w2 + le * H * (I / 2), layer->w.w2_scale + le * H * (I / 16), H, I, s.wq2);
        for (int64_t t = 0; t < T; t++) {
            for (int64_t j = 0; j < k; j++) {
                if (ids[t * k + j] != e0 + le) continue;
                double wout = weights[t * k + j];
                for (int64_t i = 0; i < H; i++) s.x[i] = ref_load(args->hidden_states, args->hidden_dtype, t * H + i);
                if (on_input) {
                    /* x = round_act(w * x); the product is FP32 in the library, so its rounding
                     * to a 16-bit dtype (or the W4A4 quantiser) may see a near tie */
                    const double x_rms = rms_of(s.x, H);
                    for (int64_t i = 0; i < H; i++) {
                        double v = wout * s.x[i];
                        s.x[i] = round_act(v, args->hidden_dtype, x_rms * fabs(wout), near_ties);
                    }
                    wout = 1.0;
                }
                run_expert(layer, le, args->hidden_dtype, &s, !on_input, near_ties);
                if (args->finalize) {
                    for (int64_t i = 0; i < H; i++) acc[t * H + i] += wout * s.y[i];
                } else {
                    const double y_rms = rms_of(s.y, H);
                    for (int64_t i = 0; i < H; i++)
                        out[(t * k + j) * H + i] = round_output(s.y[i], args->output_dtype, y_rms, &counts.output);
                }
            }
        }
    }
    if (rc == 0 && args->finalize) {
        for (int64_t t = 0; t < T; t++) {
            const double p = args->per_token_scale ? args->per_token_scale[t] : 1.0;
            for (int64_t i = 0; i < H; i++) acc[t * H + i] *= p;
            const double o_rms = rms_of(acc + t * H, H);
            for (int64_t i = 0; i < H; i++)
                out[t * H + i] = round_output(acc[t * H + i], args->output_dtype, o_rms, &counts.output);
        }
    }
    if (ids_out) memcpy(ids_out, ids, (size_t)(T * k) * sizeof *ids);
    if (weights_out) memcpy(weights_out, weights, (size_t)(T * k) * sizeof *weights);
    if (stats) *stats = counts;
    scratch_free(&s);
    free(ids);
    free(weights);
    free(acc);
    return rc;
}

/* ------------------------------------------------------------------ calibration */
int ref_layer_calibrate(ref_layer *layer, const float *hidden, int64_t num_tokens)
{
    const fp4moe_config *cfg = &layer->cfg;
    const int64_t H = cfg->hidden_size, I = cfg->intermediate_size, N1 = ref_fc1_rows(cfg);
    const int64_t e_loc = ref_local_experts(cfg);
    float *a1 = (float *)layer->w.a1_global_scale, *a2 = (float *)layer->w.a2_global_scale;
    float *fp8 = (float *)layer->w.fc2_input_fp8_scale;
    if (!a1 || !a2 || !fp8) return -1;
    expert_scratch s;
    if (scratch_alloc(&s, H, I, N1) != 0) return -1;
    /* the activation output of the W4A16 path, FP32 activations */
    ref_layer plain = *layer;
    plain.cfg.precision = FP4MOE_PRECISION_W4A16;
    plain.cfg.fc2_input_fp8 = 0;
    double x_amax = 0;
    for (int64_t i = 0; i < num_tokens * H; i++) x_amax = fmax(x_amax, fabs(hidden[i]));
    for (int64_t le = 0; le < e_loc; le++) {
        dequantise(layer->w.w1 + le * N1 * (H / 2), layer->w.w1_scale + le * N1 * (H / 16), N1, H, s.wq1);
        dequantise(layer->w.w2 + le * H * (I / 2), layer->w.w2_scale + le * H * (I / 16), H, I, s.wq2);
        double u_amax = 0;
        for (int64_t t = 0; t < num_tokens; t++) {
            for (int64_t i = 0; i < H; i++) s.x[i] = hidden[t * H + i];
            run_expert(&plain, le, FP4MOE_DTYPE_F32, &s, 1, NULL);
            for (int64_t i = 0; i < I; i++) u_amax = fmax(u_amax, fabs(s.u[i]));
        }
        a1[le] = (float)(6.0 * 448.0 / x_amax);
        a2[le] = (float)(6.0 * 448.0 / u_amax);
        fp8[le] = (float)(448.0 / u_amax);
    }
    scratch_free(&s);
    return 0;
}
