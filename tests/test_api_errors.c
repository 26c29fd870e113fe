/* Every class of bad input gets its documented status and a non-empty fp4moe_last_error, a
 * failing plan_create leaves *out NULL, and no call (failing or not) writes outside its output
 * buffers: inputs are compared with copies and outputs sit between guard bytes. NaN logits are
 * ranked as the header documents (below every number, ties toward the lower index). */
#include <stdlib.h>
#include <string.h>

#include "fp4moe.h"
#include "ref/ref_moe.h"
#include "testing.h"

#define TEST_NAME "test_api_errors"
#define GUARD 256 /* bytes of guard on each side of an output; keeps 256-byte alignment */

static const fp4moe_status BAD = FP4MOE_ERROR_INVALID_ARGUMENT;

typedef struct env {
    testing_state st;
    testing_rng rng;
    fp4moe_context *ctx;
} env;

/* status as expected, and a message whenever it is a failure on a context */
static void expect(env *v, fp4moe_status got, fp4moe_status want, const char *what)
{
    const char *msg = fp4moe_last_error(v->ctx);
    CHECK(&v->st, got == want, "%s: got %s, want %s (%s)", what, fp4moe_status_string(got),
          fp4moe_status_string(want), msg);
    if (want != FP4MOE_SUCCESS && got == want)
        CHECK(&v->st, msg != NULL && msg[0] != '\0', "%s: empty fp4moe_last_error", what);
}

/* ------------------------------------------------------------------ guarded buffers */
typedef struct guarded {
    uint8_t *base;
    size_t bytes;
} guarded;

static void *guarded_alloc(guarded *g, size_t bytes)
{
    g->bytes = bytes;
    g->base = aligned_alloc(256, GUARD + (bytes + 255) / 256 * 256 + GUARD);
    if (!g->base) return NULL;
    memset(g->base, 0xA5, GUARD + (bytes + 255) / 256 * 256 + GUARD);
    return g->base + GUARD;
}

static int guards_intact(const guarded *g)
{
    const size_t total = GUARD + (g->bytes + 255) / 256 * 256 + GUARD;
    for (size_t i = 0; i < total; i++) {
        if (i >= GUARD && i < GUARD + g->bytes) continue;
        if (g->base[i] != 0xA5) return 0;
    }
    return 1;
}

/* ------------------------------------------------------------------ configurations */
static fp4moe_config base_config(void)
{
    fp4moe_config c;
    fp4moe_config_init(&c);
    c.num_experts = 8;
    c.top_k = 2;
    c.hidden_size = 32;
    c.intermediate_size = 32;
    c.activation = FP4MOE_ACT_SWIGLU;
    c.routing = FP4MOE_ROUTING_RENORMALIZE;
    c.max_tokens = 8;
    return c;
}

static void check_bad_config(env *v, const ref_layer *L, const fp4moe_config *c, const char *what)
{
    expect(v, fp4moe_config_validate(v->ctx, c), BAD, what);
    fp4moe_plan *plan = (fp4moe_plan *)(uintptr_t)0x1; /* must be reset to NULL */
    fp4moe_weights w = L->w;
    w.routing_bias = NULL;
    fp4moe_status s = fp4moe_plan_create(v->ctx, c, &w, &plan);
    expect(v, s, BAD, what);
    CHECK(&v->st, plan == NULL, "%s: plan_create failed but *out is not NULL", what);
    if (s == FP4MOE_SUCCESS) fp4moe_plan_destroy(plan);
}

static void config_errors(env *v, const ref_layer *L)
{
    const fp4moe_config base = base_config();
    fp4moe_config c;
#define BAD_CONFIG(what, mutation) \
    do {                           \
        c = base;                  \
        mutation;                  \
        check_bad_config(v, L, &c, what); \
    } while (0)
    BAD_CONFIG("num_experts 0", c.num_experts = 0);
    BAD_CONFIG("num_experts -3", c.num_experts = -3);
    BAD_CONFIG("top_k 0", c.top_k = 0);
    BAD_CONFIG("top_k -1", c.top_k = -1);
    BAD_CONFIG("top_k > E", c.top_k = 9);
    BAD_CONFIG("top_k > 32", (c.num_experts = 64, c.top_k = 33));
    BAD_CONFIG("hidden 0", c.hidden_size = 0);
    BAD_CONFIG("hidden -32", c.hidden_size = -32);
    BAD_CONFIG("hidden not a multiple of 16", c.hidden_size = 40);
    BAD_CONFIG("intermediate 0", c.intermediate_size = 0);
    BAD_CONFIG("intermediate not a multiple of 16", c.intermediate_size = 24);
    BAD_CONFIG("n_group does not divide E", (c.routing = FP4MOE_ROUTING_DEEPSEEK_V3, c.n_group = 3));
    BAD_CONFIG("n_group 0", (c.routing = FP4MOE_ROUTING_DEEPSEEK_V3, c.n_group = 0));
    BAD_CONFIG("topk_group > n_group", (c.routing = FP4MOE_ROUTING_DEEPSEEK_V3, c.n_group = 4, c.topk_group = 5));
    BAD_CONFIG("topk_group 0", (c.routing = FP4MOE_ROUTING_DEEPSEEK_V3, c.n_group = 4, c.topk_group = 0));
    BAD_CONFIG("local offset -1", c.local_expert_offset = -1);
    BAD_CONFIG("local offset E", c.local_expert_offset = 8);
    BAD_CONFIG("local count beyond E", (c.local_expert_offset = 4, c.local_num_experts = 5));
    BAD_CONFIG("local count negative", c.local_num_experts = -1);
    BAD_CONFIG("llama4 with k 2", c.routing = FP4MOE_ROUTING_LLAMA4);
    BAD_CONFIG("on input with k 2", c.apply_router_weight_on_input = 1);
    BAD_CONFIG("fp8 down with w4a4", (c.precision = FP4MOE_PRECISION_W4A4, c.fc2_input_fp8 = 1));
    BAD_CONFIG("activation 99", c.activation = (fp4moe_activation)99);
    BAD_CONFIG("routing 99", c.routing = (fp4moe_routing)99);
    BAD_CONFIG("precision 7", c.precision = (fp4moe_precision)7);
    BAD_CONFIG("gate_up_order 5", c.gate_up_order = (fp4moe_gate_up_order)5);
    BAD_CONFIG("max_tokens 0", c.max_tokens = 0);
    BAD_CONFIG("decode_threshold -2", c.decode_threshold = -2);
    BAD_CONFIG("swiglu_limit NaN", c.swiglu_limit = NAN);
#undef BAD_CONFIG
    expect(v, fp4moe_config_validate(v->ctx, NULL), BAD, "config_validate(NULL)");
    c = base;
    expect(v, fp4moe_config_validate(v->ctx, &c), FP4MOE_SUCCESS, "valid config");
    c.decode_threshold = FP4MOE_DECODE_THRESHOLD_AUTO;
    expect(v, fp4moe_config_validate(v->ctx, &c), FP4MOE_SUCCESS, "decode_threshold auto");
    c.decode_threshold = 0;
    expect(v, fp4moe_config_validate(v->ctx, &c), FP4MOE_SUCCESS, "decode_threshold 0");
    c = base;
    CHECK(&v->st, fp4moe_last_error(v->ctx)[0] == '\0', "success leaves a message: %s",
          fp4moe_last_error(v->ctx));
}

/* ------------------------------------------------------------------ weights */
static void check_bad_weights(env *v, const fp4moe_config *c, const fp4moe_weights *w, const char *what)
{
    fp4moe_plan *plan = (fp4moe_plan *)(uintptr_t)0x1;
    fp4moe_status s = fp4moe_plan_create(v->ctx, c, w, &plan);
    expect(v, s, BAD, what);
    CHECK(&v->st, plan == NULL, "%s: plan_create failed but *out is not NULL", what);
    if (s == FP4MOE_SUCCESS) fp4moe_plan_destroy(plan);
}

static void weight_errors(env *v, const ref_layer *L)
{
    const fp4moe_config base = base_config();
    fp4moe_config c = base;
    fp4moe_weights w0 = L->w;
    w0.routing_bias = NULL;
    w0.a1_global_scale = w0.a2_global_scale = w0.fc2_input_fp8_scale = NULL;
    fp4moe_weights w;
    const float nan = NAN, inf = INFINITY, zero = 0.0f, negative = -1.0f;
    float scales[8];

#define BAD_WEIGHTS(what, cfg_mutation, mutation) \
    do {                                          \
        c = base;                                 \
        w = w0;                                   \
        cfg_mutation;                             \
        mutation;                                 \
        check_bad_weights(v, &c, &w, what);       \
    } while (0)
    BAD_WEIGHTS("w1 NULL", (void)0, w.w1 = NULL);
    BAD_WEIGHTS("w1_scale NULL", (void)0, w.w1_scale = NULL);
    BAD_WEIGHTS("w1_global_scale NULL", (void)0, w.w1_global_scale = NULL);
    BAD_WEIGHTS("w2 NULL", (void)0, w.w2 = NULL);
    BAD_WEIGHTS("w2_scale NULL", (void)0, w.w2_scale = NULL);
    BAD_WEIGHTS("w2_global_scale NULL", (void)0, w.w2_global_scale = NULL);
    /* routing bias where the method forbids it */
    const fp4moe_routing no_bias[] = {FP4MOE_ROUTING_TOPK, FP4MOE_ROUTING_SIGMOID,
                                      FP4MOE_ROUTING_SIGMOID_RENORM, FP4MOE_ROUTING_TOPK_SIGMOID};
    for (size_t i = 0; i < sizeof no_bias / sizeof no_bias[0]; i++)
        BAD_WEIGHTS("routing bias with a method that takes none", c.routing = no_bias[i],
                    w.routing_bias = L->w.routing_bias);
    BAD_WEIGHTS("routing bias with llama4", (c.routing = FP4MOE_ROUTING_LLAMA4, c.top_k = 1),
                w.routing_bias = L->w.routing_bias);
    /* mode scales missing */
    BAD_WEIGHTS("w4a4 without a1", c.precision = FP4MOE_PRECISION_W4A4, w.a2_global_scale = L->w.a2_global_scale);
    BAD_WEIGHTS("w4a4 without a2", c.precision = FP4MOE_PRECISION_W4A4, w.a1_global_scale = L->w.a1_global_scale);
    BAD_WEIGHTS("w4a4 without a1 and a2", c.precision = FP4MOE_PRECISION_W4A4, (void)0);
    BAD_WEIGHTS("fp8 down without scales", c.fc2_input_fp8 = 1, (void)0);
    BAD_WEIGHTS("fp8 down with w4a4", (c.fc2_input_fp8 = 1, c.precision = FP4MOE_PRECISION_W4A4),
                (w.a1_global_scale = L->w.a1_global_scale, w.a2_global_scale = L->w.a2_global_scale,
                 w.fc2_input_fp8_scale = L->w.fc2_input_fp8_scale));
    /* non-finite or non-positive global scales, each position of each array */
    const float bad_values[] = {nan, inf, zero, negative};
    for (size_t b = 0; b < 4; b++) {
        const int pos = (int)testing_int(&v->rng, 0, 7);
        memcpy(scales, L->w.w1_global_scale, sizeof scales);
        scales[pos] = bad_values[b];
        BAD_WEIGHTS("bad w1_global_scale", (void)0, w.w1_global_scale = scales);
        BAD_WEIGHTS("bad w1_global_scale_half2", (void)0, w.w1_global_scale_half2 = scales);
        BAD_WEIGHTS("bad w2_global_scale", (void)0, w.w2_global_scale = scales);
        BAD_WEIGHTS("bad a1_global_scale", c.precision = FP4MOE_PRECISION_W4A4,
                    (w.a1_global_scale = scales, w.a2_global_scale = L->w.a2_global_scale));
        BAD_WEIGHTS("bad a2_global_scale", c.precision = FP4MOE_PRECISION_W4A4,
                    (w.a1_global_scale = L->w.a1_global_scale, w.a2_global_scale = scales));
        BAD_WEIGHTS("bad fc2_input_fp8_scale", c.fc2_input_fp8 = 1, w.fc2_input_fp8_scale = scales);
    }
    /* a misaligned float array and an E4M3 NaN block scale (0x7f / 0xff) */
    float unaligned_storage[9];
    const float *unaligned = (const float *)((const char *)unaligned_storage + 2);
    BAD_WEIGHTS("w2_global_scale misaligned", (void)0, w.w2_global_scale = unaligned);
    {
        const int64_t n1 = c.intermediate_size * 2, scale_bytes = c.local_num_experts
                               ? c.local_num_experts * n1 * (c.hidden_size / 16)
                               : c.num_experts * n1 * (c.hidden_size / 16);
        uint8_t *nan_scales = malloc((size_t)scale_bytes);
        if (nan_scales != NULL && w0.w1_scale != NULL) {
            memcpy(nan_scales, w0.w1_scale, (size_t)scale_bytes);
            nan_scales[testing_int(&v->rng, 0, scale_bytes - 1)] = testing_int(&v->rng, 0, 1) ? 0x7f : 0xff;
            BAD_WEIGHTS("NaN block scale in w1_scale", (void)0, w.w1_scale = nan_scales);
        }
        free(nan_scales);
    }
#undef BAD_WEIGHTS

    fp4moe_plan *plan = (fp4moe_plan *)(uintptr_t)0x1;
    c = base;
    expect(v, fp4moe_plan_create(v->ctx, NULL, &w0, &plan), BAD, "plan_create(cfg NULL)");
    CHECK(&v->st, plan == NULL, "plan_create(cfg NULL) left *out set");
    plan = (fp4moe_plan *)(uintptr_t)0x1;
    expect(v, fp4moe_plan_create(v->ctx, &c, NULL, &plan), BAD, "plan_create(weights NULL)");
    CHECK(&v->st, plan == NULL, "plan_create(weights NULL) left *out set");
    expect(v, fp4moe_plan_create(v->ctx, &c, &w0, NULL), BAD, "plan_create(out NULL)");
    plan = (fp4moe_plan *)(uintptr_t)0x1;
    CHECK(&v->st, fp4moe_plan_create(NULL, &c, &w0, &plan) == BAD, "plan_create(ctx NULL)");
}

/* ------------------------------------------------------------------ context */
static void context_errors(env *v)
{
    fp4moe_context_options o;
    fp4moe_context_options_init(&o);
    CHECK(&v->st, fp4moe_context_create(&o, NULL) == BAD, "context_create(out NULL)");
    fp4moe_context *ctx = (fp4moe_context *)(uintptr_t)0x1;
    o.backend = (fp4moe_backend)9;
    CHECK(&v->st, fp4moe_context_create(&o, &ctx) == BAD && ctx == NULL, "context_create(backend 9)");
    fp4moe_context_options_init(&o);
    o.num_threads = -2;
    ctx = (fp4moe_context *)(uintptr_t)0x1;
    CHECK(&v->st, fp4moe_context_create(&o, &ctx) == BAD && ctx == NULL, "context_create(threads -2)");
    CHECK(&v->st, fp4moe_last_error(NULL) != NULL && fp4moe_last_error(NULL)[0] == '\0',
          "fp4moe_last_error(NULL) is not \"\"");
    fp4moe_context_destroy(NULL);
    fp4moe_plan_destroy(NULL);
}

/* ------------------------------------------------------------------ forward calls */
typedef struct call_buffers {
    float *hidden, *hidden_copy, *logits, *logits_copy, *tw, *pts;
    int32_t *ids;
    guarded g_out, g_ids, g_w, g_off;
    float *out, *w_out, *out_off;
    int32_t *ids_out;
    void *ws;
    size_t ws_bytes;
} call_buffers;

static int inputs_intact(const call_buffers *b, int64_t T, int64_t H, int64_t E)
{
    return memcmp(b->hidden, b->hidden_copy, (size_t)(T * H) * 4) == 0 &&
           memcmp(b->logits, b->logits_copy, (size_t)(T * E) * 4) == 0 && guards_intact(&b->g_out) &&
           guards_intact(&b->g_ids) && guards_intact(&b->g_w) && guards_intact(&b->g_off);
}

static void forward_errors(env *v, const ref_layer *L)
{
    testing_state *st = &v->st;
    fp4moe_config c = base_config();
    fp4moe_weights w = L->w;
    w.a1_global_scale = w.a2_global_scale = w.fc2_input_fp8_scale = NULL;
    fp4moe_plan *plan = NULL;
    expect(v, fp4moe_plan_create(v->ctx, &c, &w, &plan), FP4MOE_SUCCESS, "plan_create (valid)");
    if (!plan) return;
    const int64_t T = 5, H = c.hidden_size, E = c.num_experts, k = c.top_k, MAXT = c.max_tokens;

    call_buffers b;
    memset(&b, 0, sizeof b);
    b.hidden = aligned_alloc(256, 256 * ((size_t)(MAXT * H) * 4 / 256 + 1));
    b.hidden_copy = malloc((size_t)(MAXT * H) * 4);
    b.logits = aligned_alloc(256, 256 * ((size_t)(MAXT * E) * 4 / 256 + 1));
    b.logits_copy = malloc((size_t)(MAXT * E) * 4);
    b.tw = malloc((size_t)(MAXT * k) * 4);
    b.pts = malloc((size_t)MAXT * 4);
    b.ids = malloc((size_t)(MAXT * k) * 4);
    b.out = guarded_alloc(&b.g_out, (size_t)(T * H) * 4);
    b.ids_out = guarded_alloc(&b.g_ids, (size_t)(T * k) * 4);
    b.w_out = guarded_alloc(&b.g_w, (size_t)(T * k) * 4);
    b.out_off = guarded_alloc(&b.g_off, (size_t)(T * k * H) * 4);
    expect(v, fp4moe_plan_workspace_size(plan, MAXT, &b.ws_bytes), FP4MOE_SUCCESS, "workspace_size");
    b.ws = aligned_alloc(256, (b.ws_bytes + 255) / 256 * 256 + 256);
    if (!b.hidden || !b.hidden_copy || !b.logits || !b.logits_copy || !b.tw || !b.pts || !b.ids ||
        !b.out || !b.ids_out || !b.w_out || !b.out_off || !b.ws) {
        CHECK(st, 0, "out of memory");
        goto done;
    }
    ref_random_fill(&v->rng, b.hidden, FP4MOE_DTYPE_F32, MAXT * H, 1.0);
    ref_random_fill(&v->rng, b.logits, FP4MOE_DTYPE_F32, MAXT * E, 2.0);
    memcpy(b.hidden_copy, b.hidden, (size_t)(MAXT * H) * 4);
    memcpy(b.logits_copy, b.logits, (size_t)(MAXT * E) * 4);
    for (int64_t i = 0; i < MAXT * k; i++) {
        b.ids[i] = (int32_t)((i * 3 + i / k) % E);
        b.tw[i] = 0.5f;
    }
    for (int64_t t = 0; t < MAXT; t++) b.pts[t] = 1.5f;

    fp4moe_forward_args good;
    fp4moe_forward_args_init(&good);
    good.num_tokens = T;
    good.hidden_states = b.hidden;
    good.router_logits = b.logits;
    good.topk_ids = b.ids;
    good.topk_weights = b.tw;
    good.per_token_scale = b.pts;
    good.output = b.out;
    good.topk_ids_out = b.ids_out;
    good.topk_weights_out = b.w_out;

    /* the valid calls succeed and touch nothing but their outputs */
    expect(v, fp4moe_forward(plan, &good, b.ws, b.ws_bytes, NULL), FP4MOE_SUCCESS, "valid forward");
    CHECK(st, inputs_intact(&b, MAXT, H, E), "valid forward wrote outside its outputs");
    expect(v, fp4moe_forward_routed(plan, &good, b.ws, b.ws_bytes, NULL), FP4MOE_SUCCESS, "valid forward_routed");
    CHECK(st, inputs_intact(&b, MAXT, H, E), "valid forward_routed wrote outside its outputs");
    expect(v, fp4moe_route(plan, T, b.logits, FP4MOE_DTYPE_F32, b.ids_out, b.w_out, b.ws, b.ws_bytes, NULL),
           FP4MOE_SUCCESS, "valid route");
    CHECK(st, inputs_intact(&b, MAXT, H, E), "valid route wrote outside its outputs");
    fp4moe_forward_args off = good;
    off.skip_finalize = 1;
    off.output = b.out_off;
    expect(v, fp4moe_forward(plan, &off, b.ws, b.ws_bytes, NULL), FP4MOE_SUCCESS, "valid finalize off");
    CHECK(st, inputs_intact(&b, MAXT, H, E), "finalize off wrote outside its outputs");

    fp4moe_forward_args a;
#define BAD_FORWARD(what, want, mutation, fn, ws_bytes)                                  \
    do {                                                                                 \
        a = good;                                                                        \
        mutation;                                                                        \
        expect(v, fn(plan, &a, b.ws, ws_bytes, NULL), want, what);                       \
        CHECK(st, inputs_intact(&b, MAXT, H, E), "%s: wrote outside its outputs", what); \
    } while (0)
#define BAD_BOTH(what, want, mutation)                                          \
    do {                                                                        \
        BAD_FORWARD(what " (forward)", want, mutation, fp4moe_forward, b.ws_bytes);        \
        BAD_FORWARD(what " (forward_routed)", want, mutation, fp4moe_forward_routed, b.ws_bytes); \
    } while (0)
    BAD_BOTH("hidden NULL", BAD, a.hidden_states = NULL);
    /* misaligned tensors (one byte off their element size) */
    BAD_BOTH("hidden misaligned", BAD, a.hidden_states = (const char *)b.hidden + 1);
    BAD_BOTH("output misaligned", BAD, a.output = (char *)b.out + 2);
    BAD_BOTH("per_token_scale misaligned", BAD, a.per_token_scale = (const float *)((const char *)b.pts + 1));
    BAD_FORWARD("logits misaligned", BAD, a.router_logits = (const char *)b.logits + 3, fp4moe_forward, b.ws_bytes);
    BAD_FORWARD("topk_ids misaligned", BAD, a.topk_ids = (const int32_t *)((const char *)b.ids + 2),
                fp4moe_forward_routed, b.ws_bytes);
    expect(v, fp4moe_forward(plan, &good, (char *)b.ws + 16, b.ws_bytes, NULL), BAD,
           "workspace not 256-byte aligned");
    BAD_BOTH("output NULL", BAD, a.output = NULL);
    BAD_BOTH("T 0", BAD, a.num_tokens = 0);
    BAD_BOTH("T -1", BAD, a.num_tokens = -1);
    BAD_BOTH("T > max_tokens", BAD, a.num_tokens = MAXT + 1);
    BAD_BOTH("hidden dtype I32", BAD, a.hidden_dtype = FP4MOE_DTYPE_I32);
    BAD_BOTH("hidden dtype U8", BAD, a.hidden_dtype = FP4MOE_DTYPE_U8);
    BAD_BOTH("hidden dtype 42", BAD, a.hidden_dtype = (fp4moe_dtype)42);
    BAD_BOTH("output dtype F16 with F32 hidden", BAD, a.output_dtype = FP4MOE_DTYPE_F16);
    BAD_BOTH("output dtype E4M3", BAD, a.output_dtype = FP4MOE_DTYPE_E4M3);
    BAD_BOTH("skip_finalize 2", BAD, a.skip_finalize = 2);
    BAD_BOTH("output overlaps hidden", BAD, a.output = b.hidden + H);
    BAD_BOTH("output overlaps per_token_scale", BAD, a.per_token_scale = b.out + 3);
    BAD_BOTH("in place with finalize off", BAD, (a.output = b.hidden, a.skip_finalize = 1));
    BAD_FORWARD("logits NULL", BAD, a.router_logits = NULL, fp4moe_forward, b.ws_bytes);
    BAD_FORWARD("logits dtype E4M3", BAD, a.router_logits_dtype = FP4MOE_DTYPE_E4M3, fp4moe_forward, b.ws_bytes);
    BAD_FORWARD("output overlaps logits", BAD, a.router_logits = b.out, fp4moe_forward, b.ws_bytes);
    BAD_FORWARD("output overlaps topk_ids_out", BAD, a.topk_ids_out = (int32_t *)b.out + 2, fp4moe_forward, b.ws_bytes);
    BAD_FORWARD("topk_ids NULL", BAD, a.topk_ids = NULL, fp4moe_forward_routed, b.ws_bytes);
    BAD_FORWARD("topk_weights NULL", BAD, a.topk_weights = NULL, fp4moe_forward_routed, b.ws_bytes);
    BAD_FORWARD("topk_weights dtype I32", BAD, a.topk_weights_dtype = FP4MOE_DTYPE_I32, fp4moe_forward_routed, b.ws_bytes);
    BAD_FORWARD("output overlaps topk_ids", BAD, a.topk_ids = (const int32_t *)b.out, fp4moe_forward_routed, b.ws_bytes);
    size_t need_t = 0; /* what a call with T tokens needs (at most b.ws_bytes) */
    expect(v, fp4moe_plan_workspace_size(plan, T, &need_t), FP4MOE_SUCCESS, "workspace_size(T)");
    CHECK(st, need_t <= b.ws_bytes, "workspace for T = %lld (%zu) exceeds the one for max_tokens (%zu)",
          (long long)T, need_t, b.ws_bytes);
    if (need_t > 0) {
        BAD_FORWARD("workspace too small", FP4MOE_ERROR_WORKSPACE_TOO_SMALL, (void)0, fp4moe_forward, need_t - 1);
        BAD_FORWARD("workspace too small (routed)", FP4MOE_ERROR_WORKSPACE_TOO_SMALL, (void)0, fp4moe_forward_routed, 0);
        a = good;
        expect(v, fp4moe_forward(plan, &a, NULL, b.ws_bytes, NULL), BAD, "workspace NULL");
        expect(v, fp4moe_route(plan, T, b.logits, FP4MOE_DTYPE_F32, b.ids_out, b.w_out, b.ws, need_t - 1, NULL),
               FP4MOE_ERROR_WORKSPACE_TOO_SMALL, "route workspace too small");
        expect(v, fp4moe_forward(plan, &a, (uint8_t *)b.ws + 16, b.ws_bytes, NULL), BAD,
               "workspace not 256-byte aligned");
    }
    /* ids out of range */
    int32_t saved = b.ids[3];
    b.ids[3] = (int32_t)E;
    BAD_FORWARD("topk_ids = E", BAD, (void)0, fp4moe_forward_routed, b.ws_bytes);
    b.ids[3] = -1;
    BAD_FORWARD("topk_ids = -1", BAD, (void)0, fp4moe_forward_routed, b.ws_bytes);
    b.ids[3] = saved;
    /* no plan, no context to hold a message: the status alone */
    CHECK(st, fp4moe_forward(NULL, &good, b.ws, b.ws_bytes, NULL) == BAD, "forward(plan NULL)");
    CHECK(st, fp4moe_forward_routed(NULL, &good, b.ws, b.ws_bytes, NULL) == BAD, "forward_routed(plan NULL)");
    expect(v, fp4moe_forward(plan, NULL, b.ws, b.ws_bytes, NULL), BAD, "forward(args NULL)");
    expect(v, fp4moe_forward_routed(plan, NULL, b.ws, b.ws_bytes, NULL), BAD, "forward_routed(args NULL)");
#undef BAD_BOTH
#undef BAD_FORWARD

    /* in place: output == hidden_states, same dtype, finalize on: the same result */
    a = good;
    a.topk_ids_out = NULL;
    a.topk_weights_out = NULL;
    expect(v, fp4moe_forward(plan, &a, b.ws, b.ws_bytes, NULL), FP4MOE_SUCCESS, "forward before in place");
    float *in_place = malloc((size_t)(T * H) * 4);
    if (in_place) {
        memcpy(in_place, b.hidden, (size_t)(T * H) * 4);
        a.hidden_states = in_place;
        a.output = in_place;
        expect(v, fp4moe_forward(plan, &a, b.ws, b.ws_bytes, NULL), FP4MOE_SUCCESS, "forward in place");
        CHECK(st, memcmp(in_place, b.out, (size_t)(T * H) * 4) == 0, "in-place result differs");
        free(in_place);
    }

    /* routing alone */
    CHECK(st, fp4moe_route(NULL, T, b.logits, FP4MOE_DTYPE_F32, b.ids_out, b.w_out, b.ws, b.ws_bytes, NULL) == BAD,
          "route(plan NULL)");
    expect(v, fp4moe_route(plan, 0, b.logits, FP4MOE_DTYPE_F32, b.ids_out, b.w_out, b.ws, b.ws_bytes, NULL), BAD, "route(T 0)");
    expect(v, fp4moe_route(plan, MAXT + 1, b.logits, FP4MOE_DTYPE_F32, b.ids_out, b.w_out, b.ws, b.ws_bytes, NULL), BAD, "route(T > max)");
    expect(v, fp4moe_route(plan, T, NULL, FP4MOE_DTYPE_F32, b.ids_out, b.w_out, b.ws, b.ws_bytes, NULL), BAD, "route(logits NULL)");
    expect(v, fp4moe_route(plan, T, b.logits, FP4MOE_DTYPE_U8, b.ids_out, b.w_out, b.ws, b.ws_bytes, NULL), BAD, "route(dtype U8)");
    expect(v, fp4moe_route(plan, T, b.logits, FP4MOE_DTYPE_F32, NULL, b.w_out, b.ws, b.ws_bytes, NULL), BAD, "route(ids NULL)");
    expect(v, fp4moe_route(plan, T, b.logits, FP4MOE_DTYPE_F32, b.ids_out, NULL, b.ws, b.ws_bytes, NULL), BAD, "route(weights NULL)");
    expect(v, fp4moe_route(plan, T, b.logits, FP4MOE_DTYPE_F32, b.ids_out, (float *)b.ids_out + 1, b.ws, b.ws_bytes, NULL), BAD, "route(ids overlap weights)");
    CHECK(st, inputs_intact(&b, MAXT, H, E), "route errors wrote outside their outputs");

    /* plan queries */
    size_t bytes = 0;
    expect(v, fp4moe_plan_workspace_size(plan, 0, &bytes), BAD, "workspace_size(T 0)");
    expect(v, fp4moe_plan_workspace_size(plan, MAXT + 1, &bytes), BAD, "workspace_size(T > max)");
    expect(v, fp4moe_plan_workspace_size(plan, 1, NULL), BAD, "workspace_size(bytes NULL)");
    CHECK(st, fp4moe_plan_workspace_size(NULL, 1, &bytes) == BAD, "workspace_size(plan NULL)");
    expect(v, fp4moe_plan_get_config(plan, NULL), BAD, "get_config(out NULL)");
    CHECK(st, fp4moe_plan_get_config(NULL, &c) == BAD, "get_config(plan NULL)");

done:
    free(b.hidden); free(b.hidden_copy); free(b.logits); free(b.logits_copy); free(b.tw); free(b.pts);
    free(b.ids); free(b.g_out.base); free(b.g_ids.base); free(b.g_w.base); free(b.g_off.base); free(b.ws);
    fp4moe_plan_destroy(plan);
}

/* ------------------------------------------------------------------ NaN logits */
/* Selection ranks NaN below every number, NaNs among themselves by index; weights follow their
 * formulas (a NaN inside a softmax or a sum makes them NaN). Checked against the reference. */
static void nan_logits(env *v, const ref_layer *L, fp4moe_routing method)
{
    testing_state *st = &v->st;
    fp4moe_config c = base_config();
    c.routing = method;
    c.top_k = 3;
    fp4moe_weights w = L->w;
    w.a1_global_scale = w.a2_global_scale = w.fc2_input_fp8_scale = NULL;
    w.routing_bias = NULL;
    fp4moe_plan *plan = NULL;
    expect(v, fp4moe_plan_create(v->ctx, &c, &w, &plan), FP4MOE_SUCCESS, "plan for NaN logits");
    if (!plan) return;
    const int64_t T = 4, E = c.num_experts, k = c.top_k;
    float logits[4 * 8];
    int32_t ids[4 * 3], ref_ids[4 * 3];
    float weights[4 * 3];
    double ref_weights[4 * 3];
    ref_random_fill(&v->rng, logits, FP4MOE_DTYPE_F32, T * E, 2.0);
    logits[0 * E + 0] = NAN;                              /* token 0: one NaN */
    logits[1 * E + 2] = NAN, logits[1 * E + 5] = NAN;     /* token 1: two */
    for (int64_t e = 0; e < E; e++) logits[2 * E + e] = e < 6 ? NAN : logits[2 * E + e]; /* token 2: only 2 numbers */
    for (int64_t e = 0; e < E; e++) logits[3 * E + e] = NAN; /* token 3: all NaN */
    size_t ws_bytes = 0;
    fp4moe_plan_workspace_size(plan, T, &ws_bytes);
    void *ws = aligned_alloc(256, (ws_bytes + 255) / 256 * 256 + 256);
    ref_layer R = *L;
    R.cfg = c;
    R.w.routing_bias = NULL;
    if (ws && ref_route(&R, T, logits, FP4MOE_DTYPE_F32, ref_ids, ref_weights) == 0) {
        expect(v, fp4moe_route(plan, T, logits, FP4MOE_DTYPE_F32, ids, weights, ws, ws_bytes, NULL),
               FP4MOE_SUCCESS, "route with NaN logits");
        for (int64_t i = 0; i < T * k; i++) {
            CHECK(st, ids[i] == ref_ids[i], "method %d NaN logits: token %lld slot %lld id %d, want %d",
                  (int)method, (long long)(i / k), (long long)(i % k), ids[i], ref_ids[i]);
            int same = (isnan(weights[i]) && isnan(ref_weights[i])) ||
                       fabs(weights[i] - ref_weights[i]) <= 2e-6 * fabs(ref_weights[i]) + 1e-7;
            CHECK(st, same, "method %d NaN logits: weight[%lld] = %g, want %g", (int)method,
                  (long long)i, weights[i], ref_weights[i]);
        }
        /* token 2 has exactly 2 numbers at experts 6, 7: they come first, then NaN expert 0 */
        CHECK(st, ids[2 * k + 2] == 0 && ((ids[2 * k] == 6 && ids[2 * k + 1] == 7) || (ids[2 * k] == 7 && ids[2 * k + 1] == 6)),
              "method %d: NaN not ranked last (%d %d %d)", (int)method, ids[2 * k], ids[2 * k + 1], ids[2 * k + 2]);
        CHECK(st, ids[3 * k] == 0 && ids[3 * k + 1] == 1 && ids[3 * k + 2] == 2,
              "method %d: all-NaN token not routed to 0, 1, 2", (int)method);
    }
    free(ws);
    fp4moe_plan_destroy(plan);
}

/* ------------------------------------------------------------------ NaN/Inf activations */
/* Non-finite hidden states propagate to the output rows of the tokens that carry them and
 * nowhere else; the call succeeds (docs/RELIABILITY.md). Pre-routed, so routing is unchanged. */
static void nonfinite_activations(env *v, const ref_layer *L)
{
    testing_state *st = &v->st;
    fp4moe_config c = base_config();
    fp4moe_plan *plan = NULL;
    expect(v, fp4moe_plan_create(v->ctx, &c, &L->w, &plan), FP4MOE_SUCCESS, "plan for NaN activations");
    if (!plan) return;
    enum { T = 4 };
    const int64_t H = c.hidden_size, k = c.top_k;
    float x[T * 32], clean[T * 32], dirty[T * 32], w[T * 2];
    int32_t ids[T * 2];
    ref_random_fill(&v->rng, x, FP4MOE_DTYPE_F32, T * H, 1.0);
    for (int i = 0; i < T * k; i++) ids[i] = i % (int)c.num_experts, w[i] = 0.5f;
    size_t ws_bytes = 0;
    fp4moe_plan_workspace_size(plan, T, &ws_bytes);
    void *ws = aligned_alloc(256, (ws_bytes + 255) / 256 * 256 + 256);
    fp4moe_forward_args a;
    fp4moe_forward_args_init(&a);
    a.num_tokens = T, a.hidden_states = x, a.topk_ids = ids, a.topk_weights = w, a.output = clean;
    expect(v, fp4moe_forward_routed(plan, &a, ws, ws_bytes, NULL), FP4MOE_SUCCESS, "clean forward");
    x[1 * H + 5] = NAN;
    x[2 * H + 7] = INFINITY;
    a.output = dirty;
    expect(v, fp4moe_forward_routed(plan, &a, ws, ws_bytes, NULL), FP4MOE_SUCCESS,
           "forward with NaN and Inf activations");
    CHECK(st, memcmp(clean, dirty, (size_t)H * 4) == 0 &&
                  memcmp(clean + 3 * H, dirty + 3 * H, (size_t)H * 4) == 0,
          "non-finite activations leaked into other tokens' rows");
    for (int t = 1; t <= 2; t++) {
        int nonfinite = 0;
        for (int64_t i = 0; i < H; i++) nonfinite += !isfinite(dirty[t * H + i]);
        CHECK(st, nonfinite > 0, "token %d carries a non-finite input but its row is finite", t);
    }
    free(ws);
    fp4moe_plan_destroy(plan);
}

int main(void)
{
    env v;
    memset(&v, 0, sizeof v);
    v.rng = testing_rng_from_env(TEST_NAME);
    fp4moe_context_options o;
    fp4moe_context_options_init(&o);
    o.backend = FP4MOE_BACKEND_CPU;
    o.num_threads = 2;
    fp4moe_status s = fp4moe_context_create(&o, &v.ctx);
    CHECK(&v.st, s == FP4MOE_SUCCESS, "context_create: %s", fp4moe_status_string(s));
    if (s != FP4MOE_SUCCESS) return testing_finish(&v.st, TEST_NAME);

    fp4moe_config c = base_config();
    ref_layer L;
    const ref_gen_options gen = {1, 1, 0, 0};
    if (ref_layer_generate(&L, &c, &gen, &v.rng) != 0) {
        CHECK(&v.st, 0, "cannot generate the layer");
        return testing_finish(&v.st, TEST_NAME);
    }
    context_errors(&v);
    config_errors(&v, &L);
    weight_errors(&v, &L);
    forward_errors(&v, &L);
    const fp4moe_routing methods[] = {FP4MOE_ROUTING_TOPK, FP4MOE_ROUTING_RENORMALIZE,
                                      FP4MOE_ROUTING_SOFTMAX_TOPK, FP4MOE_ROUTING_SIGMOID,
                                      FP4MOE_ROUTING_TOPK_SIGMOID, FP4MOE_ROUTING_MINIMAX2};
    for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++) nan_logits(&v, &L, methods[i]);
    nonfinite_activations(&v, &L);

    ref_layer_free(&L);
    fp4moe_context_destroy(v.ctx);
    return testing_finish(&v.st, TEST_NAME);
}
