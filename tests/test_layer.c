/* The CPU backend, through the public API, against the float64 reference (tests/ref/): every
 * routing method, activation, precision mode, dtype and option of the contract, on random layers.
 *
 * Tolerances. With F32 activations and W4A16 nothing is rounded after a sum, so the library's
 * FP32 result must match the float64 reference to FP32 accuracy: relative L2 < 1e-5. Wherever
 * the contract rounds a value that comes out of an FP32 sum (the 16-bit FC2 input, the FP8 down
 * input, the W4A4 quantiser of FC2's input, a 16-bit output), the FP32 and float64 values can
 * fall on different sides of a rounding boundary: the reference counts the roundings whose input
 * lies within REF_NEAR_TIE_REL (about 60 FP32 ulps, far above the real FP32 error) of a
 * boundary, and sums the squared jumps those flips would make, relative to the typical
 * magnitude of their row. The layer is linear after the rounding (FC2, the weighted sum), so if
 * every near tie flipped, the output would move by about sqrt(jump_sq / roundings) in relative
 * L2; the tolerance adds 3x that (for the spread of FC2's gains) to 1e-5. The near ties
 * overcount the real flips, so this bounds the rounding noise, loosely where near ties are
 * many (a 16-bit u whose flip would move a quantised FC2 input counts too, if within an eighth
 * of the window: tests/ref/ref_moe.c run_expert).
 * So a run with no near tie must match to 1e-5 even for W4A4 and FP8 (the quantisers are
 * deterministic FP32 algorithms that both sides implement). Every result must also be
 * bit-identical between 1 and 2 threads, between fp4moe_forward and fp4moe_forward_routed given
 * the same routing, and the routing replay must equal fp4moe_route. */
#include <stdlib.h>
#include <string.h>

#include "fp4moe.h"
#include "ref/ref_moe.h"
#include "testing.h"

#define TEST_NAME "test_layer"

typedef struct layer_case {
    const char *name;
    int64_t E, H, I;
    int32_t k;
    fp4moe_activation act;
    fp4moe_routing routing;
    int32_t n_group, topk_group, norm;
    float scale;
    ref_gen_options gen;
    fp4moe_gate_up_order order;
    int swiglu_params; /* 1: GPT-OSS scalars alpha 1.702, beta 1, limit 7 */
    int64_t local_offset, local_num;
    fp4moe_precision precision;
    int fp8;
    fp4moe_dtype hidden, out, logits;
    int per_token_scale;
    int on_input;       /* apply_router_weight_on_input with a non-llama4 method (k = 1) */
    int crafted;        /* logits steer one expert to every token and one to none */
    int64_t tokens[5];  /* T values, 0-terminated */
} layer_case;

typedef struct test_env {
    testing_state st;
    testing_rng rng;
    fp4moe_context *ctx1, *ctx2; /* 1 and 2 threads */
} test_env;

/* ------------------------------------------------------------------ helpers */
static void *alloc256(size_t bytes)
{
    return aligned_alloc(256, (bytes + 255) / 256 * 256 + 256);
}

static void poison(void *p, fp4moe_dtype dtype, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        if (dtype == FP4MOE_DTYPE_F32) ((float *)p)[i] = NAN;
        else ((uint16_t *)p)[i] = dtype == FP4MOE_DTYPE_F16 ? 0x7e00 : 0x7fc0;
    }
}

static int64_t count_nan(const void *p, fp4moe_dtype dtype, int64_t n)
{
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++) bad += isnan(ref_load(p, dtype, i));
    return bad;
}

static double rel_l2(const void *lib, fp4moe_dtype dtype, const double *ref, int64_t n)
{
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        double a = ref_load(lib, dtype, i);
        if (isnan(a) || isnan(ref[i])) return INFINITY;
        num += (a - ref[i]) * (a - ref[i]);
        den += ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static double quantum_of_dtype(fp4moe_dtype d)
{
    return d == FP4MOE_DTYPE_BF16 ? 1.0 / 128 : d == FP4MOE_DTYPE_F16 ? 1.0 / 1024 : 0.0;
}

/* See the file comment. */
static double tolerance(const ref_stats *s, fp4moe_dtype out)
{
    double inner = 0.0, tol = 1e-5;
    if (s->inner.total > 0) inner = 3.0 * sqrt(s->inner.jump_sq / (double)s->inner.total);
    tol += inner;
    if (s->output.total > 0) tol += 3.0 * sqrt(s->output.jump_sq / (double)s->output.total);
    /* Inner flips move the FP32 output by about `inner` (relative), far more than FP32 noise, so
     * 16-bit output roundings near a boundary flip too without counting as near ties: an
     * element v flips by ulp(v) with probability ~ 2 * inner * |v| / ulp(v), which adds
     * sqrt(2 * inner * q) to the relative L2 (q: the dtype's relative spacing). */
    tol += 3.0 * sqrt(2.0 * inner * quantum_of_dtype(out));
    return tol;
}

static fp4moe_weights plan_weights_of(const ref_layer *L)
{
    fp4moe_weights w = L->w;
    if (L->cfg.precision != FP4MOE_PRECISION_W4A4) w.a1_global_scale = w.a2_global_scale = NULL;
    if (!L->cfg.fc2_input_fp8) w.fc2_input_fp8_scale = NULL;
    return w;
}

static int is_local(const fp4moe_config *cfg, int32_t id)
{
    int64_t e_loc = ref_local_experts(cfg);
    return id >= cfg->local_expert_offset && id < cfg->local_expert_offset + e_loc;
}

/* ------------------------------------------------------------------ one T */
typedef struct run_buffers {
    void *hidden, *logits, *out, *out1, *out_off, *out_routed;
    float *pts, *w_out, *w_out1, *w_route, *rand_w;
    int32_t *ids_out, *ids_out1, *ids_route, *rand_ids;
    uint16_t *rand_w16;
    double *ref_out, *ref_off, *ref_w;
    int32_t *ref_ids;
    void *ws;
    size_t ws_bytes;
} run_buffers;

static void run_tokens(test_env *env, const layer_case *c, const ref_layer *L, fp4moe_plan *p2,
                       fp4moe_plan *p1, run_buffers *b, int64_t T)
{
    testing_state *st = &env->st;
    const fp4moe_config *cfg = &L->cfg;
    const int64_t E = cfg->num_experts, H = cfg->hidden_size, k = cfg->top_k;
    const int on_input = cfg->apply_router_weight_on_input || cfg->routing == FP4MOE_ROUTING_LLAMA4;
    const char *name = c->name;

    ref_random_fill(&env->rng, b->hidden, c->hidden, T * H, 1.0);
    ref_random_fill(&env->rng, b->logits, c->logits, T * E, 2.0);
    if (c->crafted) { /* expert 1 wins every token, expert E-1 none */
        for (int64_t t = 0; t < T; t++) {
            ref_store(b->logits, c->logits, t * E + 1, 12.0 + testing_uniform(&env->rng));
            ref_store(b->logits, c->logits, t * E + E - 1, -12.0 - testing_uniform(&env->rng));
        }
    }
    for (int64_t t = 0; t < T; t++) b->pts[t] = (float)(0.5 + testing_uniform(&env->rng));

    ref_args ra = {T, b->hidden, c->hidden, b->logits, c->logits, NULL, NULL, FP4MOE_DTYPE_F32,
                   c->per_token_scale ? b->pts : NULL, 1, c->out};
    ref_stats rs;
    if (ref_forward(L, &ra, b->ref_out, b->ref_ids, b->ref_w, &rs) != 0) {
        CHECK(st, 0, "%s: reference failed", name);
        return;
    }

    /* fp4moe_forward, finalize on, 2 threads */
    fp4moe_forward_args a;
    fp4moe_forward_args_init(&a);
    a.num_tokens = T;
    a.hidden_states = b->hidden;
    a.hidden_dtype = c->hidden;
    a.router_logits = b->logits;
    a.router_logits_dtype = c->logits;
    a.per_token_scale = c->per_token_scale ? b->pts : NULL;
    a.output = b->out;
    a.output_dtype = c->out;
    a.topk_ids_out = b->ids_out;
    a.topk_weights_out = b->w_out;
    poison(b->out, c->out, T * H);
    poison(b->w_out, FP4MOE_DTYPE_F32, T * k);
    memset(b->ids_out, 0xff, (size_t)(T * k) * sizeof(int32_t));
    fp4moe_status s = fp4moe_forward(p2, &a, b->ws, b->ws_bytes, NULL);
    CHECK(st, s == FP4MOE_SUCCESS, "%s T=%lld: forward: %s (%s)", name, (long long)T,
          fp4moe_status_string(s), fp4moe_last_error(env->ctx2));
    if (s != FP4MOE_SUCCESS) return;
    CHECK(st, count_nan(b->out, c->out, T * H) == 0, "%s T=%lld: %lld output elements unwritten",
          name, (long long)T, (long long)count_nan(b->out, c->out, T * H));

    int64_t id_mismatch = 0, w_mismatch = 0;
    for (int64_t i = 0; i < T * k; i++) {
        id_mismatch += b->ids_out[i] != b->ref_ids[i];
        w_mismatch += !(fabs(b->w_out[i] - b->ref_w[i]) <= 2e-6 * fabs(b->ref_w[i]) + 1e-7);
    }
    CHECK(st, id_mismatch == 0, "%s T=%lld: %lld routed ids differ from the reference (first: lib %d ref %d)",
          name, (long long)T, (long long)id_mismatch, b->ids_out[0], b->ref_ids[0]);
    CHECK(st, w_mismatch == 0, "%s T=%lld: %lld routing weights differ (first: lib %.9g ref %.9g)", name,
          (long long)T, (long long)w_mismatch, b->w_out[0], b->ref_w[0]);
    if (c->crafted) {
        int64_t with1 = 0, withlast = 0;
        for (int64_t t = 0; t < T; t++)
            for (int64_t j = 0; j < k; j++) {
                with1 += b->ids_out[t * k + j] == 1;
                withlast += b->ids_out[t * k + j] == E - 1;
            }
        CHECK(st, with1 == T && withlast == 0, "%s: crafted routing not as intended (%lld, %lld)", name,
              (long long)with1, (long long)withlast);
    }
    double err = rel_l2(b->out, c->out, b->ref_out, T * H), tol = tolerance(&rs, c->out);
    CHECK(st, err < tol, "%s T=%lld: rel L2 %.3g >= tol %.3g (near ties %lld/%lld, out %lld/%lld)", name,
          (long long)T, err, tol, (long long)rs.inner.near_ties, (long long)rs.inner.total,
          (long long)rs.output.near_ties, (long long)rs.output.total);
    if (getenv("FP4MOE_TEST_VERBOSE"))
        printf("  %-28s T=%-5lld rel L2 %.3g (tol %.3g, ties %lld/%lld)\n", name, (long long)T, err, tol,
               (long long)rs.inner.near_ties, (long long)rs.inner.total);

    /* 1 thread: bit-identical */
    a.output = b->out1;
    a.topk_ids_out = b->ids_out1;
    a.topk_weights_out = b->w_out1;
    s = fp4moe_forward(p1, &a, b->ws, b->ws_bytes, NULL);
    CHECK(st, s == FP4MOE_SUCCESS && memcmp(b->out, b->out1, (size_t)(T * H) * ref_dtype_bytes(c->out)) == 0 &&
              memcmp(b->ids_out, b->ids_out1, (size_t)(T * k) * 4) == 0 &&
              memcmp(b->w_out, b->w_out1, (size_t)(T * k) * 4) == 0,
          "%s T=%lld: 1 thread and 2 threads differ", name, (long long)T);

    /* fp4moe_route equals the replay */
    poison(b->w_route, FP4MOE_DTYPE_F32, T * k);
    s = fp4moe_route(p2, T, b->logits, c->logits, b->ids_route, b->w_route, b->ws, b->ws_bytes, NULL);
    CHECK(st, s == FP4MOE_SUCCESS && memcmp(b->ids_route, b->ids_out, (size_t)(T * k) * 4) == 0 &&
              memcmp(b->w_route, b->w_out, (size_t)(T * k) * 4) == 0,
          "%s T=%lld: fp4moe_route differs from the forward's replay", name, (long long)T);

    /* fp4moe_forward_routed with the replayed routing: the same bits */
    fp4moe_forward_args r = a;
    r.router_logits = NULL;
    r.topk_ids = b->ids_out;
    r.topk_weights = b->w_out;
    r.topk_weights_dtype = FP4MOE_DTYPE_F32;
    r.topk_ids_out = NULL;
    r.topk_weights_out = NULL;
    r.output = b->out_routed;
    poison(b->out_routed, c->out, T * H);
    s = fp4moe_forward_routed(p2, &r, b->ws, b->ws_bytes, NULL);
    CHECK(st, s == FP4MOE_SUCCESS && memcmp(b->out, b->out_routed, (size_t)(T * H) * ref_dtype_bytes(c->out)) == 0,
          "%s T=%lld: forward_routed (%s) differs from forward with logits", name, (long long)T,
          fp4moe_status_string(s));

    /* finalize off: rows per (token, slot), then reduce them ourselves */
    a.output = b->out_off;
    a.skip_finalize = 1;
    a.topk_ids_out = NULL;
    a.topk_weights_out = NULL;
    poison(b->out_off, c->out, T * k * H);
    s = fp4moe_forward(p2, &a, b->ws, b->ws_bytes, NULL);
    CHECK(st, s == FP4MOE_SUCCESS, "%s T=%lld: forward (finalize off): %s (%s)", name, (long long)T,
          fp4moe_status_string(s), fp4moe_last_error(env->ctx2));
    if (s == FP4MOE_SUCCESS) {
        CHECK(st, count_nan(b->out_off, c->out, T * k * H) == 0, "%s T=%lld: finalize-off rows unwritten", name,
              (long long)T);
        ref_args ro = ra;
        ro.finalize = 0;
        ref_stats rs_off;
        ref_forward(L, &ro, b->ref_off, NULL, NULL, &rs_off);
        err = rel_l2(b->out_off, c->out, b->ref_off, T * k * H);
        tol = tolerance(&rs_off, c->out);
        CHECK(st, err < tol, "%s T=%lld: finalize off: rel L2 %.3g >= %.3g", name, (long long)T, err, tol);
        int64_t nonzero_nonlocal = 0;
        for (int64_t t = 0; t < T; t++) {
            for (int64_t i = 0; i < H; i++) b->ref_off[t * H + i] = 0.0; /* reuse: the reduction */
            for (int64_t j = 0; j < k; j++) {
                int32_t id = b->ids_out[t * k + j];
                for (int64_t i = 0; i < H; i++) {
                    double v = ref_load(b->out_off, c->out, (t * k + j) * H + i);
                    if (!is_local(cfg, id)) {
                        nonzero_nonlocal += v != 0.0;
                        continue;
                    }
                    b->ref_off[t * H + i] += (on_input ? 1.0 : (double)b->w_out[t * k + j]) * v;
                }
            }
            double p = c->per_token_scale ? b->pts[t] : 1.0;
            for (int64_t i = 0; i < H; i++) b->ref_off[t * H + i] *= p;
        }
        CHECK(st, nonzero_nonlocal == 0, "%s: %lld non-local finalize-off values are not 0", name,
              (long long)nonzero_nonlocal);
        /* the rows are the same FP32 values the finalize sums, rounded to the output dtype */
        double reduce_tol = c->out == FP4MOE_DTYPE_F32 ? 1e-6 : 2.0 * quantum_of_dtype(c->out);
        err = rel_l2(b->out, c->out, b->ref_off, T * H);
        CHECK(st, err < reduce_tol, "%s T=%lld: finalize off, weighted and summed, differs from on: %.3g", name,
              (long long)T, err);
    }

    /* fp4moe_forward_routed with random distinct ids (non-local ones included) and BF16 weights */
    for (int64_t t = 0; t < T; t++) {
        for (int64_t j = 0; j < k; j++) {
            int32_t id;
            int dup;
            do {
                id = (int32_t)testing_int(&env->rng, 0, E - 1);
                dup = 0;
                for (int64_t q = 0; q < j; q++) dup |= b->rand_ids[t * k + q] == id;
            } while (dup);
            b->rand_ids[t * k + j] = id;
        }
    }
    /* positive, as router weights are: mixed signs would cancel and magnify rounding noise */
    for (int64_t i = 0; i < T * k; i++)
        b->rand_w16[i] = ref_encode_bf16(0.1 + 0.9 * testing_uniform(&env->rng));
    ref_args rr = ra;
    rr.router_logits = NULL;
    rr.topk_ids = b->rand_ids;
    rr.topk_weights = b->rand_w16;
    rr.topk_weights_dtype = FP4MOE_DTYPE_BF16;
    ref_forward(L, &rr, b->ref_out, NULL, NULL, &rs);
    fp4moe_forward_args_init(&r);
    r.num_tokens = T;
    r.hidden_states = b->hidden;
    r.hidden_dtype = c->hidden;
    r.topk_ids = b->rand_ids;
    r.topk_weights = b->rand_w16;
    r.topk_weights_dtype = FP4MOE_DTYPE_BF16;
    r.per_token_scale = c->per_token_scale ? b->pts : NULL;
    r.output = b->out_routed;
    r.output_dtype = c->out;
    poison(b->out_routed, c->out, T * H);
    s = fp4moe_forward_routed(p2, &r, b->ws, b->ws_bytes, NULL);
    CHECK(st, s == FP4MOE_SUCCESS, "%s T=%lld: forward_routed: %s (%s)", name, (long long)T,
          fp4moe_status_string(s), fp4moe_last_error(env->ctx2));
    if (s == FP4MOE_SUCCESS) {
        err = rel_l2(b->out_routed, c->out, b->ref_out, T * H);
        tol = tolerance(&rs, c->out);
        CHECK(st, count_nan(b->out_routed, c->out, T * H) == 0 && err < tol,
              "%s T=%lld: forward_routed random ids: rel L2 %.3g >= %.3g", name, (long long)T, err, tol);
    }
}

/* ------------------------------------------------------------------ one case */
static void run_case(test_env *env, const layer_case *c)
{
    testing_state *st = &env->st;
    fp4moe_config cfg;
    fp4moe_config_init(&cfg);
    cfg.num_experts = c->E;
    cfg.top_k = c->k;
    cfg.hidden_size = c->H;
    cfg.intermediate_size = c->I;
    cfg.activation = c->act;
    cfg.gate_up_order = c->order;
    if (c->swiglu_params) {
        cfg.swiglu_alpha = 1.702f;
        cfg.swiglu_beta = 1.0f;
        cfg.swiglu_limit = 7.0f;
    }
    cfg.routing = c->routing;
    if (c->n_group) cfg.n_group = c->n_group;
    if (c->topk_group) cfg.topk_group = c->topk_group;
    cfg.norm_topk_prob = c->norm;
    if (c->scale != 0.0f) cfg.routed_scaling_factor = c->scale;
    cfg.apply_router_weight_on_input = c->on_input;
    cfg.local_expert_offset = c->local_offset;
    cfg.local_num_experts = c->local_num;
    cfg.precision = c->precision;
    cfg.fc2_input_fp8 = c->fp8;
    int64_t max_t = 0;
    for (int i = 0; c->tokens[i]; i++) max_t = c->tokens[i] > max_t ? c->tokens[i] : max_t;
    cfg.max_tokens = max_t;

    ref_layer L;
    if (ref_layer_generate(&L, &cfg, &c->gen, &env->rng) != 0) {
        CHECK(st, 0, "%s: cannot generate the layer", c->name);
        return;
    }
    fp4moe_weights w = plan_weights_of(&L);
    fp4moe_plan *p2 = NULL, *p1 = NULL;
    fp4moe_status s2 = fp4moe_plan_create(env->ctx2, &cfg, &w, &p2);
    fp4moe_status s1 = fp4moe_plan_create(env->ctx1, &cfg, &w, &p1);
    CHECK(st, s2 == FP4MOE_SUCCESS && s1 == FP4MOE_SUCCESS, "%s: plan_create: %s (%s)", c->name,
          fp4moe_status_string(s2), fp4moe_last_error(env->ctx2));
    run_buffers b;
    memset(&b, 0, sizeof b);
    if (s2 != FP4MOE_SUCCESS || s1 != FP4MOE_SUCCESS) goto done;

    fp4moe_status sw = fp4moe_plan_workspace_size(p2, max_t, &b.ws_bytes);
    size_t ws1 = 0;
    sw = sw == FP4MOE_SUCCESS ? fp4moe_plan_workspace_size(p1, max_t, &ws1) : sw;
    CHECK(st, sw == FP4MOE_SUCCESS, "%s: workspace_size: %s", c->name, fp4moe_status_string(sw));
    if (sw != FP4MOE_SUCCESS) goto done;
    if (ws1 > b.ws_bytes) b.ws_bytes = ws1;

    const int64_t H = c->H, E = c->E, k = c->k;
    b.hidden = alloc256((size_t)(max_t * H) * 4);
    b.logits = alloc256((size_t)(max_t * E) * 4);
    b.out = alloc256((size_t)(max_t * H) * 4);
    b.out1 = alloc256((size_t)(max_t * H) * 4);
    b.out_off = alloc256((size_t)(max_t * k * H) * 4);
    b.out_routed = alloc256((size_t)(max_t * H) * 4);
    b.pts = alloc256((size_t)max_t * 4);
    b.w_out = alloc256((size_t)(max_t * k) * 4);
    b.w_out1 = alloc256((size_t)(max_t * k) * 4);
    b.w_route = alloc256((size_t)(max_t * k) * 4);
    b.ids_out = alloc256((size_t)(max_t * k) * 4);
    b.ids_out1 = alloc256((size_t)(max_t * k) * 4);
    b.ids_route = alloc256((size_t)(max_t * k) * 4);
    b.rand_ids = alloc256((size_t)(max_t * k) * 4);
    b.rand_w16 = alloc256((size_t)(max_t * k) * 2);
    b.ref_out = alloc256((size_t)(max_t * H) * 8);
    b.ref_off = alloc256((size_t)(max_t * k * H) * 8);
    b.ref_w = alloc256((size_t)(max_t * k) * 8);
    b.ref_ids = alloc256((size_t)(max_t * k) * 4);
    b.ws = alloc256(b.ws_bytes);
    if (!b.hidden || !b.logits || !b.out || !b.out1 || !b.out_off || !b.out_routed || !b.pts ||
        !b.w_out || !b.w_out1 || !b.w_route || !b.ids_out || !b.ids_out1 || !b.ids_route ||
        !b.rand_ids || !b.rand_w16 || !b.ref_out || !b.ref_off || !b.ref_w || !b.ref_ids || !b.ws) {
        CHECK(st, 0, "%s: out of memory", c->name);
        goto done;
    }
    for (int i = 0; c->tokens[i]; i++) run_tokens(env, c, &L, p2, p1, &b, c->tokens[i]);

done:
    free(b.hidden); free(b.logits); free(b.out); free(b.out1); free(b.out_off); free(b.out_routed);
    free(b.pts); free(b.w_out); free(b.w_out1); free(b.w_route); free(b.ids_out); free(b.ids_out1);
    free(b.ids_route); free(b.rand_ids); free(b.rand_w16); free(b.ref_out); free(b.ref_off);
    free(b.ref_w); free(b.ref_ids); free(b.ws);
    fp4moe_plan_destroy(p2);
    fp4moe_plan_destroy(p1);
    ref_layer_free(&L);
}

/* ------------------------------------------------------------------ the reference's own codecs */
/* The reference shares no code with the library; here its codecs are checked against the
 * public conversions on every code and on random values (a disagreement is a bug in one). */
static void check_codecs(test_env *env)
{
    testing_state *st = &env->st;
    int bad = 0;
    for (int c = 0; c < 16; c++) bad += ref_e2m1_value((uint8_t)c) != fp4moe_e2m1_to_float((uint8_t)c);
    for (int c = 0; c < 256; c++) {
        double r = ref_e4m3_value((uint8_t)c);
        float l = fp4moe_e4m3_to_float((uint8_t)c);
        bad += !(r == l || (isnan(r) && isnan(l)));
    }
    for (int c = 0; c < 65536; c++) {
        double r = ref_f16_value((uint16_t)c), l = fp4moe_f16_to_float((uint16_t)c);
        bad += !(r == l || (isnan(r) && isnan(l)));
        r = ref_bf16_value((uint16_t)c), l = fp4moe_bf16_to_float((uint16_t)c);
        bad += !(r == l || (isnan(r) && isnan(l)));
    }
    for (int i = 0; i < 20000; i++) {
        float x = (float)(testing_normal(&env->rng) * ldexp(1.0, (int)testing_int(&env->rng, -12, 10)));
        bad += ref_encode_f16(x) != fp4moe_float_to_f16(x);
        bad += ref_encode_bf16(x) != fp4moe_float_to_bf16(x);
        bad += ref_encode_e4m3(ref_round_e4m3(x)) != fp4moe_float_to_e4m3(x);
        bad += ref_encode_e2m1(ref_round_e2m1(x)) != fp4moe_float_to_e2m1(x);
    }
    CHECK(st, bad == 0, "%d codec disagreements between the reference and the library", bad);
}

/* ------------------------------------------------------------------ swizzled scales */
/* The 128x4 layout written here from the spec's formula (not the library's): rows padded to
 * 128, scale columns to 4, padding left 0. A plan from swizzled scales must compute the same
 * bits as one from linear scales. */
static uint8_t *swizzle(const uint8_t *linear, int64_t experts, int64_t rows, int64_t cols, size_t *per_expert)
{
    const int64_t C = cols / 16, C4 = (C + 3) / 4 * 4, R128 = (rows + 127) / 128 * 128;
    *per_expert = (size_t)(R128 * C4);
    uint8_t *out = calloc((size_t)experts * *per_expert, 1);
    if (!out) return NULL;
    for (int64_t e = 0; e < experts; e++)
        for (int64_t m = 0; m < rows; m++)
            for (int64_t c = 0; c < C; c++) {
                int64_t off = (m / 128) * (C4 / 4) * 512 + (c / 4) * 512 + (m % 32) * 16 + ((m % 128) / 32) * 4 + (c % 4);
                out[(size_t)e * *per_expert + (size_t)off] = linear[(e * rows + m) * C + c];
            }
    return out;
}

static void check_swizzled(test_env *env)
{
    testing_state *st = &env->st;
    fp4moe_config cfg;
    fp4moe_config_init(&cfg);
    cfg.num_experts = 5;
    cfg.top_k = 2;
    cfg.hidden_size = 48;       /* 3 scale columns: padded to 4 */
    cfg.intermediate_size = 80; /* FC1 160 rows, FC2 5 scale columns */
    cfg.routing = FP4MOE_ROUTING_RENORMALIZE;
    cfg.max_tokens = 7;
    const ref_gen_options gen = {1, 0, 0, 0};
    ref_layer L;
    if (ref_layer_generate(&L, &cfg, &gen, &env->rng) != 0) {
        CHECK(st, 0, "swizzled: cannot generate the layer");
        return;
    }
    const int64_t E = 5, H = 48, I = 80, N1 = 160, T = 7;
    size_t pe1 = 0, pe2 = 0;
    uint8_t *s1 = swizzle(L.w.w1_scale, E, N1, H, &pe1), *s2 = swizzle(L.w.w2_scale, E, H, I, &pe2);
    CHECK(st, fp4moe_scale_bytes(N1, H, FP4MOE_SCALE_SWIZZLED_128x4) == pe1 &&
              fp4moe_scale_bytes(H, I, FP4MOE_SCALE_SWIZZLED_128x4) == pe2,
          "fp4moe_scale_bytes disagrees with the spec's padding (%zu, %zu)", pe1, pe2);
    fp4moe_weights wl = plan_weights_of(&L), ws = wl;
    ws.w1_scale = s1;
    ws.w2_scale = s2;
    ws.w1_scale_layout = ws.w2_scale_layout = FP4MOE_SCALE_SWIZZLED_128x4;
    fp4moe_plan *pl = NULL, *ps = NULL;
    float hidden[7 * 48], logits[7 * 5], out_l[7 * 48], out_s[7 * 48];
    ref_random_fill(&env->rng, hidden, FP4MOE_DTYPE_F32, T * H, 1.0);
    ref_random_fill(&env->rng, logits, FP4MOE_DTYPE_F32, T * E, 2.0);
    size_t wsb = 0;
    void *work = NULL;
    if (s1 && s2 && fp4moe_plan_create(env->ctx2, &cfg, &wl, &pl) == FP4MOE_SUCCESS &&
        fp4moe_plan_create(env->ctx2, &cfg, &ws, &ps) == FP4MOE_SUCCESS &&
        fp4moe_plan_workspace_size(pl, T, &wsb) == FP4MOE_SUCCESS && (work = alloc256(wsb)) != NULL) {
        fp4moe_forward_args a;
        fp4moe_forward_args_init(&a);
        a.num_tokens = T;
        a.hidden_states = hidden;
        a.router_logits = logits;
        a.output = out_l;
        fp4moe_status r1 = fp4moe_forward(pl, &a, work, wsb, NULL);
        a.output = out_s;
        fp4moe_status r2 = fp4moe_forward(ps, &a, work, wsb, NULL);
        CHECK(st, r1 == FP4MOE_SUCCESS && r2 == FP4MOE_SUCCESS && memcmp(out_l, out_s, sizeof out_l) == 0,
              "swizzled scales give a different result than linear ones");
    } else {
        CHECK(st, 0, "swizzled: setup failed (%s)", fp4moe_last_error(env->ctx2));
    }
    free(work);
    fp4moe_plan_destroy(pl);
    fp4moe_plan_destroy(ps);
    free(s1);
    free(s2);
    ref_layer_free(&L);
}

/* ------------------------------------------------------------------ the cases */
#define SMALL 64, 48
#define TS {1, 3, 17, 0}
#define F32IO FP4MOE_DTYPE_F32, FP4MOE_DTYPE_F32, FP4MOE_DTYPE_F32

int main(void)
{
    test_env env;
    memset(&env, 0, sizeof env);
    env.rng = testing_rng_from_env(TEST_NAME);
    fp4moe_context_options o;
    fp4moe_context_options_init(&o);
    o.backend = FP4MOE_BACKEND_CPU;
    o.num_threads = 1;
    fp4moe_status s1 = fp4moe_context_create(&o, &env.ctx1);
    o.num_threads = 2;
    fp4moe_status s2 = fp4moe_context_create(&o, &env.ctx2);
    CHECK(&env.st, s1 == FP4MOE_SUCCESS && s2 == FP4MOE_SUCCESS, "context_create failed");
    if (s1 != FP4MOE_SUCCESS || s2 != FP4MOE_SUCCESS) return testing_finish(&env.st, TEST_NAME);
    check_codecs(&env);
    check_swizzled(&env);

    const ref_gen_options none = {0, 0, 0, 0}, rbias = {0, 1, 0, 0}, biases = {1, 0, 0, 0};
    const ref_gen_options all = {1, 1, 1, 1}, half2 = {0, 0, 1, 0}, per_expert = {1, 0, 0, 1};
    const fp4moe_dtype F32 = FP4MOE_DTYPE_F32, F16 = FP4MOE_DTYPE_F16, BF16 = FP4MOE_DTYPE_BF16;
    const fp4moe_precision A16 = FP4MOE_PRECISION_W4A16, A4 = FP4MOE_PRECISION_W4A4;
    const fp4moe_activation SW = FP4MOE_ACT_SWIGLU;
    const layer_case cases[] = {
        /* name, E, H, I, k, act, routing, n_group, topk_group, norm, scale, gen, order, swiglu params,
         * offset, local, precision, fp8, hidden, out, logits, pts, on_input, crafted, tokens */
        /* every routing method (SwiGLU), with and without bias where the method allows one */
        {"softmax_topk", 12, SMALL, 3, SW, FP4MOE_ROUTING_SOFTMAX_TOPK, 0, 0, 1, 0, none, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"softmax_topk+bias", 12, SMALL, 3, SW, FP4MOE_ROUTING_SOFTMAX_TOPK, 0, 0, 1, 0, rbias, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"renormalize", 12, SMALL, 3, SW, FP4MOE_ROUTING_RENORMALIZE, 0, 0, 1, 0, none, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"renormalize+bias", 12, SMALL, 3, SW, FP4MOE_ROUTING_RENORMALIZE, 0, 0, 1, 0, rbias, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"renormalize_naive", 12, SMALL, 3, SW, FP4MOE_ROUTING_RENORMALIZE_NAIVE, 0, 0, 1, 0, none, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"renormalize_naive+bias", 12, SMALL, 3, SW, FP4MOE_ROUTING_RENORMALIZE_NAIVE, 0, 0, 1, 0, rbias, 0, 0, 0, 0, A16, 0, F32IO, 1, 0, 0, TS},
        {"topk", 12, SMALL, 3, SW, FP4MOE_ROUTING_TOPK, 0, 0, 1, 0, none, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"sigmoid", 12, SMALL, 3, SW, FP4MOE_ROUTING_SIGMOID, 0, 0, 1, 0, none, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"sigmoid_renorm", 12, SMALL, 3, SW, FP4MOE_ROUTING_SIGMOID_RENORM, 0, 0, 1, 0, none, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"sigmoid_renorm nonorm", 12, SMALL, 3, SW, FP4MOE_ROUTING_SIGMOID_RENORM, 0, 0, 0, 0, none, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"topk_sigmoid", 12, SMALL, 3, SW, FP4MOE_ROUTING_TOPK_SIGMOID, 0, 0, 1, 0, none, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"deepseek_v3 groups", 16, SMALL, 4, SW, FP4MOE_ROUTING_DEEPSEEK_V3, 4, 2, 1, 2.5f, rbias, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"deepseek_v3 nobias", 12, SMALL, 3, SW, FP4MOE_ROUTING_DEEPSEEK_V3, 6, 3, 1, 2.5f, none, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"deepseek_v3 nonorm g1", 13, SMALL, 3, SW, FP4MOE_ROUTING_DEEPSEEK_V3, 1, 1, 0, 1.5f, rbias, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"deepseek_v3 groupsize1", 6, SMALL, 2, SW, FP4MOE_ROUTING_DEEPSEEK_V3, 6, 3, 1, 1.0f, rbias, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"llama4", 10, SMALL, 1, SW, FP4MOE_ROUTING_LLAMA4, 0, 0, 1, 0, none, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"llama4 bf16", 10, SMALL, 1, SW, FP4MOE_ROUTING_LLAMA4, 0, 0, 1, 0, none, 0, 0, 0, 0, A16, 0, BF16, BF16, BF16, 0, 0, 0, TS},
        {"minimax2", 12, SMALL, 3, SW, FP4MOE_ROUTING_MINIMAX2, 0, 0, 1, 2.0f, none, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"minimax2+bias", 12, SMALL, 3, SW, FP4MOE_ROUTING_MINIMAX2, 0, 0, 1, 2.0f, rbias, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        /* every activation */
        {"swiglu gpt-oss params", 12, SMALL, 3, SW, FP4MOE_ROUTING_RENORMALIZE, 0, 0, 1, 0, biases, 0, 1, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"swiglu per-expert params up_gate", 12, SMALL, 3, SW, FP4MOE_ROUTING_RENORMALIZE, 0, 0, 1, 0, per_expert, FP4MOE_UP_GATE, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"swiglu half2 up_gate", 12, SMALL, 3, SW, FP4MOE_ROUTING_RENORMALIZE, 0, 0, 1, 0, half2, FP4MOE_UP_GATE, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"swiglu half2 gate_up", 12, SMALL, 3, SW, FP4MOE_ROUTING_RENORMALIZE, 0, 0, 1, 0, half2, FP4MOE_GATE_UP, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"geglu", 12, SMALL, 3, FP4MOE_ACT_GEGLU, FP4MOE_ROUTING_RENORMALIZE, 0, 0, 1, 0, biases, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"geglu up_gate", 12, SMALL, 3, FP4MOE_ACT_GEGLU, FP4MOE_ROUTING_RENORMALIZE, 0, 0, 1, 0, half2, FP4MOE_UP_GATE, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"geglu_tanh", 12, SMALL, 3, FP4MOE_ACT_GEGLU_TANH, FP4MOE_ROUTING_RENORMALIZE, 0, 0, 1, 0, biases, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"relu2", 12, SMALL, 3, FP4MOE_ACT_RELU2, FP4MOE_ROUTING_DEEPSEEK_V3, 1, 1, 1, 2.5f, rbias, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"silu", 12, SMALL, 3, FP4MOE_ACT_SILU, FP4MOE_ROUTING_RENORMALIZE, 0, 0, 1, 0, biases, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"gelu", 12, SMALL, 3, FP4MOE_ACT_GELU, FP4MOE_ROUTING_RENORMALIZE, 0, 0, 1, 0, biases, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"identity", 12, SMALL, 3, FP4MOE_ACT_IDENTITY, FP4MOE_ROUTING_RENORMALIZE, 0, 0, 1, 0, biases, 0, 0, 0, 0, A16, 0, F32IO, 1, 0, 0, TS},
        /* dtypes */
        {"f16 in, f32 out", 12, SMALL, 3, SW, FP4MOE_ROUTING_RENORMALIZE_NAIVE, 0, 0, 1, 0, biases, 0, 0, 0, 0, A16, 0, F16, F32, F16, 0, 0, 0, TS},
        {"f16 in, f16 out", 12, SMALL, 3, SW, FP4MOE_ROUTING_RENORMALIZE_NAIVE, 0, 0, 1, 0, biases, 0, 0, 0, 0, A16, 0, F16, F16, F32, 1, 0, 0, TS},
        {"bf16 in, f32 out", 12, SMALL, 3, SW, FP4MOE_ROUTING_RENORMALIZE_NAIVE, 0, 0, 1, 0, biases, 0, 0, 0, 0, A16, 0, BF16, F32, BF16, 0, 0, 0, TS},
        {"bf16 in, bf16 out", 12, SMALL, 3, FP4MOE_ACT_RELU2, FP4MOE_ROUTING_RENORMALIZE_NAIVE, 0, 0, 1, 0, biases, 0, 0, 0, 0, A16, 0, BF16, BF16, BF16, 1, 0, 0, TS},
        /* precision modes */
        {"w4a4 f32", 12, SMALL, 3, SW, FP4MOE_ROUTING_RENORMALIZE_NAIVE, 0, 0, 1, 0, none, 0, 0, 0, 0, A4, 0, F32IO, 0, 0, 0, TS},
        {"w4a4 all options", 12, SMALL, 3, SW, FP4MOE_ROUTING_DEEPSEEK_V3, 3, 2, 1, 2.5f, all, FP4MOE_UP_GATE, 0, 0, 0, A4, 0, F32IO, 1, 0, 0, TS},
        {"w4a4 relu2 bf16", 12, SMALL, 3, FP4MOE_ACT_RELU2, FP4MOE_ROUTING_RENORMALIZE, 0, 0, 1, 0, biases, 0, 0, 0, 0, A4, 0, BF16, BF16, BF16, 0, 0, 0, TS},
        {"w4a4 llama4 f16", 10, SMALL, 1, SW, FP4MOE_ROUTING_LLAMA4, 0, 0, 1, 0, none, 0, 0, 0, 0, A4, 0, F16, F32, F32, 0, 0, 0, TS},
        {"fp8 down f32", 12, SMALL, 3, SW, FP4MOE_ROUTING_RENORMALIZE, 0, 0, 1, 0, biases, 0, 0, 0, 0, A16, 1, F32IO, 0, 0, 0, TS},
        {"fp8 down geglu bf16", 12, SMALL, 3, FP4MOE_ACT_GEGLU, FP4MOE_ROUTING_RENORMALIZE, 0, 0, 1, 0, none, 0, 0, 0, 0, A16, 1, BF16, F32, F32, 1, 0, 0, TS},
        /* options */
        {"on input, sigmoid k=1", 12, SMALL, 1, SW, FP4MOE_ROUTING_SIGMOID, 0, 0, 1, 0, biases, 0, 0, 0, 0, A16, 0, F32IO, 1, 1, 0, TS},
        {"on input, bf16 k=1", 12, SMALL, 1, FP4MOE_ACT_SILU, FP4MOE_ROUTING_TOPK_SIGMOID, 0, 0, 1, 0, none, 0, 0, 0, 0, A16, 0, BF16, BF16, F32, 0, 1, 0, TS},
        {"local subset offset 3", 13, SMALL, 4, SW, FP4MOE_ROUTING_RENORMALIZE, 0, 0, 1, 0, all, 0, 0, 3, 6, A16, 0, F32IO, 1, 0, 0, TS},
        {"local subset offset 0", 13, SMALL, 4, FP4MOE_ACT_RELU2, FP4MOE_ROUTING_SIGMOID, 0, 0, 1, 0, biases, 0, 0, 0, 5, A16, 0, F32IO, 0, 0, 0, TS},
        {"local subset last, w4a4", 13, SMALL, 4, SW, FP4MOE_ROUTING_RENORMALIZE, 0, 0, 1, 0, none, 0, 0, 9, 4, A4, 0, F32IO, 0, 0, 0, TS},
        {"local subset fp8 llama4", 13, SMALL, 1, SW, FP4MOE_ROUTING_LLAMA4, 0, 0, 1, 0, none, 0, 0, 5, 5, A16, 1, F32IO, 0, 0, 0, TS},
        {"k=1 E=5", 5, 32, 32, 1, SW, FP4MOE_ROUTING_RENORMALIZE, 0, 0, 1, 0, none, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"k=E=7", 7, 32, 32, 7, SW, FP4MOE_ROUTING_SOFTMAX_TOPK, 0, 0, 1, 0, none, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        {"expert for all, expert for none", 11, SMALL, 3, SW, FP4MOE_ROUTING_RENORMALIZE, 0, 0, 1, 0, biases, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 1, TS},
        {"H=16 I=16", 9, 16, 16, 2, SW, FP4MOE_ROUTING_TOPK_SIGMOID, 0, 0, 1, 0, none, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, TS},
        /* large T with small H, I */
        {"T=1000 f32", 10, 32, 32, 2, SW, FP4MOE_ROUTING_RENORMALIZE, 0, 0, 1, 0, biases, 0, 0, 0, 0, A16, 0, F32IO, 1, 0, 0, {1000, 0}},
        {"T=1000 bf16 w4a4", 10, 32, 32, 2, FP4MOE_ACT_RELU2, FP4MOE_ROUTING_SIGMOID_RENORM, 0, 0, 1, 0, none, 0, 0, 0, 0, A4, 0, BF16, BF16, BF16, 0, 0, 0, {1000, 0}},
        /* odd real shape (Nemotron-3 Nano): H = 2688, I = 1856 */
        {"nemotron shape relu2", 6, 2688, 1856, 2, FP4MOE_ACT_RELU2, FP4MOE_ROUTING_DEEPSEEK_V3, 1, 1, 1, 2.5f, rbias, 0, 0, 0, 0, A16, 0, F32IO, 0, 0, 0, {1, 3, 0}},
        {"nemotron shape swiglu bf16", 4, 2688, 1856, 2, SW, FP4MOE_ROUTING_RENORMALIZE, 0, 0, 1, 0, biases, 0, 0, 1, 3, A16, 0, BF16, BF16, F32, 0, 0, 0, {2, 0}},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_case(&env, &cases[i]);

    fp4moe_context_destroy(env.ctx1);
    fp4moe_context_destroy(env.ctx2);
    return testing_finish(&env.st, TEST_NAME);
}
