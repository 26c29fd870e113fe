/* Activation scales (ModelOpt's input_scale = amax / (6*448)) measured from sample inputs.
 *
 * ModelOpt calibrates an MoE layer with every expert seeing every token (so that rarely chosen
 * experts get a scale too); we do the same: FC1's input amax is the amax of the layer's sample
 * hidden states, FC2's input amax per expert is the amax of act(FC1(x)) over all the samples,
 * computed from the unquantised weights in double precision. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/checkpoint.h"

static double activation(fp4moe_activation act, double gate, double up)
{
    switch (act) {
    case FP4MOE_ACT_SWIGLU: return gate / (1.0 + exp(-gate)) * up;
    case FP4MOE_ACT_GEGLU: return 0.5 * gate * (1.0 + erf(gate / sqrt(2.0))) * up;
    case FP4MOE_ACT_GEGLU_TANH:
        return 0.5 * gate * (1.0 + tanh(0.7978845608028654 * (gate + 0.044715 * gate * gate * gate))) * up;
    case FP4MOE_ACT_RELU2: return up > 0 ? up * up : 0.0;
    case FP4MOE_ACT_SILU: return up / (1.0 + exp(-up));
    case FP4MOE_ACT_GELU: return 0.5 * up * (1.0 + erf(up / sqrt(2.0)));
    default: return up;
    }
}

void ckpt_calibration_free(ckpt_calibration *c)
{
    for (int i = 0; i < c->layer_count; i++) free(c->down[i]);
    free(c->down);
    free(c->fc1);
    memset(c, 0, sizeof *c);
}

static float input_scale_of(double amax)
{
    return amax > 0 && isfinite(amax) ? (float)(amax / (6.0 * 448.0)) : 1.0f;
}

/* A float copy of a 2-D float tensor with the expected element count; NULL when absent/wrong. */
static float *load_matrix(const fp4moe_checkpoint *ckpt, const ckpt_layer *L, int64_t j, ckpt_proj p,
                          int64_t count, char *err, size_t err_bytes)
{
    char name[CKPT_MAX_NAME + 64];
    ckpt_expert_tensor_name(name, sizeof name, L, j, p, CKPT_WEIGHT);
    const st_tensor *t = ckpt_find(ckpt, name);
    if (t == NULL || !t->dtype_known || t->bytes != (size_t)count * st_dtype_size(t->dtype) ||
        !(t->dtype == FP4MOE_DTYPE_F32 || t->dtype == FP4MOE_DTYPE_F16 || t->dtype == FP4MOE_DTYPE_BF16)) {
        snprintf(err, err_bytes, "calibration: tensor '%s' is missing or not a float matrix of %lld values",
                 name, (long long)count);
        return NULL;
    }
    float *m = malloc((size_t)count * sizeof(float));
    if (m == NULL) {
        snprintf(err, err_bytes, "calibration: out of memory");
        return NULL;
    }
    for (int64_t i = 0; i < count; i++) m[i] = ckpt_load_float(t->data, t->dtype, i);
    return m;
}

static int calibrate_layer(const fp4moe_checkpoint *ckpt, const ckpt_layer *L, const float *x,
                           int64_t tokens, float *fc1_scale, float *down_scales, char *err,
                           size_t err_bytes)
{
    const int64_t h = L->hidden, n = L->inter;
    double amax_x = 0;
    for (int64_t i = 0; i < tokens * h; i++) amax_x = fmax(amax_x, fabs((double)x[i]));
    *fc1_scale = input_scale_of(amax_x);
    if ((int)L->config.activation < 0) {
        snprintf(err, err_bytes, "calibration: layer '%s': unsupported activation", L->prefix);
        return -1;
    }
    for (int64_t j = 0; j < L->num_experts; j++) {
        float *gate = L->gated ? load_matrix(ckpt, L, j, CKPT_GATE, n * h, err, err_bytes) : NULL;
        float *up = load_matrix(ckpt, L, j, CKPT_UP, n * h, err, err_bytes);
        if (up == NULL || (L->gated && gate == NULL)) {
            free(gate);
            free(up);
            return -1;
        }
        double amax = 0;
        for (int64_t t = 0; t < tokens; t++) {
            const float *row = x + t * h;
            for (int64_t i = 0; i < n; i++) {
                double u = 0, g = 0;
                for (int64_t k = 0; k < h; k++) u += (double)row[k] * up[i * h + k];
                if (gate != NULL)
                    for (int64_t k = 0; k < h; k++) g += (double)row[k] * gate[i * h + k];
                amax = fmax(amax, fabs(activation(L->config.activation, g, u)));
            }
        }
        down_scales[j] = input_scale_of(amax);
        free(gate);
        free(up);
    }
    return 0;
}

int ckpt_calibrate(const fp4moe_checkpoint *ckpt, const char *path, ckpt_calibration *c, char *err,
                   size_t err_bytes)
{
    memset(c, 0, sizeof *c);
    st_file *f = NULL;
    if (st_open(path, &f, err, err_bytes) != 0) return -1;
    int rc = -1;
    c->fc1 = calloc((size_t)ckpt->layer_count + 1, sizeof(float));
    c->down = calloc((size_t)ckpt->layer_count + 1, sizeof(float *));
    if (c->fc1 == NULL || c->down == NULL) {
        snprintf(err, err_bytes, "calibration: out of memory");
        goto done;
    }
    c->layer_count = ckpt->layer_count;
    for (int li = 0; li < ckpt->layer_count; li++) {
        const ckpt_layer *L = &ckpt->layers[li];
        if (L->quantized) continue;
        char name[CKPT_MAX_NAME + 32];
        snprintf(name, sizeof name, "%s.hidden_states", L->prefix);
        const st_tensor *t = st_find(f, name);
        if (t == NULL) t = st_find(f, "hidden_states");
        if (t == NULL || !t->dtype_known || t->ndim != 2 || t->shape[1] != L->hidden || t->shape[0] < 1 ||
            !(t->dtype == FP4MOE_DTYPE_F32 || t->dtype == FP4MOE_DTYPE_F16 || t->dtype == FP4MOE_DTYPE_BF16)) {
            snprintf(err, err_bytes, "calibration %s: layer '%s' needs '%s' or 'hidden_states' "
                     "[T,%lld] F32/F16/BF16", path, L->prefix, name, (long long)L->hidden);
            goto done;
        }
        const int64_t tokens = t->shape[0];
        float *x = malloc((size_t)(tokens * L->hidden) * sizeof(float));
        c->down[li] = calloc((size_t)L->num_experts, sizeof(float));
        if (x == NULL || c->down[li] == NULL) {
            free(x);
            snprintf(err, err_bytes, "calibration: out of memory");
            goto done;
        }
        for (int64_t i = 0; i < tokens * L->hidden; i++) x[i] = ckpt_load_float(t->data, t->dtype, i);
        int r = calibrate_layer(ckpt, L, x, tokens, &c->fc1[li], c->down[li], err, err_bytes);
        free(x);
        if (r != 0) goto done;
    }
    rc = 0;
done:
    if (rc != 0) ckpt_calibration_free(c);
    st_close(f);
    return rc;
}
