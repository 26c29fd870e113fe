/* Layer configuration <-> JSON, driven by one table of keys so that reading and writing agree. */
#include "io/layer_json.h"

#include <cjson/cJSON.h>
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "io/io_error.h"

#define KEY_IN_MESSAGE 64
/* Larger magnitudes are not exact in cJSON's doubles. */
#define JSON_MAX_EXACT_INTEGER 9007199254740992.0

typedef struct enum_name {
    const char *name;
    int value;
} enum_name;

static const enum_name ACTIVATIONS[] = {
    {"swiglu", FP4MOE_ACT_SWIGLU}, {"geglu", FP4MOE_ACT_GEGLU},
    {"geglu_tanh", FP4MOE_ACT_GEGLU_TANH}, {"relu2", FP4MOE_ACT_RELU2},
    {"silu", FP4MOE_ACT_SILU}, {"gelu", FP4MOE_ACT_GELU},
    {"identity", FP4MOE_ACT_IDENTITY}, {NULL, 0}};
static const enum_name ROUTINGS[] = {
    {"softmax_topk", FP4MOE_ROUTING_SOFTMAX_TOPK}, {"renormalize", FP4MOE_ROUTING_RENORMALIZE},
    {"renormalize_naive", FP4MOE_ROUTING_RENORMALIZE_NAIVE}, {"topk", FP4MOE_ROUTING_TOPK},
    {"sigmoid", FP4MOE_ROUTING_SIGMOID}, {"sigmoid_renorm", FP4MOE_ROUTING_SIGMOID_RENORM},
    {"topk_sigmoid", FP4MOE_ROUTING_TOPK_SIGMOID}, {"deepseek_v3", FP4MOE_ROUTING_DEEPSEEK_V3},
    {"llama4", FP4MOE_ROUTING_LLAMA4}, {"minimax2", FP4MOE_ROUTING_MINIMAX2}, {NULL, 0}};
static const enum_name PRECISIONS[] = {
    {"w4a16", FP4MOE_PRECISION_W4A16}, {"w4a4", FP4MOE_PRECISION_W4A4}, {NULL, 0}};
static const enum_name GATE_UP_ORDERS[] = {
    {"gate_up", FP4MOE_GATE_UP}, {"up_gate", FP4MOE_UP_GATE}, {NULL, 0}};

static const char *enum_to_name(const enum_name *table, int value)
{
    for (; table->name != NULL; table++)
        if (table->value == value) return table->name;
    return NULL;
}

static int enum_from_name(const enum_name *table, const char *name, int *value)
{
    if (name == NULL) return 1;
    for (; table->name != NULL; table++)
        if (strcmp(table->name, name) == 0) {
            *value = table->value;
            return 0;
        }
    return 1;
}

const char *activation_name(fp4moe_activation activation)
{
    return enum_to_name(ACTIVATIONS, (int)activation);
}
const char *routing_name(fp4moe_routing routing)
{
    return enum_to_name(ROUTINGS, (int)routing);
}
const char *precision_name(fp4moe_precision precision)
{
    return enum_to_name(PRECISIONS, (int)precision);
}
const char *gate_up_order_name(fp4moe_gate_up_order order)
{
    return enum_to_name(GATE_UP_ORDERS, (int)order);
}

int activation_from_name(const char *name, fp4moe_activation *out)
{
    int v;
    if (out == NULL || enum_from_name(ACTIVATIONS, name, &v) != 0) return 1;
    *out = (fp4moe_activation)v;
    return 0;
}
int routing_from_name(const char *name, fp4moe_routing *out)
{
    int v;
    if (out == NULL || enum_from_name(ROUTINGS, name, &v) != 0) return 1;
    *out = (fp4moe_routing)v;
    return 0;
}
int precision_from_name(const char *name, fp4moe_precision *out)
{
    int v;
    if (out == NULL || enum_from_name(PRECISIONS, name, &v) != 0) return 1;
    *out = (fp4moe_precision)v;
    return 0;
}
int gate_up_order_from_name(const char *name, fp4moe_gate_up_order *out)
{
    int v;
    if (out == NULL || enum_from_name(GATE_UP_ORDERS, name, &v) != 0) return 1;
    *out = (fp4moe_gate_up_order)v;
    return 0;
}

typedef enum key_kind {
    KEY_INT32,
    KEY_INT64,
    KEY_FLOAT,
    KEY_FLOAT_NULL_INF, /* null stands for +inf, which JSON cannot spell */
    KEY_BOOL,
    KEY_ACTIVATION,
    KEY_ROUTING,
    KEY_PRECISION,
    KEY_GATE_UP_ORDER
} key_kind;

typedef struct config_key {
    const char *name;
    key_kind kind;
    size_t offset;
} config_key;

#define KEY(field, kind) {#field, kind, offsetof(fp4moe_config, field)}
static const config_key KEYS[] = {
    KEY(num_experts, KEY_INT64),
    KEY(top_k, KEY_INT32),
    KEY(hidden_size, KEY_INT64),
    KEY(intermediate_size, KEY_INT64),
    KEY(activation, KEY_ACTIVATION),
    KEY(swiglu_alpha, KEY_FLOAT),
    KEY(swiglu_beta, KEY_FLOAT),
    KEY(swiglu_limit, KEY_FLOAT_NULL_INF),
    KEY(gate_up_order, KEY_GATE_UP_ORDER),
    KEY(routing, KEY_ROUTING),
    KEY(n_group, KEY_INT32),
    KEY(topk_group, KEY_INT32),
    KEY(norm_topk_prob, KEY_BOOL),
    KEY(routed_scaling_factor, KEY_FLOAT),
    KEY(apply_router_weight_on_input, KEY_BOOL),
    KEY(local_expert_offset, KEY_INT64),
    KEY(local_num_experts, KEY_INT64),
    KEY(precision, KEY_PRECISION),
    KEY(fc2_input_fp8, KEY_BOOL),
    KEY(decode_threshold, KEY_INT64),
    KEY(max_tokens, KEY_INT64),
};
#undef KEY
#define KEY_COUNT ((int)(sizeof(KEYS) / sizeof(KEYS[0])))

static const enum_name *enum_table(key_kind kind)
{
    switch (kind) {
    case KEY_ACTIVATION: return ACTIVATIONS;
    case KEY_ROUTING: return ROUTINGS;
    case KEY_PRECISION: return PRECISIONS;
    case KEY_GATE_UP_ORDER: return GATE_UP_ORDERS;
    default: return NULL;
    }
}

/* "one of a, b, c" into buf, for messages about enum keys. */
static void list_names(const enum_name *table, char *buf, size_t bytes)
{
    size_t used = 0;
    buf[0] = '\0';
    for (int i = 0; table[i].name != NULL; i++) {
        int n = snprintf(buf + used, bytes - used, "%s%s", i ? ", " : "", table[i].name);
        if (n < 0 || (size_t)n >= bytes - used) return;
        used += (size_t)n;
    }
}

static int apply_key(const config_key *key, const cJSON *item, fp4moe_config *cfg, char *err,
                     size_t err_bytes)
{
    void *field = (char *)cfg + key->offset;
    switch (key->kind) {
    case KEY_INT32:
    case KEY_INT64: {
        double v = item->valuedouble;
        double limit = key->kind == KEY_INT32 ? 2147483647.0 : JSON_MAX_EXACT_INTEGER;
        double low = key->kind == KEY_INT32 ? -2147483648.0 : -JSON_MAX_EXACT_INTEGER;
        if (!cJSON_IsNumber(item))
            return io_fail(1, err, err_bytes, "config key '%s': expected an integer", key->name);
        if (!(v >= low && v <= limit) || (double)(int64_t)v != v)
            return io_fail(1, err, err_bytes, "config key '%s': %g is not an integer in [%.0f, %.0f]",
                        key->name, v, low, limit);
        if (key->kind == KEY_INT32) *(int32_t *)field = (int32_t)v;
        else *(int64_t *)field = (int64_t)v;
        return 0;
    }
    case KEY_FLOAT_NULL_INF:
        if (cJSON_IsNull(item)) {
            *(float *)field = INFINITY;
            return 0;
        }
        /* fall through */
    case KEY_FLOAT: {
        if (!cJSON_IsNumber(item))
            return io_fail(1, err, err_bytes, "config key '%s': expected a number%s", key->name,
                        key->kind == KEY_FLOAT_NULL_INF ? " or null" : "");
        double v = item->valuedouble;
        /* Values up to FLT_MAX + half an ulp round to FLT_MAX (printed floats come back that
         * way); beyond, they would be infinite. Converting a double outside float's range is
         * undefined behaviour, so those are clamped by hand. */
        const double overflow = 340282356779733661637539395458142568448.0; /* 2^128 - 2^103 */
        if (!(v > -overflow && v < overflow))
            return io_fail(1, err, err_bytes, "config key '%s': %g is outside the float range",
                        key->name, v);
        *(float *)field = v > FLT_MAX ? FLT_MAX : v < -FLT_MAX ? -FLT_MAX : (float)v;
        return 0;
    }
    case KEY_BOOL:
        if (!cJSON_IsBool(item))
            return io_fail(1, err, err_bytes, "config key '%s': expected true or false", key->name);
        *(int32_t *)field = cJSON_IsTrue(item) ? 1 : 0;
        return 0;
    default: {
        const enum_name *table = enum_table(key->kind);
        int value;
        char names[256];
        if (cJSON_IsString(item) && enum_from_name(table, item->valuestring, &value) == 0) {
            switch (key->kind) {
            case KEY_ACTIVATION: *(fp4moe_activation *)field = (fp4moe_activation)value; break;
            case KEY_ROUTING: *(fp4moe_routing *)field = (fp4moe_routing)value; break;
            case KEY_PRECISION: *(fp4moe_precision *)field = (fp4moe_precision)value; break;
            default: *(fp4moe_gate_up_order *)field = (fp4moe_gate_up_order)value; break;
            }
            return 0;
        }
        list_names(table, names, sizeof names);
        if (!cJSON_IsString(item))
            return io_fail(1, err, err_bytes, "config key '%s': expected a string (one of %s)",
                        key->name, names);
        return io_fail(1, err, err_bytes, "config key '%s': unknown value '%.*s' (expected one of %s)",
                    key->name, KEY_IN_MESSAGE, item->valuestring, names);
    }
    }
}

int layer_config_from_json(const char *text, size_t len, fp4moe_config *cfg, char *err,
                           size_t err_bytes)
{
    if (cfg == NULL || (text == NULL && len > 0)) return io_fail(1, err, err_bytes, "text or cfg is NULL");
    fp4moe_config_init(cfg);
    if (len == 0) return io_fail(1, err, err_bytes, "config JSON is empty");
    if (len > LAYER_JSON_MAX_BYTES)
        return io_fail(1, err, err_bytes, "config JSON of %zu bytes exceeds the limit of %d", len,
                    LAYER_JSON_MAX_BYTES);
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (root == NULL) {
        long at = end != NULL && end >= text && end <= text + len ? (long)(end - text) : -1;
        return io_fail(1, err, err_bytes, "config is not valid JSON (near byte %ld)", at);
    }
    for (; end < text + len; end++)
        if (*end != ' ' && *end != '\t' && *end != '\n' && *end != '\r' && *end != '\0') {
            cJSON_Delete(root);
            return io_fail(1, err, err_bytes, "config has data after the JSON object (byte %ld)",
                        (long)(end - text));
        }
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return io_fail(1, err, err_bytes, "config JSON is not an object");
    }
    int seen[KEY_COUNT] = {0};
    int status = 0;
    for (const cJSON *item = root->child; item != NULL && status == 0; item = item->next) {
        int k = 0;
        while (k < KEY_COUNT && strcmp(KEYS[k].name, item->string) != 0) k++;
        if (k == KEY_COUNT)
            status = io_fail(1, err, err_bytes, "config key '%.*s': unknown key", KEY_IN_MESSAGE,
                          item->string);
        else if (seen[k]++)
            status = io_fail(1, err, err_bytes, "config key '%s': given twice", KEYS[k].name);
        else
            status = apply_key(&KEYS[k], item, cfg, err, err_bytes);
    }
    cJSON_Delete(root);
    return status;
}

char *layer_config_to_json(const fp4moe_config *cfg)
{
    if (cfg == NULL) return NULL;
    enum { TEXT_BYTES = 4096 }; /* the keys and their longest values fit several times over */
    char *text = malloc(TEXT_BYTES);
    if (text == NULL) return NULL;
    size_t used = 0;
    int n = snprintf(text, TEXT_BYTES, "{\n");
    for (int k = 0; k < KEY_COUNT && n >= 0 && (size_t)n < TEXT_BYTES - used; k++) {
        used += (size_t)n;
        const config_key *key = &KEYS[k];
        const void *field = (const char *)cfg + key->offset;
        const char *comma = k + 1 < KEY_COUNT ? "," : "";
        const char *name = NULL;
        float f;
        switch (key->kind) {
        case KEY_INT32:
            n = snprintf(text + used, TEXT_BYTES - used, "  \"%s\": %ld%s\n", key->name,
                         (long)*(const int32_t *)field, comma);
            break;
        case KEY_INT64:
            n = snprintf(text + used, TEXT_BYTES - used, "  \"%s\": %lld%s\n", key->name,
                         (long long)*(const int64_t *)field, comma);
            break;
        case KEY_BOOL:
            n = snprintf(text + used, TEXT_BYTES - used, "  \"%s\": %s%s\n", key->name,
                         *(const int32_t *)field ? "true" : "false", comma);
            break;
        case KEY_FLOAT:
        case KEY_FLOAT_NULL_INF:
            f = *(const float *)field;
            if (key->kind == KEY_FLOAT_NULL_INF && isinf(f) && f > 0)
                n = snprintf(text + used, TEXT_BYTES - used, "  \"%s\": null%s\n", key->name, comma);
            else if (!isfinite(f))
                n = -1;
            else /* 9 significant digits round-trip every float */
                n = snprintf(text + used, TEXT_BYTES - used, "  \"%s\": %.9g%s\n", key->name,
                             (double)f, comma);
            break;
        case KEY_ACTIVATION: name = activation_name(*(const fp4moe_activation *)field); break;
        case KEY_ROUTING: name = routing_name(*(const fp4moe_routing *)field); break;
        case KEY_PRECISION: name = precision_name(*(const fp4moe_precision *)field); break;
        case KEY_GATE_UP_ORDER:
            name = gate_up_order_name(*(const fp4moe_gate_up_order *)field);
            break;
        }
        if (enum_table(key->kind) != NULL)
            n = name == NULL ? -1
                             : snprintf(text + used, TEXT_BYTES - used, "  \"%s\": \"%s\"%s\n",
                                        key->name, name, comma);
    }
    if (n >= 0 && (size_t)n < TEXT_BYTES - used) {
        used += (size_t)n;
        n = snprintf(text + used, TEXT_BYTES - used, "}\n");
    }
    if (n < 0 || (size_t)n >= TEXT_BYTES - used) {
        free(text);
        return NULL;
    }
    return text;
}
