/* config.json (model attributes, and newer exports' quantization_config) and hf_quant_config.json.
 *
 * Only the keys fp4moe uses are read; other keys are ignored, since model configs carry dozens.
 * A key that is present with the wrong type is an error naming it (a silently ignored
 * "num_experts_per_tok": "8" would give a wrong layer). */
#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "io/checkpoint.h"
#include "io/io_error.h"

/* Bounds the parser's memory: every JSON value needs a ',', ':', '[' or '{' before it (except the
 * first), so this count + 1 bounds the number of values cJSON will allocate. */
#define CKPT_MAX_JSON_VALUES ((uint64_t)8 * 1000 * 1000)

cJSON *ckpt_parse_json(const char *text, size_t len, const char *what, char *err, size_t err_bytes)
{
    uint64_t values = 1;
    for (size_t i = 0; i < len; i++)
        values += text[i] == ',' || text[i] == ':' || text[i] == '[' || text[i] == '{';
    if (values > CKPT_MAX_JSON_VALUES) {
        io_fail(-1, err, err_bytes, "%s: more than %llu JSON values", what,
             (unsigned long long)CKPT_MAX_JSON_VALUES);
        return NULL;
    }
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (root == NULL) {
        size_t at = end != NULL && end >= text && end <= text + len ? (size_t)(end - text) : 0;
        io_fail(-1, err, err_bytes, "%s: invalid JSON near byte %zu", what, at);
        return NULL;
    }
    /* Only whitespace (or a NUL terminator) may follow the value. */
    for (const char *p = end; p != NULL && p < text + len && *p != '\0'; p++) {
        if (!isspace((unsigned char)*p)) {
            cJSON_Delete(root);
            io_fail(-1, err, err_bytes, "%s: text after the JSON value at byte %zu", what,
                 (size_t)(p - text));
            return NULL;
        }
    }
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        io_fail(-1, err, err_bytes, "%s: not a JSON object", what);
        return NULL;
    }
    return root;
}

/* An integer key: 0 absent (out untouched), 1 read, -1 wrong type (err set). */
static int get_int(const cJSON *obj, const char *key, int64_t min, int64_t max, int64_t *out,
                   const char *what, char *err, size_t err_bytes)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (item == NULL || cJSON_IsNull(item)) return 0;
    double v = cJSON_IsNumber(item) ? item->valuedouble : NAN;
    if (!(v >= (double)min && v <= (double)max) || v != floor(v))
        return io_fail(-1, err, err_bytes, "%s: \"%s\" must be an integer in [%lld, %lld]", what, key,
                    (long long)min, (long long)max);
    *out = (int64_t)v;
    return 1;
}

static int get_number(const cJSON *obj, const char *key, double *out, const char *what, char *err,
                      size_t err_bytes)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (item == NULL || cJSON_IsNull(item)) return 0;
    if (!cJSON_IsNumber(item) || !isfinite(item->valuedouble))
        return io_fail(-1, err, err_bytes, "%s: \"%s\" must be a finite number", what, key);
    *out = item->valuedouble;
    return 1;
}

static int get_bool(const cJSON *obj, const char *key, int *out, const char *what, char *err,
                    size_t err_bytes)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (item == NULL || cJSON_IsNull(item)) return 0;
    if (!cJSON_IsBool(item)) return io_fail(-1, err, err_bytes, "%s: \"%s\" must be true or false", what, key);
    *out = cJSON_IsTrue(item) ? 1 : 0;
    return 1;
}

static int get_string(const cJSON *obj, const char *key, char *out, size_t out_bytes,
                      const char *what, char *err, size_t err_bytes)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (item == NULL || cJSON_IsNull(item)) return 0;
    if (!cJSON_IsString(item) || item->valuestring == NULL)
        return io_fail(-1, err, err_bytes, "%s: \"%s\" must be a string", what, key);
    if (strlen(item->valuestring) >= out_bytes)
        return io_fail(-1, err, err_bytes, "%s: \"%s\" is longer than %zu characters", what, key,
                    out_bytes - 1);
    strcpy(out, item->valuestring);
    return 1;
}

void ckpt_quant_config_free(ckpt_quant_config *q)
{
    for (int i = 0; i < q->exclude_count; i++) free(q->exclude_modules[i]);
    for (int i = 0; i < q->layer_count; i++) {
        free(q->layer_names[i]);
        free(q->layer_algos[i]);
    }
    free(q->exclude_modules);
    free(q->layer_names);
    free(q->layer_algos);
    memset(q, 0, sizeof *q);
}

static char *dup_string(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d != NULL) memcpy(d, s, n);
    return d;
}

/* The fields of a quantisation block, common to both files' spellings. */
static int parse_quant_block(const cJSON *block, ckpt_quant_config *q, const char *what, char *err,
                             size_t err_bytes)
{
    if (get_string(block, "quant_algo", q->quant_algo, sizeof q->quant_algo, what, err, err_bytes) < 0)
        return -1;
    for (char *p = q->quant_algo; *p; p++) *p = (char)toupper((unsigned char)*p);
    if (get_int(block, "group_size", 1, 1 << 20, &q->group_size, what, err, err_bytes) < 0) return -1;
    const cJSON *excl = cJSON_GetObjectItemCaseSensitive(block, "exclude_modules");
    if (excl == NULL) excl = cJSON_GetObjectItemCaseSensitive(block, "ignore");
    if (excl != NULL && !cJSON_IsNull(excl)) {
        if (!cJSON_IsArray(excl))
            return io_fail(-1, err, err_bytes, "%s: \"exclude_modules\" must be an array of strings", what);
        int n = cJSON_GetArraySize(excl);
        q->exclude_modules = calloc((size_t)n + 1, sizeof(char *));
        if (q->exclude_modules == NULL) return io_fail(-1, err, err_bytes, "%s: out of memory", what);
        const cJSON *item;
        cJSON_ArrayForEach(item, excl) {
            if (!cJSON_IsString(item) || item->valuestring == NULL)
                return io_fail(-1, err, err_bytes, "%s: \"exclude_modules\" entry %d is not a string", what,
                            q->exclude_count);
            if ((q->exclude_modules[q->exclude_count] = dup_string(item->valuestring)) == NULL)
                return io_fail(-1, err, err_bytes, "%s: out of memory", what);
            q->exclude_count++;
        }
    }
    const cJSON *layers = cJSON_GetObjectItemCaseSensitive(block, "quantized_layers");
    if (layers != NULL && !cJSON_IsNull(layers)) {
        if (!cJSON_IsObject(layers))
            return io_fail(-1, err, err_bytes, "%s: \"quantized_layers\" must be an object", what);
        int n = cJSON_GetArraySize(layers);
        q->layer_names = calloc((size_t)n + 1, sizeof(char *));
        q->layer_algos = calloc((size_t)n + 1, sizeof(char *));
        if (q->layer_names == NULL || q->layer_algos == NULL)
            return io_fail(-1, err, err_bytes, "%s: out of memory", what);
        const cJSON *item;
        cJSON_ArrayForEach(item, layers) {
            const cJSON *algo = cJSON_IsObject(item)
                                    ? cJSON_GetObjectItemCaseSensitive(item, "quant_algo")
                                    : NULL;
            if (item->string == NULL || !cJSON_IsString(algo) || algo->valuestring == NULL)
                return io_fail(-1, err, err_bytes,
                            "%s: \"quantized_layers\" entry %d must be {\"quant_algo\": \"...\"}",
                            what, q->layer_count);
            q->layer_names[q->layer_count] = dup_string(item->string);
            q->layer_algos[q->layer_count] = dup_string(algo->valuestring);
            q->layer_count++;
            if (q->layer_names[q->layer_count - 1] == NULL || q->layer_algos[q->layer_count - 1] == NULL)
                return io_fail(-1, err, err_bytes, "%s: out of memory", what);
            for (char *p = q->layer_algos[q->layer_count - 1]; *p; p++) *p = (char)toupper((unsigned char)*p);
        }
    }
    q->present = 1;
    return 0;
}

int ckpt_parse_quant_config(const char *text, size_t len, ckpt_quant_config *q, char *err,
                            size_t err_bytes)
{
    static const char what[] = "hf_quant_config.json";
    ckpt_quant_config_free(q);
    cJSON *root = ckpt_parse_json(text, len, what, err, err_bytes);
    if (root == NULL) return -1;
    int rc = 0;
    const cJSON *block = cJSON_GetObjectItemCaseSensitive(root, "quantization");
    if (!cJSON_IsObject(block)) rc = io_fail(-1, err, err_bytes, "%s: no \"quantization\" object", what);
    else rc = parse_quant_block(block, q, what, err, err_bytes);
    if (rc == 0) snprintf(q->source, sizeof q->source, "%s", what);
    else ckpt_quant_config_free(q);
    cJSON_Delete(root);
    return rc;
}

int ckpt_parse_model_config(const char *text, size_t len, ckpt_model_config *m,
                            ckpt_quant_config *q, char *err, size_t err_bytes)
{
    static const char what[] = "config.json";
    memset(m, 0, sizeof *m);
    m->num_experts = m->top_k = m->hidden_size = m->moe_intermediate_size = -1;
    m->n_group = m->topk_group = -1;
    m->norm_topk_prob = -1;
    m->routed_scaling_factor = NAN;
    cJSON *root = ckpt_parse_json(text, len, what, err, err_bytes);
    if (root == NULL) return -1;
    /* Multimodal configs (Llama-4, Qwen3-VL) keep the language model in text_config. */
    const cJSON *cfg = cJSON_GetObjectItemCaseSensitive(root, "text_config");
    if (!cJSON_IsObject(cfg)) cfg = root;
    const int64_t big = (int64_t)1 << 40;
    int rc = -1;
    if (get_string(root, "model_type", m->model_type, sizeof m->model_type, what, err, err_bytes) < 0 ||
        get_int(cfg, "hidden_size", 1, big, &m->hidden_size, what, err, err_bytes) < 0 ||
        get_int(cfg, "num_experts_per_tok", 1, 1 << 20, &m->top_k, what, err, err_bytes) < 0 ||
        get_int(cfg, "n_group", 1, 1 << 20, &m->n_group, what, err, err_bytes) < 0 ||
        get_int(cfg, "topk_group", 1, 1 << 20, &m->topk_group, what, err, err_bytes) < 0 ||
        get_bool(cfg, "norm_topk_prob", &m->norm_topk_prob, what, err, err_bytes) < 0 ||
        get_number(cfg, "routed_scaling_factor", &m->routed_scaling_factor, what, err, err_bytes) < 0 ||
        get_string(cfg, "scoring_func", m->scoring_func, sizeof m->scoring_func, what, err, err_bytes) < 0 ||
        get_string(cfg, "topk_method", m->topk_method, sizeof m->topk_method, what, err, err_bytes) < 0 ||
        get_string(cfg, "hidden_act", m->hidden_act, sizeof m->hidden_act, what, err, err_bytes) < 0 ||
        get_string(cfg, "mlp_hidden_act", m->hidden_act, sizeof m->hidden_act, what, err, err_bytes) < 0)
        goto done;
    /* The experts' count has three spellings (Qwen, DeepSeek/Nemotron, Mixtral/Llama-4). */
    static const char *const expert_keys[] = {"num_experts", "n_routed_experts", "num_local_experts"};
    for (int i = 0; i < 3; i++)
        if (get_int(cfg, expert_keys[i], 1, 1 << 24, &m->num_experts, what, err, err_bytes) < 0)
            goto done;
    if (get_int(cfg, "moe_intermediate_size", 1, big, &m->moe_intermediate_size, what, err, err_bytes) < 0)
        goto done;
    /* Mixtral's experts are its MLPs: their size is intermediate_size. */
    if (m->moe_intermediate_size < 0 && strcmp(m->model_type, "mixtral") == 0 &&
        get_int(cfg, "intermediate_size", 1, big, &m->moe_intermediate_size, what, err, err_bytes) < 0)
        goto done;
    const cJSON *qc = cJSON_GetObjectItemCaseSensitive(root, "quantization_config");
    if (qc != NULL && !cJSON_IsNull(qc)) {
        if (!cJSON_IsObject(qc)) {
            io_fail(-1, err, err_bytes, "%s: \"quantization_config\" must be an object", what);
            goto done;
        }
        char method[48] = "";
        if (get_string(qc, "quant_method", method, sizeof method, what, err, err_bytes) < 0) goto done;
        m->has_quantization_config = 1;
        /* Other methods (fp8, compressed-tensors, ...) are not this reader's; info names them. */
        if (q != NULL && strcmp(method, "modelopt") == 0) {
            ckpt_quant_config_free(q);
            if (parse_quant_block(qc, q, what, err, err_bytes) < 0) {
                ckpt_quant_config_free(q);
                goto done;
            }
            snprintf(q->source, sizeof q->source, "config.json quantization_config");
        } else if (q != NULL && !q->present) {
            snprintf(q->source, sizeof q->source, "config.json quantization_config");
            snprintf(q->quant_algo, sizeof q->quant_algo, "%s", method[0] ? method : "unknown");
            for (char *p = q->quant_algo; *p; p++) *p = (char)toupper((unsigned char)*p);
        }
    }
    m->present = 1;
    rc = 0;
done:
    cJSON_Delete(root);
    return rc;
}

int ckpt_glob_match(const char *pattern, const char *text)
{
    /* Iterative '*' matching with one backtrack point: linear in practice, never recursive. */
    const char *star = NULL, *resume = NULL;
    while (*text) {
        if (*pattern == '*') {
            star = pattern++;
            resume = text;
        } else if (*pattern == *text) {
            pattern++;
            text++;
        } else if (star != NULL) {
            pattern = star + 1;
            text = ++resume;
        } else {
            return 0;
        }
    }
    while (*pattern == '*') pattern++;
    return *pattern == '\0';
}

int ckpt_is_excluded(const ckpt_quant_config *q, const char *module)
{
    for (int i = 0; i < q->exclude_count; i++)
        if (ckpt_glob_match(q->exclude_modules[i], module)) return 1;
    return 0;
}

float ckpt_load_float(const void *data, fp4moe_dtype dtype, int64_t i)
{
    const unsigned char *p = data;
    if (dtype == FP4MOE_DTYPE_F32) {
        float v;
        memcpy(&v, p + 4 * i, 4);
        return v;
    }
    uint16_t bits;
    memcpy(&bits, p + 2 * i, 2);
    return dtype == FP4MOE_DTYPE_BF16 ? fp4moe_bf16_to_float(bits) : fp4moe_f16_to_float(bits);
}
