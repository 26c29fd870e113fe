/* Plan serialisation: the plugin's field collection (every attribute and max_tokens) plus the
 * weights in canonical form, so a plan can be rebuilt without the original tensors.
 *
 * Layout (little-endian):
 *   header   "FP4MOEPL", u32 format version, u32 header bytes (32), u64 total bytes, u64 0
 *   config   17 x i64, 4 x f32 (see config_ints / config_floats), u32 presence mask
 *   arrays   for each array in `array_specs` order that is present: u64 byte count, the bytes
 *   trailer  u32 CRC-32 (zlib) of everything before it
 * Deserialising checks the magic, version, size and checksum first, then rebuilds the plan
 * through the same validation as fp4moe_plan_create, so crafted bytes meet every check. */
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "plan.h"

#define MAGIC "FP4MOEPL"
#define FORMAT_VERSION 1u
#define HEADER_BYTES 32u
#define NUM_INTS 17
#define NUM_FLOATS 4
#define NUM_ARRAYS 16

static void config_ints(const fp4moe_config *c, int64_t v[NUM_INTS])
{
    const int64_t values[NUM_INTS] = {
        c->num_experts, c->top_k, c->hidden_size, c->intermediate_size, c->activation,
        c->gate_up_order, c->routing, c->n_group, c->topk_group, c->norm_topk_prob,
        c->apply_router_weight_on_input, c->local_expert_offset, c->local_num_experts,
        c->precision, c->fc2_input_fp8, c->decode_threshold, c->max_tokens};
    memcpy(v, values, sizeof values);
}

/* Narrowing the 64-bit fields back: out-of-range values become invalid enum/size values that
 * plan validation rejects, never silently wrapped ones. */
static int32_t narrow(int64_t v) { return v < INT32_MIN || v > INT32_MAX ? -1 : (int32_t)v; }

static void config_from_ints(const int64_t v[NUM_INTS], const float f[NUM_FLOATS], fp4moe_config *c)
{
    fp4moe_config_init(c);
    c->num_experts = v[0];
    c->top_k = narrow(v[1]);
    c->hidden_size = v[2];
    c->intermediate_size = v[3];
    c->activation = (fp4moe_activation)narrow(v[4]);
    c->gate_up_order = (fp4moe_gate_up_order)narrow(v[5]);
    c->routing = (fp4moe_routing)narrow(v[6]);
    c->n_group = narrow(v[7]);
    c->topk_group = narrow(v[8]);
    c->norm_topk_prob = narrow(v[9]);
    c->apply_router_weight_on_input = narrow(v[10]);
    c->local_expert_offset = v[11];
    c->local_num_experts = v[12];
    c->precision = (fp4moe_precision)narrow(v[13]);
    c->fc2_input_fp8 = narrow(v[14]);
    c->decode_threshold = v[15];
    c->max_tokens = v[16];
    c->swiglu_alpha = f[0];
    c->swiglu_beta = f[1];
    c->swiglu_limit = f[2];
    c->routed_scaling_factor = f[3];
}

/* One serialised array: where it lives in plan_weights and how many bytes it must hold. */
typedef struct array_view {
    const void *data;
    uint64_t bytes;
} array_view;

static void plan_arrays(const fp4moe_plan *p, array_view a[NUM_ARRAYS])
{
    const fp4moe_config *c = &p->cfg;
    const uint64_t el = (uint64_t)p->e_loc, f = sizeof(float);
    const plan_weights *w = &p->w;
    const array_view views[NUM_ARRAYS] = {
        {w->w1, (uint64_t)plan_w1_bytes(c)},
        {w->w1_scale, (uint64_t)plan_w1_scale_bytes(c)},
        {w->w1_global, el * f},
        {w->w1_global_half2, el * f},
        {w->w2, (uint64_t)plan_w2_bytes(c)},
        {w->w2_scale, (uint64_t)plan_w2_scale_bytes(c)},
        {w->w2_global, el * f},
        {w->b1, el * (uint64_t)p->n1 * f},
        {w->b2, el * (uint64_t)c->hidden_size * f},
        {w->routing_bias, (uint64_t)c->num_experts * f},
        {w->a1_global, el * f},
        {w->a2_global, el * f},
        {w->fc2_input_fp8_scale, el * f},
        {w->swiglu_alpha, el * f},
        {w->swiglu_beta, el * f},
        {w->swiglu_limit, el * f}};
    memcpy(a, views, sizeof views);
}

/* Array i when the backend holds it (matrices_in_backend: w1, w1_scale, w2, w2_scale): its
 * PLAN_MATRIX_* for ops->export_matrix; else -1. */
static int exported_matrix(const fp4moe_plan *p, int i)
{
    if (!p->matrices_in_backend) return -1;
    switch (i) {
    case 0: return PLAN_MATRIX_W1;
    case 1: return PLAN_MATRIX_W1_SCALE;
    case 4: return PLAN_MATRIX_W2;
    case 5: return PLAN_MATRIX_W2_SCALE;
    default: return -1;
    }
}

static int present(const fp4moe_plan *p, const array_view *a, int i)
{
    return a[i].data != NULL || exported_matrix(p, i) >= 0;
}

static void put_u32(uint8_t **p, uint32_t v)
{
    for (int i = 0; i < 4; i++) *(*p)++ = (uint8_t)(v >> (8 * i));
}

static void put_u64(uint8_t **p, uint64_t v)
{
    for (int i = 0; i < 8; i++) *(*p)++ = (uint8_t)(v >> (8 * i));
}

static uint64_t get_u64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static uint32_t get_u32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) v |= (uint32_t)p[i] << (8 * i);
    return v;
}

static uint64_t total_size(const fp4moe_plan *plan)
{
    array_view a[NUM_ARRAYS];
    plan_arrays(plan, a);
    uint64_t n = HEADER_BYTES + NUM_INTS * 8 + NUM_FLOATS * 4 + 4 + 4;
    for (int i = 0; i < NUM_ARRAYS; i++)
        if (present(plan, a, i)) n += 8 + a[i].bytes;
    return n;
}

fp4moe_status fp4moe_plan_serialized_size(const fp4moe_plan *plan, size_t *bytes)
{
    if (plan == NULL) return FP4MOE_ERROR_INVALID_ARGUMENT;
    fp4moe_clear_error(plan->ctx);
    if (bytes == NULL) return fp4moe_fail(plan->ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "bytes is NULL");
    *bytes = (size_t)total_size(plan);
    return FP4MOE_SUCCESS;
}

fp4moe_status fp4moe_plan_serialize(const fp4moe_plan *plan, void *buffer, size_t buffer_bytes,
                                    size_t *written)
{
    if (plan == NULL) return FP4MOE_ERROR_INVALID_ARGUMENT;
    fp4moe_context *ctx = plan->ctx;
    fp4moe_clear_error(ctx);
    if (buffer == NULL) return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "buffer is NULL");
    uint64_t need = total_size(plan);
    if (buffer_bytes < need)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                           "buffer_bytes = %zu, the plan needs %llu (fp4moe_plan_serialized_size)",
                           buffer_bytes, (unsigned long long)need);
    uint8_t *p = buffer;
    memcpy(p, MAGIC, 8);
    p += 8;
    put_u32(&p, FORMAT_VERSION);
    put_u32(&p, HEADER_BYTES);
    put_u64(&p, need);
    put_u64(&p, 0);
    int64_t ints[NUM_INTS];
    config_ints(&plan->cfg, ints);
    for (int i = 0; i < NUM_INTS; i++) put_u64(&p, (uint64_t)ints[i]);
    const float floats[NUM_FLOATS] = {plan->cfg.swiglu_alpha, plan->cfg.swiglu_beta,
                                      plan->cfg.swiglu_limit, plan->cfg.routed_scaling_factor};
    for (int i = 0; i < NUM_FLOATS; i++) {
        uint32_t bits;
        memcpy(&bits, &floats[i], 4);
        put_u32(&p, bits);
    }
    array_view a[NUM_ARRAYS];
    plan_arrays(plan, a);
    uint32_t mask = 0;
    for (int i = 0; i < NUM_ARRAYS; i++)
        if (present(plan, a, i)) mask |= 1u << i;
    put_u32(&p, mask);
    for (int i = 0; i < NUM_ARRAYS; i++) {
        if (!present(plan, a, i)) continue;
        put_u64(&p, a[i].bytes);
        if (a[i].data != NULL) memcpy(p, a[i].data, (size_t)a[i].bytes);
        else plan->ops->export_matrix(plan, exported_matrix(plan, i), p);
        p += a[i].bytes;
    }
    uint32_t crc = (uint32_t)crc32_z(0L, buffer, (size_t)(p - (uint8_t *)buffer));
    put_u32(&p, crc);
    if (written != NULL) *written = (size_t)need;
    return FP4MOE_SUCCESS;
}

/* Expected byte counts of each array for a configuration (0 where a count cannot be formed). */
static void expected_bytes(const fp4moe_config *c, uint64_t out[NUM_ARRAYS])
{
    fp4moe_plan shape;
    memset(&shape, 0, sizeof shape);
    shape.cfg = *c;
    shape.e_loc = c->local_num_experts;
    shape.n1 = fp4moe_config_fc1_rows(c);
    array_view a[NUM_ARRAYS];
    plan_arrays(&shape, a);
    for (int i = 0; i < NUM_ARRAYS; i++) out[i] = a[i].bytes;
}

static fp4moe_status corrupt(fp4moe_context *ctx, const char *what)
{
    return fp4moe_fail(ctx, FP4MOE_ERROR_CORRUPT_DATA, "serialised plan: %s", what);
}

fp4moe_status fp4moe_plan_deserialize(fp4moe_context *ctx, const void *buffer,
                                      size_t buffer_bytes, fp4moe_plan **out)
{
    if (ctx == NULL) return FP4MOE_ERROR_INVALID_ARGUMENT;
    fp4moe_clear_error(ctx);
    if (out == NULL) return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "out is NULL");
    *out = NULL;
    if (buffer == NULL) return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "buffer is NULL");
    const uint8_t *b = buffer;
    const size_t fixed = HEADER_BYTES + NUM_INTS * 8 + NUM_FLOATS * 4 + 4 + 4;
    if (buffer_bytes < fixed) return corrupt(ctx, "shorter than its fixed part");
    if (memcmp(b, MAGIC, 8) != 0) return corrupt(ctx, "bad magic (not an fp4moe plan)");
    uint32_t version = get_u32(b + 8);
    if (version != FORMAT_VERSION)
        return fp4moe_fail(ctx, FP4MOE_ERROR_VERSION_MISMATCH,
                           "serialised plan format %u, this library reads %u", version,
                           FORMAT_VERSION);
    if (get_u32(b + 12) != HEADER_BYTES || get_u64(b + 24) != 0) return corrupt(ctx, "bad header");
    if (get_u64(b + 16) != buffer_bytes) return corrupt(ctx, "size field differs from the buffer size");
    if ((uint32_t)crc32_z(0L, b, buffer_bytes - 4) != get_u32(b + buffer_bytes - 4))
        return corrupt(ctx, "checksum mismatch");

    const uint8_t *p = b + HEADER_BYTES;
    int64_t ints[NUM_INTS];
    float floats[NUM_FLOATS];
    for (int i = 0; i < NUM_INTS; i++, p += 8) ints[i] = (int64_t)get_u64(p);
    for (int i = 0; i < NUM_FLOATS; i++, p += 4) {
        uint32_t bits = get_u32(p);
        memcpy(&floats[i], &bits, 4);
    }
    uint32_t mask = get_u32(p);
    p += 4;
    fp4moe_config cfg;
    config_from_ints(ints, floats, &cfg);
    fp4moe_config normal;
    if (plan_normalise_config(ctx, &cfg, &normal) != FP4MOE_SUCCESS) {
        char why[FP4MOE_MESSAGE_BYTES];
        memcpy(why, ctx->last_error, sizeof why);
        return fp4moe_fail(ctx, FP4MOE_ERROR_CORRUPT_DATA, "serialised plan: bad config: %s", why);
    }
    if (mask >> NUM_ARRAYS) return corrupt(ctx, "unknown arrays in the presence mask");

    uint64_t expect[NUM_ARRAYS];
    expected_bytes(&normal, expect);
    const uint8_t *data[NUM_ARRAYS] = {0};
    const uint8_t *end = b + buffer_bytes - 4;
    for (int i = 0; i < NUM_ARRAYS; i++) {
        if (!(mask & (1u << i))) continue;
        if ((size_t)(end - p) < 8) return corrupt(ctx, "truncated array header");
        uint64_t n = get_u64(p);
        p += 8;
        if (n != expect[i]) return corrupt(ctx, "an array's size does not match the config");
        if ((uint64_t)(end - p) < n) return corrupt(ctx, "truncated array");
        data[i] = p;
        p += n;
    }
    if (p != end) return corrupt(ctx, "trailing bytes after the arrays");
    for (int i = 0; i < 7; i++)
        if (data[i] == NULL) return corrupt(ctx, "a required weight array is missing");

    /* Float arrays may sit at any alignment in the caller's buffer: copy them out before use. */
    float *floats_copy[NUM_ARRAYS] = {0};
    fp4moe_status status = FP4MOE_SUCCESS;
    for (int i = 0; i < NUM_ARRAYS && status == FP4MOE_SUCCESS; i++) {
        int is_bytes = i == 0 || i == 1 || i == 4 || i == 5;
        if (data[i] == NULL || is_bytes) continue;
        floats_copy[i] = malloc(expect[i] ? (size_t)expect[i] : 1);
        if (floats_copy[i] == NULL)
            status = fp4moe_fail(ctx, FP4MOE_ERROR_OUT_OF_MEMORY, "cannot allocate a scale array");
        else
            memcpy(floats_copy[i], data[i], (size_t)expect[i]);
    }
    if (status == FP4MOE_SUCCESS) {
        fp4moe_weights w;
        memset(&w, 0, sizeof w);
        w.w1 = data[0];
        w.w1_scale = data[1];
        w.w1_global_scale = floats_copy[2];
        const int gated = fp4moe_config_fc1_rows(&normal) == 2 * normal.intermediate_size;
        w.w1_global_scale_half2 = gated ? floats_copy[3] : NULL;
        w.w2 = data[4];
        w.w2_scale = data[5];
        w.w2_global_scale = floats_copy[6];
        w.b1 = floats_copy[7];
        w.b2 = floats_copy[8];
        w.routing_bias = floats_copy[9];
        w.a1_global_scale = floats_copy[10];
        w.a2_global_scale = floats_copy[11];
        w.fc2_input_fp8_scale = floats_copy[12];
        w.swiglu_alpha = floats_copy[13];
        w.swiglu_beta = floats_copy[14];
        w.swiglu_limit = floats_copy[15];
        w.w1_scale_layout = FP4MOE_SCALE_LINEAR;
        w.w2_scale_layout = FP4MOE_SCALE_LINEAR;
        status = fp4moe_plan_create(ctx, &normal, &w, out);
        if (status == FP4MOE_ERROR_INVALID_ARGUMENT) {
            char why[FP4MOE_MESSAGE_BYTES];
            memcpy(why, ctx->last_error, sizeof why);
            status = fp4moe_fail(ctx, FP4MOE_ERROR_CORRUPT_DATA, "serialised plan: %s", why);
        }
    }
    for (int i = 0; i < NUM_ARRAYS; i++) free(floats_copy[i]);
    return status;
}
