/* Finding the MoE layers of a checkpoint from its tensor names, checking every tensor of them
 * (dtype, shape, scale values, index, config.json), and deriving each layer's fp4moe_config. */
#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/checkpoint.h"

static const char *const PROJ_NAMES[3] = {"gate_proj", "up_proj", "down_proj"};
static const char *const W_NAMES[3] = {"w1", "w3", "w2"};
static const char *const PARAM_NAMES[4] = {"weight", "weight_scale", "weight_scale_2", "input_scale"};

int ckpt_parse_expert_name(const char *name, size_t *prefix_len, int64_t *expert, ckpt_proj *proj,
                           ckpt_naming *naming, ckpt_param *param)
{
    static const char marker[] = ".experts.";
    const char *at = NULL;
    for (const char *p = strstr(name, marker); p != NULL; p = strstr(p + 1, marker)) at = p;
    if (at == NULL || at == name) return 0;
    const char *p = at + sizeof marker - 1;
    int64_t j = 0;
    int digits = 0;
    while (isdigit((unsigned char)*p)) {
        if (digits++ >= 9) return 0; /* no model has a billion experts */
        j = j * 10 + (*p++ - '0');
    }
    if (digits == 0 || *p++ != '.') return 0;
    const char *dot = strchr(p, '.');
    if (dot == NULL) return 0;
    size_t proj_len = (size_t)(dot - p);
    int found = 0;
    for (int i = 0; i < 3 && !found; i++) {
        if (strlen(PROJ_NAMES[i]) == proj_len && strncmp(p, PROJ_NAMES[i], proj_len) == 0) {
            *proj = (ckpt_proj)i;
            *naming = CKPT_NAMING_PROJ;
            found = 1;
        } else if (strlen(W_NAMES[i]) == proj_len && strncmp(p, W_NAMES[i], proj_len) == 0) {
            *proj = (ckpt_proj)i;
            *naming = CKPT_NAMING_W;
            found = 1;
        }
    }
    if (!found) return 0;
    for (int i = 0; i < 4; i++) {
        if (strcmp(dot + 1, PARAM_NAMES[i]) == 0) {
            *param = (ckpt_param)i;
            *prefix_len = (size_t)(at - name);
            *expert = j;
            return 1;
        }
    }
    return 0;
}

int ckpt_expert_tensor_name(char *out, size_t out_bytes, const ckpt_layer *layer, int64_t expert,
                            ckpt_proj proj, ckpt_param param)
{
    /* A non-gated layer in w1/w2 naming has FC1 in w1. */
    const char *p = layer->naming == CKPT_NAMING_W
                        ? (!layer->gated && proj == CKPT_UP ? "w1" : W_NAMES[proj])
                        : PROJ_NAMES[proj];
    int n = snprintf(out, out_bytes, "%s.experts.%lld.%s.%s", layer->prefix, (long long)expert, p,
                     PARAM_NAMES[param]);
    return n > 0 && (size_t)n < out_bytes ? 0 : -1;
}

static int64_t layer_number(const char *prefix)
{
    static const char marker[] = "layers.";
    const char *at = NULL;
    for (const char *p = strstr(prefix, marker); p != NULL; p = strstr(p + 1, marker))
        if (p == prefix || p[-1] == '.') at = p;
    if (at == NULL) return -1;
    const char *p = at + sizeof marker - 1;
    int64_t v = 0;
    int digits = 0;
    while (isdigit((unsigned char)*p) && digits < 12) {
        v = v * 10 + (*p++ - '0');
        digits++;
    }
    return digits > 0 && (*p == '.' || *p == '\0') ? v : -1;
}

static int is_float_dtype(const st_tensor *t)
{
    return t->dtype_known && (t->dtype == FP4MOE_DTYPE_F32 || t->dtype == FP4MOE_DTYPE_F16 ||
                              t->dtype == FP4MOE_DTYPE_BF16);
}

static void shape_text(char *buf, size_t bytes, const st_tensor *t)
{
    int n = snprintf(buf, bytes, "[");
    for (int d = 0; d < t->ndim && n > 0 && (size_t)n < bytes; d++)
        n += snprintf(buf + n, bytes - (size_t)n, "%s%lld", d ? "," : "", (long long)t->shape[d]);
    if (n > 0 && (size_t)n < bytes) snprintf(buf + n, bytes - (size_t)n, "] %s", t->dtype_name);
}

/* A scalar F32 ([] or [1]) that is finite and > 0; records a problem and returns -1 otherwise. */
static int check_scalar(fp4moe_checkpoint *ckpt, const char *name, const st_tensor *t, float *value)
{
    char got[96];
    shape_text(got, sizeof got, t);
    if (!t->dtype_known || t->dtype != FP4MOE_DTYPE_F32 || t->bytes != 4 ||
        !(t->ndim == 0 || (t->ndim == 1 && t->shape[0] == 1))) {
        ckpt_problem(ckpt, "tensor '%s': expected an F32 scalar, got %s", name, got);
        return -1;
    }
    float v;
    memcpy(&v, t->data, 4);
    if (!(v > 0.0f) || !isfinite(v)) {
        ckpt_problem(ckpt, "tensor '%s': scale %g must be finite and > 0", name, (double)v);
        return -1;
    }
    *value = v;
    return 0;
}

static int check_shape(fp4moe_checkpoint *ckpt, const char *name, const st_tensor *t,
                       fp4moe_dtype dtype, int64_t rows, int64_t cols)
{
    const int64_t shape[2] = {rows, cols};
    char err[700];
    if (st_expect(t, dtype, 2, shape, err, sizeof err) != 0) {
        ckpt_problem(ckpt, "%s", err);
        return -1;
    }
    return 0;
}

/* Every tensor of every expert; returns the number of problems found. */
static int check_experts(fp4moe_checkpoint *ckpt, ckpt_layer *L)
{
    const int before = ckpt->problem_count + ckpt->problems_dropped;
    char name[CKPT_MAX_NAME + 64];
    const int first_proj = L->gated ? CKPT_GATE : CKPT_UP;
    int64_t with_input_scale = 0, projections = 0;
    for (int64_t j = 0; j < L->num_experts; j++) {
        float ws2[3] = {0, 0, 0};
        for (int p = first_proj; p <= CKPT_DOWN; p++) {
            const int64_t rows = p == CKPT_DOWN ? L->hidden : L->inter;
            const int64_t cols = p == CKPT_DOWN ? L->inter : L->hidden;
            projections++;
            ckpt_expert_tensor_name(name, sizeof name, L, j, (ckpt_proj)p, CKPT_WEIGHT);
            const st_tensor *w = ckpt_find(ckpt, name);
            if (w == NULL) {
                ckpt_problem(ckpt, "tensor '%s' is missing (expected [%lld,%lld] %s)", name,
                             (long long)rows, (long long)(L->quantized ? cols / 2 : cols),
                             L->quantized ? "U8" : st_dtype_name(L->weight_dtype));
            } else {
                check_shape(ckpt, name, w, L->weight_dtype, rows, L->quantized ? cols / 2 : cols);
            }
            for (int param = CKPT_WEIGHT_SCALE; param <= CKPT_INPUT_SCALE; param++) {
                ckpt_expert_tensor_name(name, sizeof name, L, j, (ckpt_proj)p, (ckpt_param)param);
                const st_tensor *t = ckpt_find(ckpt, name);
                if (!L->quantized) {
                    if (t != NULL)
                        ckpt_problem(ckpt, "tensor '%s': a scale beside unquantised %s weights",
                                     name, st_dtype_name(L->weight_dtype));
                    continue;
                }
                if (t == NULL) {
                    if (param != CKPT_INPUT_SCALE)
                        ckpt_problem(ckpt, "tensor '%s' is missing (expected %s)", name,
                                     param == CKPT_WEIGHT_SCALE ? "F8_E4M3 block scales" : "an F32 scalar");
                    continue;
                }
                float v;
                if (param == CKPT_WEIGHT_SCALE) check_shape(ckpt, name, t, FP4MOE_DTYPE_E4M3, rows, cols / 16);
                else if (check_scalar(ckpt, name, t, &v) == 0 && param == CKPT_WEIGHT_SCALE_2) ws2[p] = v;
                if (param == CKPT_INPUT_SCALE) with_input_scale++;
            }
        }
        if (L->gated && L->quantized && ws2[CKPT_GATE] > 0 && ws2[CKPT_UP] > 0 &&
            memcmp(&ws2[CKPT_GATE], &ws2[CKPT_UP], sizeof(float)) != 0)
            L->split_gate_up_scale = 1;
    }
    L->has_input_scales = L->quantized && with_input_scale == projections;
    if (L->quantized && with_input_scale > 0 && with_input_scale < projections)
        ckpt_problem(ckpt, "layer '%s': %lld of %lld projections have an input_scale (all or none)",
                     L->prefix, (long long)with_input_scale, (long long)projections);
    return ckpt->problem_count + ckpt->problems_dropped - before;
}

static int check_router(fp4moe_checkpoint *ckpt, ckpt_layer *L)
{
    const int before = ckpt->problem_count + ckpt->problems_dropped;
    char name[CKPT_MAX_NAME + 64];
    char got[96];
    snprintf(name, sizeof name, "%s.gate.weight", L->prefix);
    const st_tensor *r = ckpt_find(ckpt, name);
    if (r != NULL) {
        shape_text(got, sizeof got, r);
        if (!is_float_dtype(r) || r->ndim != 2 || r->shape[0] != L->num_experts || r->shape[1] != L->hidden)
            ckpt_problem(ckpt, "tensor '%s': expected shape [%lld,%lld] F32/F16/BF16, got %s", name,
                         (long long)L->num_experts, (long long)L->hidden, got);
        else L->router = r;
    }
    snprintf(name, sizeof name, "%s.gate.e_score_correction_bias", L->prefix);
    const st_tensor *b = ckpt_find(ckpt, name);
    if (b != NULL) {
        shape_text(got, sizeof got, b);
        if (!is_float_dtype(b) || b->ndim != 1 || b->shape[0] != L->num_experts)
            ckpt_problem(ckpt, "tensor '%s': expected shape [%lld] F32/F16/BF16, got %s", name,
                         (long long)L->num_experts, got);
        else L->bias = b;
    }
    return ckpt->problem_count + ckpt->problems_dropped - before;
}

static int config_mismatch(fp4moe_checkpoint *ckpt, const ckpt_layer *L, const char *key,
                           int64_t config_value, int64_t tensor_value, const char *what)
{
    if (config_value < 0 || config_value == tensor_value) return 0;
    ckpt_problem(ckpt, "config.json: \"%s\" is %lld but layer '%s' has %lld %s", key,
                 (long long)config_value, L->prefix, (long long)tensor_value, what);
    return 1;
}

/* config.json and the quantisation config against the tensors of one layer. */
static int check_configs(fp4moe_checkpoint *ckpt, const ckpt_layer *L)
{
    const ckpt_model_config *m = &ckpt->model;
    const ckpt_quant_config *q = &ckpt->quant;
    int n = config_mismatch(ckpt, L, "num_experts", m->num_experts, L->num_experts, "experts");
    n += config_mismatch(ckpt, L, "hidden_size", m->hidden_size, L->hidden, "as hidden size");
    n += config_mismatch(ckpt, L, "moe_intermediate_size", m->moe_intermediate_size, L->inter,
                         "as expert intermediate size");
    const fp4moe_config *c = &L->config;
    if (m->top_k > L->num_experts || m->top_k > 32) {
        ckpt_problem(ckpt, "config.json: \"num_experts_per_tok\" %lld must be <= min(E, 32) = %lld",
                     (long long)m->top_k, (long long)(L->num_experts < 32 ? L->num_experts : 32));
        n++;
    }
    if (c->routing == FP4MOE_ROUTING_DEEPSEEK_V3 && (L->num_experts % c->n_group != 0 || c->topk_group > c->n_group)) {
        ckpt_problem(ckpt, "config.json: n_group %d / topk_group %d do not fit %lld experts",
                     c->n_group, c->topk_group, (long long)L->num_experts);
        n++;
    }
    if (c->routing != FP4MOE_ROUTING_DEEPSEEK_V3 &&
        ((m->n_group > 1) || (isfinite(m->routed_scaling_factor) && m->routed_scaling_factor != 1.0))) {
        ckpt_problem(ckpt, "config.json: softmax routing with n_group %lld / routed_scaling_factor %g "
                     "is not supported", (long long)m->n_group, m->routed_scaling_factor);
        n++;
    }
    if ((int)c->activation < 0) {
        ckpt_problem(ckpt, "config.json: hidden activation '%s' is not supported for %s experts",
                     m->hidden_act, L->gated ? "gated" : "non-gated");
        n++;
    }
    if (L->quantized) {
        if (q->present && strcmp(q->quant_algo, "NVFP4") != 0 && strcmp(q->quant_algo, "MIXED_PRECISION") != 0) {
            ckpt_problem(ckpt, "%s: quant_algo '%s', but layer '%s' has NVFP4 experts", q->source,
                         q->quant_algo, L->prefix);
            n++;
        }
        if (q->group_size != 0 && q->group_size != 16) {
            ckpt_problem(ckpt, "%s: group_size %lld, NVFP4 needs 16", q->source, (long long)q->group_size);
            n++;
        }
        char module[CKPT_MAX_NAME + 64];
        for (int i = 0; i < q->layer_count; i++) {
            snprintf(module, sizeof module, "%s.experts.", L->prefix);
            if (strncmp(q->layer_names[i], module, strlen(module)) == 0 &&
                strcmp(q->layer_algos[i], "NVFP4") != 0) {
                ckpt_problem(ckpt, "%s: quantized_layers says '%s' is %s, but its tensors are NVFP4",
                             q->source, q->layer_names[i], q->layer_algos[i]);
                n++;
            }
        }
    }
    return n;
}

/* Shapes from expert 0's tensors: down [H, I] or FC1 [I, H] (packed: half the columns). */
static int infer_shapes(fp4moe_checkpoint *ckpt, ckpt_layer *L)
{
    char name[CKPT_MAX_NAME + 64];
    const int pack = L->quantized ? 2 : 1;
    ckpt_expert_tensor_name(name, sizeof name, L, 0, CKPT_DOWN, CKPT_WEIGHT);
    const st_tensor *t = ckpt_find(ckpt, name);
    if (t != NULL && t->ndim == 2) {
        L->hidden = t->shape[0];
        L->inter = t->shape[1] * pack;
    } else {
        ckpt_expert_tensor_name(name, sizeof name, L, 0, CKPT_UP, CKPT_WEIGHT);
        t = ckpt_find(ckpt, name);
        if (t == NULL || t->ndim != 2) {
            ckpt_problem(ckpt, "layer '%s': neither expert 0's down nor up projection weight is a "
                         "2-D tensor: shapes unknown", L->prefix);
            return -1;
        }
        L->inter = t->shape[0];
        L->hidden = t->shape[1] * pack;
    }
    if (L->hidden < 16 || L->hidden % 16 != 0 || L->inter < 16 || L->inter % 16 != 0 ||
        L->hidden > ((int64_t)1 << 30) || L->inter > ((int64_t)1 << 30)) {
        ckpt_problem(ckpt, "layer '%s': hidden size %lld and intermediate size %lld must be "
                     "positive multiples of 16", L->prefix, (long long)L->hidden, (long long)L->inter);
        return -1;
    }
    return 0;
}

static int activation_for(const char *act, int gated, fp4moe_activation *out)
{
    char a[32];
    size_t i = 0;
    for (; act[i] && i + 1 < sizeof a; i++) a[i] = (char)tolower((unsigned char)act[i]);
    a[i] = '\0';
    if (gated) {
        if (!a[0] || !strcmp(a, "silu") || !strcmp(a, "swish")) *out = FP4MOE_ACT_SWIGLU;
        else if (!strcmp(a, "gelu")) *out = FP4MOE_ACT_GEGLU;
        else if (!strcmp(a, "gelu_pytorch_tanh") || !strcmp(a, "gelu_new") || !strcmp(a, "gelu_fast"))
            *out = FP4MOE_ACT_GEGLU_TANH;
        else return -1;
    } else {
        if (!a[0] || !strcmp(a, "relu2")) *out = FP4MOE_ACT_RELU2;
        else if (!strcmp(a, "silu") || !strcmp(a, "swish")) *out = FP4MOE_ACT_SILU;
        else if (!strcmp(a, "gelu")) *out = FP4MOE_ACT_GELU;
        else if (!strcmp(a, "identity") || !strcmp(a, "linear")) *out = FP4MOE_ACT_IDENTITY;
        else return -1;
    }
    return 0;
}

void ckpt_derive_config(const ckpt_model_config *m, ckpt_layer *L)
{
    fp4moe_config *c = &L->config;
    fp4moe_config_init(c);
    c->num_experts = L->num_experts;
    c->top_k = m->top_k > 0 && m->top_k <= 32 ? (int32_t)m->top_k : 0;
    c->hidden_size = L->hidden;
    c->intermediate_size = L->inter;
    if (activation_for(m->hidden_act, L->gated, &c->activation) != 0) c->activation = (fp4moe_activation)-1;
    /* Sigmoid scoring with a correction bias (DeepSeek-V3's noaux_tc, Nemotron-H) is the
     * deepseek_v3 method; softmax scoring is Qwen's / Mixtral's top-k of softmax. */
    const int sigmoid = !strcmp(m->scoring_func, "sigmoid") || !strcmp(m->topk_method, "noaux_tc") ||
                        !strcmp(m->model_type, "nemotron_h") || !strcmp(m->model_type, "deepseek_v3") ||
                        !strcmp(m->model_type, "kimi_k2");
    if (sigmoid) {
        c->routing = FP4MOE_ROUTING_DEEPSEEK_V3;
        c->n_group = m->n_group > 0 && m->n_group <= (1 << 20) ? (int32_t)m->n_group : 1;
        c->topk_group = m->topk_group > 0 && m->topk_group <= (1 << 20) ? (int32_t)m->topk_group : 1;
        c->norm_topk_prob = m->norm_topk_prob >= 0 ? m->norm_topk_prob : 1;
        c->routed_scaling_factor = isfinite(m->routed_scaling_factor) ? (float)m->routed_scaling_factor : 1.0f;
    } else if (!strcmp(m->model_type, "mixtral")) {
        c->routing = FP4MOE_ROUTING_RENORMALIZE_NAIVE; /* Mixtral always renormalises */
    } else {
        /* Hugging Face's Qwen2/3-MoE default is norm_topk_prob = false. */
        c->routing = m->norm_topk_prob == 1 ? FP4MOE_ROUTING_RENORMALIZE_NAIVE : FP4MOE_ROUTING_SOFTMAX_TOPK;
    }
}

static int compare_layers(const void *a, const void *b)
{
    const ckpt_layer *x = a, *y = b;
    if (x->layer != y->layer) return x->layer < y->layer ? -1 : 1;
    return strcmp(x->prefix, y->prefix);
}

int ckpt_find_layers(fp4moe_checkpoint *ckpt, char *err, size_t err_bytes)
{
    int capacity = 0;
    for (int64_t i = 0; i < ckpt->entry_count; i++) {
        const char *name = ckpt->entries[i].name;
        size_t prefix_len;
        int64_t j;
        ckpt_proj proj;
        ckpt_naming naming;
        ckpt_param param;
        if (!ckpt_parse_expert_name(name, &prefix_len, &j, &proj, &naming, &param)) continue;
        if (prefix_len >= CKPT_MAX_NAME) {
            if (ckpt_problem(ckpt, "tensor '%.200s...': name too long", name)) goto oom;
            continue;
        }
        if (j >= CKPT_MAX_EXPERTS) {
            if (ckpt_problem(ckpt, "tensor '%s': expert id %lld is not below %d", name, (long long)j,
                             CKPT_MAX_EXPERTS))
                goto oom;
            continue;
        }
        /* Names are sorted, so a layer's expert tensors are adjacent: look at the last first. */
        ckpt_layer *L = NULL;
        for (int k = ckpt->layer_count - 1; k >= 0 && L == NULL; k--)
            if (strlen(ckpt->layers[k].prefix) == prefix_len &&
                strncmp(ckpt->layers[k].prefix, name, prefix_len) == 0)
                L = &ckpt->layers[k];
        if (L == NULL) {
            if (ckpt->layer_count == capacity) {
                capacity = capacity ? 2 * capacity : 16;
                ckpt_layer *grown = realloc(ckpt->layers, (size_t)capacity * sizeof(ckpt_layer));
                if (grown == NULL) goto oom;
                ckpt->layers = grown;
            }
            L = &ckpt->layers[ckpt->layer_count++];
            memset(L, 0, sizeof *L);
            memcpy(L->prefix, name, prefix_len);
            L->prefix[prefix_len] = '\0';
            L->layer = layer_number(L->prefix);
            L->naming = naming;
            L->weight_dtype = (fp4moe_dtype)-1;
        }
        if (naming != L->naming) {
            if (ckpt_problem(ckpt, "tensor '%s': layer '%s' mixes gate_proj/up_proj/down_proj and "
                             "w1/w2/w3 names", name, L->prefix))
                goto oom;
            continue;
        }
        if (j + 1 > L->num_experts) L->num_experts = j + 1;
        /* gate_proj (or w3, the up half, in w1/w2/w3 naming) marks a gated layer. */
        if ((naming == CKPT_NAMING_PROJ && proj == CKPT_GATE) || (naming == CKPT_NAMING_W && proj == CKPT_UP))
            L->gated = 1;
        if (param == CKPT_WEIGHT && j == 0 && (int)L->weight_dtype < 0 && ckpt->entries[i].tensor->dtype_known) {
            const st_tensor *t = ckpt->entries[i].tensor;
            L->weight_dtype = t->dtype;
            L->quantized = t->dtype == FP4MOE_DTYPE_U8;
        }
    }
    for (int k = 0; k < ckpt->layer_count; k++) {
        ckpt_layer *L = &ckpt->layers[k];
        if (L->layer < 0) L->layer = k;
        int bad = 0;
        if ((int)L->weight_dtype < 0 || !(L->quantized || L->weight_dtype == FP4MOE_DTYPE_F32 ||
                                          L->weight_dtype == FP4MOE_DTYPE_F16 ||
                                          L->weight_dtype == FP4MOE_DTYPE_BF16)) {
            if (ckpt_problem(ckpt, "layer '%s': expert 0 has no weight in U8 (NVFP4) or F32/F16/BF16",
                             L->prefix))
                goto oom;
            L->weight_dtype = FP4MOE_DTYPE_U8;
            bad = 1;
        }
        if (!bad && infer_shapes(ckpt, L) != 0) bad = 1;
        if (bad) {
            L->num_problems = 1;
            ckpt_derive_config(&ckpt->model, L);
            continue;
        }
        ckpt_derive_config(&ckpt->model, L);
        L->num_problems = check_experts(ckpt, L);
        L->num_problems += check_router(ckpt, L);
        L->num_problems += check_configs(ckpt, L);
    }
    if (ckpt->layer_count > 0) qsort(ckpt->layers, (size_t)ckpt->layer_count, sizeof(ckpt_layer), compare_layers);
    for (int k = 1; k < ckpt->layer_count; k++)
        if (ckpt->layers[k].layer == ckpt->layers[k - 1].layer &&
            ckpt_problem(ckpt, "layers '%s' and '%s' have the same number %lld", ckpt->layers[k - 1].prefix,
                         ckpt->layers[k].prefix, (long long)ckpt->layers[k].layer))
            goto oom;
    return 0;
oom:
    snprintf(err, err_bytes, "out of memory listing the layers");
    return -1;
}
