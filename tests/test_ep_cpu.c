/* Expert parallelism on the CPU: 1 to 4 ranks in one process (one thread each) over the
 * in-memory transport must give, bit for bit, what the single-device layer gives for the same
 * tokens: random layers, uneven expert splits, every precision mode and hidden dtype, routed and
 * pre-routed calls, tokens whose experts all live on other ranks, ranks without tokens, the
 * per-slot (skip_finalize) output. Also: the W4A4 row codec on hostile blocks (NaN, inf, zeros,
 * subnormals, extreme scales), and a bad argument on one rank failing the call on every rank
 * instead of blocking them. */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "ep/ep_internal.h"
#include "fp4moe.h"
#include "fp4moe_ep.h"
#include "format/format.h"
#include "ref/ref_moe.h"
#include "testing.h"

#define TEST_NAME "test_ep_cpu"
#define MAX_RANKS 4

typedef struct ep_case {
    const char *name;
    int64_t E, H, I;
    int32_t k;
    fp4moe_activation act;
    fp4moe_routing routing;
    int32_t n_group, topk_group;
    fp4moe_precision precision;
    int fp8;
    fp4moe_dtype hidden, out;
    int per_token_scale, routed, skip_finalize, biases;
} ep_case;

/* What one rank does: its slice of the tokens and experts, its results. */
typedef struct rank_job {
    int rank, size;
    fp4moe_ep_memory_group *group;
    const ref_layer *layer;
    const fp4moe_config *cfg;
    int64_t e0, e_loc;
    int64_t t;             /* this rank's tokens */
    const uint8_t *hidden; /* [t, H] */
    const void *logits;    /* [t, E] F32 */
    const int32_t *ids;    /* [t, k] when routed */
    const float *weights;
    const float *token_scale;
    const ep_case *c;
    int bad_args;          /* this rank passes num_tokens = -1 */
    void *out;
    int32_t *ids_out;      /* routing replay [t, k] */
    fp4moe_status create_status, forward_status;
    char message[512];
} rank_job;

static void *alloc256(size_t bytes)
{
    return aligned_alloc(256, (bytes + 255) / 256 * 256 + 256);
}

static void *run_rank(void *arg)
{
    rank_job *job = arg;
    fp4moe_context_options o;
    fp4moe_context_options_init(&o);
    o.backend = FP4MOE_BACKEND_CPU;
    o.num_threads = 1;
    fp4moe_context *ctx = NULL;
    fp4moe_ep_transport tr;
    job->create_status = fp4moe_context_create(&o, &ctx);
    if (job->create_status != FP4MOE_SUCCESS) return NULL; /* the peers then fail the test */
    fp4moe_ep_memory_transport(job->group, job->rank, &tr);
    fp4moe_config cfg = *job->cfg;
    cfg.local_expert_offset = job->e0;
    cfg.local_num_experts = job->e_loc;
    const fp4moe_weights w = ref_layer_slice_weights(job->layer, job->e0);
    fp4moe_ep *ep = NULL;
    job->create_status = fp4moe_ep_create(ctx, &cfg, &w, &tr, NULL, &ep);
    if (job->create_status == FP4MOE_SUCCESS) {
        fp4moe_forward_args a;
        fp4moe_forward_args_init(&a);
        a.num_tokens = job->bad_args ? -1 : job->t;
        a.hidden_states = job->hidden;
        a.hidden_dtype = job->c->hidden;
        a.router_logits = job->logits;
        a.topk_ids = job->ids;
        a.topk_weights = job->weights;
        a.per_token_scale = job->token_scale;
        a.output = job->out;
        a.output_dtype = job->c->out;
        a.skip_finalize = job->c->skip_finalize;
        a.topk_ids_out = job->c->routed ? NULL : job->ids_out;
        job->forward_status = job->c->routed ? fp4moe_ep_forward_routed(ep, &a, NULL)
                                             : fp4moe_ep_forward(ep, &a, NULL);
    }
    snprintf(job->message, sizeof job->message, "%s", fp4moe_last_error(ctx));
    fp4moe_ep_destroy(ep);
    fp4moe_context_destroy(ctx);
    return NULL;
}

/* Distinct random ids for a token; with `away`, all from ranks other than `own`. */
static void pick_ids(testing_rng *rng, int64_t E, int32_t k, const int64_t *split, int own,
                     int away, int32_t *ids)
{
    for (int32_t j = 0; j < k; j++) {
        for (;;) {
            const int32_t e = (int32_t)testing_int(rng, 0, E - 1);
            int dup = 0;
            for (int32_t q = 0; q < j; q++)
                dup |= ids[q] == e;
            const int mine = e >= split[own] && e < split[own + 1];
            if (!dup && !(away && mine)) {
                ids[j] = e;
                break;
            }
        }
    }
}

/* One layer, one split, one batch: every rank's output against the single-device layer. */
static void run_case(testing_state *st, testing_rng *rng, fp4moe_context *ctx, const ep_case *c,
                     int size)
{
    fp4moe_config cfg;
    fp4moe_config_init(&cfg);
    cfg.num_experts = c->E;
    cfg.top_k = c->k;
    cfg.hidden_size = c->H;
    cfg.intermediate_size = c->I;
    cfg.activation = c->act;
    cfg.routing = c->routing;
    cfg.n_group = c->n_group;
    cfg.topk_group = c->topk_group;
    cfg.precision = c->precision;
    cfg.fc2_input_fp8 = c->fp8;
    cfg.max_tokens = 64;
    ref_gen_options gen = {c->biases, c->routing == FP4MOE_ROUTING_DEEPSEEK_V3, 0, 0};
    ref_layer layer;
    if (ref_layer_generate(&layer, &cfg, &gen, rng) != 0) {
        CHECK(st, 0, "%s: cannot generate the layer", c->name);
        return;
    }
    const int64_t E = c->E, H = c->H, k = c->k;
    const size_t elt = ref_dtype_bytes(c->hidden), out_elt = ref_dtype_bytes(c->out);

    /* Uneven split: each rank >= 1 expert. Tokens per rank in [0, 9], rank 1 none if size > 2. */
    int64_t split[MAX_RANKS + 1], tokens[MAX_RANKS], first[MAX_RANKS + 1];
    split[0] = 0;
    for (int r = 0; r < size; r++) {
        const int64_t left = E - split[r], ranks_left = size - r;
        split[r + 1] = r == size - 1 ? E : split[r] + testing_int(rng, 1, left - (ranks_left - 1));
    }
    first[0] = 0;
    for (int r = 0; r < size; r++) {
        tokens[r] = (size > 2 && r == 1) ? 0 : testing_int(rng, 1, 9);
        first[r + 1] = first[r] + tokens[r];
    }
    const int64_t T = first[size];
    uint8_t *hidden = alloc256((size_t)(T * H) * elt);
    float *logits = alloc256((size_t)(T * E) * sizeof(float));
    float *calib = alloc256((size_t)(T * H) * sizeof(float));
    int32_t *ids = alloc256((size_t)(T * k) * sizeof(int32_t));
    float *weights = alloc256((size_t)(T * k) * sizeof(float));
    float *scale = alloc256((size_t)T * sizeof(float));
    const int64_t out_rows = c->skip_finalize ? T * k : T;
    uint8_t *expect = alloc256((size_t)(out_rows * H) * out_elt);
    uint8_t *got = alloc256((size_t)(out_rows * H) * out_elt);
    int32_t *ids_expect = alloc256((size_t)(T * k) * sizeof(int32_t));
    int32_t *ids_got = alloc256((size_t)(T * k) * sizeof(int32_t));
    ref_random_fill(rng, hidden, c->hidden, T * H, 1.0);
    ref_random_fill(rng, logits, FP4MOE_DTYPE_F32, T * E, 2.0);
    for (int64_t i = 0; i < T * H; i++)
        calib[i] = (float)ref_load(hidden, c->hidden, i);
    ref_layer_calibrate(&layer, calib, T);
    for (int64_t t = 0; t < T; t++)
        scale[t] = (float)(0.5 + testing_uniform(rng));
    /* Every third token of a rank takes experts that all live elsewhere (when that is possible):
     * pre-routed ids directly, routed ones through logits that favour them. */
    for (int r = 0; r < size; r++)
        for (int64_t t = first[r]; t < first[r + 1]; t++) {
            const int away = (t - first[r]) % 3 == 0 && E - (split[r + 1] - split[r]) >= k;
            pick_ids(rng, E, (int32_t)k, split, r, away, ids + t * k);
            for (int64_t j = 0; j < k; j++)
                weights[t * k + j] = (float)(0.1 + testing_uniform(rng));
            if (away && !c->routed)
                for (int64_t j = 0; j < k; j++)
                    logits[t * E + ids[t * k + j]] += 20.0f;
        }

    /* The single-device layer over all tokens. */
    fp4moe_plan *plan = NULL;
    fp4moe_status s = fp4moe_plan_create(ctx, &layer.cfg, &layer.w, &plan);
    CHECK(st, s == FP4MOE_SUCCESS, "%s: plan: %s", c->name, fp4moe_last_error(ctx));
    size_t ws_bytes = 0;
    fp4moe_plan_workspace_size(plan, T, &ws_bytes);
    void *ws = alloc256(ws_bytes + 1);
    fp4moe_forward_args a;
    fp4moe_forward_args_init(&a);
    a.num_tokens = T;
    a.hidden_states = hidden;
    a.hidden_dtype = c->hidden;
    a.router_logits = logits;
    a.topk_ids = ids;
    a.topk_weights = weights;
    a.per_token_scale = c->per_token_scale ? scale : NULL;
    a.output = expect;
    a.output_dtype = c->out;
    a.skip_finalize = c->skip_finalize;
    a.topk_ids_out = c->routed ? NULL : ids_expect;
    s = c->routed ? fp4moe_forward_routed(plan, &a, ws, ws_bytes, NULL)
                  : fp4moe_forward(plan, &a, ws, ws_bytes, NULL);
    CHECK(st, s == FP4MOE_SUCCESS, "%s: single-device forward: %s", c->name,
          fp4moe_last_error(ctx));

    fp4moe_ep_memory_group *group = NULL;
    fp4moe_ep_memory_group_create(size, &group);
    rank_job jobs[MAX_RANKS];
    pthread_t threads[MAX_RANKS];
    for (int r = 0; r < size; r++) {
        rank_job *j = &jobs[r];
        memset(j, 0, sizeof *j);
        j->rank = r;
        j->size = size;
        j->group = group;
        j->layer = &layer;
        j->cfg = &layer.cfg;
        j->e0 = split[r];
        j->e_loc = split[r + 1] - split[r];
        j->t = tokens[r];
        j->hidden = tokens[r] ? hidden + (size_t)(first[r] * H) * elt : NULL;
        j->logits = tokens[r] ? logits + first[r] * E : NULL;
        j->ids = tokens[r] ? ids + first[r] * k : NULL;
        j->weights = tokens[r] ? weights + first[r] * k : NULL;
        j->token_scale = c->per_token_scale && tokens[r] ? scale + first[r] : NULL;
        j->c = c;
        const int64_t row0 = c->skip_finalize ? first[r] * k : first[r];
        j->out = tokens[r] ? got + (size_t)(row0 * H) * out_elt : NULL;
        j->ids_out = tokens[r] ? ids_got + first[r] * k : NULL;
        pthread_create(&threads[r], NULL, run_rank, j);
    }
    int all_ok = 1;
    for (int r = 0; r < size; r++) {
        pthread_join(threads[r], NULL);
        all_ok &= jobs[r].create_status == FP4MOE_SUCCESS && jobs[r].forward_status == 0;
        CHECK(st, jobs[r].create_status == FP4MOE_SUCCESS && jobs[r].forward_status == 0,
              "%s, %d ranks: rank %d: create %d, forward %d: %s", c->name, size, r,
              jobs[r].create_status, jobs[r].forward_status, jobs[r].message);
    }
    if (all_ok) {
        const size_t bytes = (size_t)(out_rows * H) * out_elt;
        int64_t first_diff = -1;
        for (size_t i = 0; i < bytes && first_diff < 0; i++)
            if (got[i] != expect[i]) first_diff = (int64_t)(i / out_elt);
        CHECK(st, first_diff < 0,
              "%s, %d ranks: differs from the single-device layer first at element %lld "
              "(row %lld): %g vs %g",
              c->name, size, (long long)first_diff, (long long)(first_diff / H),
              ref_load(got, c->out, first_diff), ref_load(expect, c->out, first_diff));
        if (!c->routed)
            CHECK(st, memcmp(ids_got, ids_expect, (size_t)(T * k) * sizeof(int32_t)) == 0,
                  "%s, %d ranks: routing replay differs", c->name, size);
    }
    fp4moe_ep_memory_group_destroy(group);
    free(ws);
    fp4moe_plan_destroy(plan);
    free(hidden), free(logits), free(calib), free(ids), free(weights), free(scale);
    free(expect), free(got), free(ids_expect), free(ids_got);
    ref_layer_free(&layer);
}

/* A bad argument on one rank must fail the call on every rank, none left waiting. */
static void bad_rank_case(testing_state *st, testing_rng *rng)
{
    fp4moe_config cfg;
    fp4moe_config_init(&cfg);
    cfg.num_experts = 6;
    cfg.top_k = 2;
    cfg.hidden_size = 32;
    cfg.intermediate_size = 32;
    cfg.max_tokens = 8;
    ref_gen_options gen = {0, 0, 0, 0};
    ref_layer layer;
    if (ref_layer_generate(&layer, &cfg, &gen, rng) != 0) return;
    const int size = 3;
    float hidden[4 * 32], logits[4 * 6], out[4 * 32];
    ref_random_fill(rng, hidden, FP4MOE_DTYPE_F32, 4 * 32, 1.0);
    ref_random_fill(rng, logits, FP4MOE_DTYPE_F32, 4 * 6, 1.0);
    ep_case c = {0};
    c.hidden = c.out = FP4MOE_DTYPE_F32;
    fp4moe_ep_memory_group *group = NULL;
    fp4moe_ep_memory_group_create(size, &group);
    rank_job jobs[3];
    pthread_t threads[3];
    for (int r = 0; r < size; r++) {
        memset(&jobs[r], 0, sizeof jobs[r]);
        jobs[r] = (rank_job){.rank = r, .size = size, .group = group, .layer = &layer,
                             .cfg = &layer.cfg, .e0 = 2 * r, .e_loc = 2, .t = 4,
                             .hidden = (const uint8_t *)hidden, .logits = logits, .c = &c,
                             .bad_args = r == 2, .out = out};
        pthread_create(&threads[r], NULL, run_rank, &jobs[r]);
    }
    for (int r = 0; r < size; r++) {
        pthread_join(threads[r], NULL);
        CHECK(st, jobs[r].create_status == FP4MOE_SUCCESS &&
                      jobs[r].forward_status == FP4MOE_ERROR_INVALID_ARGUMENT &&
                      strlen(jobs[r].message) > 0,
              "bad rank: rank %d: create %d, forward %d (%s)", r, jobs[r].create_status,
              jobs[r].forward_status, jobs[r].message);
    }
    printf("  bad-argument messages: rank 0 \"%s\"; rank 2 \"%s\"\n", jobs[0].message,
           jobs[2].message);
    fp4moe_ep_memory_group_destroy(group);
    ref_layer_free(&layer);
}

/* The W4A4 codec on blocks built to hit its corners; decode verifies itself, so success means
 * the receiver's row quantises to exactly the sender's codes. */
static void codec_case(testing_state *st, testing_rng *rng)
{
    static const fp4moe_dtype dtypes[] = {FP4MOE_DTYPE_F32, FP4MOE_DTYPE_BF16, FP4MOE_DTYPE_F16};
    const int64_t H = 64;
    int failures = 0, rows = 0;
    for (int d = 0; d < 3; d++) {
        const fp4moe_dtype dtype = dtypes[d];
        for (int trial = 0; trial < 3000; trial++) {
            float x[64];
            const int kind = trial % 6;
            /* Magnitudes from far below to far above g's sweet spot, so block scales
             * underflow, go subnormal and saturate. */
            const double mag = pow(2.0, testing_uniform(rng) * 40.0 - 28.0);
            for (int64_t i = 0; i < H; i++) {
                double v = testing_normal(rng) * mag;
                if (kind == 1 && testing_uniform(rng) < 0.2) v = 0.0;
                if (kind == 2 && testing_uniform(rng) < 0.1) v = NAN;
                if (kind == 3 && testing_uniform(rng) < 0.05) v = testing_uniform(rng) < 0.5 ? INFINITY : -INFINITY;
                if (kind == 4 && i % 16 != 3) v = -0.0;
                x[i] = (float)v;
            }
            round_to_dtype(x, H, dtype);
            const float g = (float)pow(2.0, testing_uniform(rng) * 30.0 - 10.0) * 2688.0f;
            uint8_t payload[64 / 2 + 4 + 4 * 4];
            uint8_t row[64 * 4];
            ep_w4a4_encode_row(x, H, dtype, g, payload);
            rows++;
            if (ep_w4a4_decode_row(payload, H, dtype, g, row) != 0) {
                if (failures++ < 3)
                    fprintf(stderr, "codec: %s kind %d g %g mag %g fails\n", dtype_name(dtype), kind,
                            (double)g, mag);
                continue;
            }
            /* The quantisation of what the expert will load equals the sender's. */
            float back[64];
            uint8_t codes[32], scales[4];
            load_f32(row, dtype, H, back);
            nvfp4_quantize_row(back, H, g, codes, scales);
            if (memcmp(codes, payload, 32) != 0 || memcmp(scales, payload + 32, 4) != 0) failures++;
        }
    }
    CHECK(st, failures == 0, "codec: %d of %d rows do not reproduce their codes", failures, rows);
}

int main(void)
{
    testing_state st = {0, 0};
    testing_rng rng = testing_rng_from_env(TEST_NAME);
    fp4moe_context_options o;
    fp4moe_context_options_init(&o);
    o.backend = FP4MOE_BACKEND_CPU;
    o.num_threads = 1;
    fp4moe_context *ctx = NULL;
    if (fp4moe_context_create(&o, &ctx) != FP4MOE_SUCCESS) {
        CHECK(&st, 0, "context");
        return testing_finish(&st, TEST_NAME);
    }
    const fp4moe_dtype F32 = FP4MOE_DTYPE_F32, BF16 = FP4MOE_DTYPE_BF16, F16 = FP4MOE_DTYPE_F16;
    const fp4moe_precision A16 = FP4MOE_PRECISION_W4A16, A4 = FP4MOE_PRECISION_W4A4;
    const ep_case cases[] = {
        /* name, E, H, I, k, act, routing, n_group, topk_group, precision, fp8, hidden, out,
         * per_token_scale, routed, skip_finalize, biases */
        {"w4a16 f32 swiglu renorm", 8, 64, 32, 3, FP4MOE_ACT_SWIGLU, FP4MOE_ROUTING_RENORMALIZE, 1, 1, A16, 0, F32, F32, 1, 0, 0, 1},
        {"w4a16 bf16 geglu softmax", 9, 48, 32, 2, FP4MOE_ACT_GEGLU, FP4MOE_ROUTING_SOFTMAX_TOPK, 1, 1, A16, 0, BF16, BF16, 0, 0, 0, 0},
        {"w4a16 f16 relu2 routed", 7, 32, 48, 4, FP4MOE_ACT_RELU2, FP4MOE_ROUTING_TOPK, 1, 1, A16, 0, F16, F32, 1, 1, 0, 1},
        {"w4a16 fp8 bf16 silu", 10, 64, 32, 2, FP4MOE_ACT_SILU, FP4MOE_ROUTING_SIGMOID_RENORM, 1, 1, A16, 1, BF16, BF16, 1, 0, 0, 0},
        {"w4a4 f32 swiglu deepseek", 8, 64, 32, 3, FP4MOE_ACT_SWIGLU, FP4MOE_ROUTING_DEEPSEEK_V3, 4, 2, A4, 0, F32, F32, 1, 0, 0, 1},
        {"w4a4 bf16 swiglu routed", 9, 64, 48, 2, FP4MOE_ACT_SWIGLU, FP4MOE_ROUTING_RENORMALIZE, 1, 1, A4, 0, BF16, BF16, 0, 1, 0, 0},
        {"w4a4 f16 gelu", 6, 32, 32, 2, FP4MOE_ACT_GELU, FP4MOE_ROUTING_MINIMAX2, 1, 1, A4, 0, F16, F16, 1, 0, 0, 0},
        {"w4a4 llama4 on input bf16", 8, 64, 32, 1, FP4MOE_ACT_SWIGLU, FP4MOE_ROUTING_LLAMA4, 1, 1, A4, 0, BF16, F32, 1, 0, 0, 0},
        {"w4a16 llama4 on input f16", 7, 32, 32, 1, FP4MOE_ACT_GEGLU_TANH, FP4MOE_ROUTING_LLAMA4, 1, 1, A16, 0, F16, F16, 0, 0, 0, 1},
        {"w4a16 bf16 skip finalize", 8, 32, 32, 3, FP4MOE_ACT_SWIGLU, FP4MOE_ROUTING_RENORMALIZE_NAIVE, 1, 1, A16, 0, BF16, BF16, 0, 0, 1, 0},
        {"w4a4 f32 skip finalize routed", 6, 32, 32, 2, FP4MOE_ACT_IDENTITY, FP4MOE_ROUTING_TOPK_SIGMOID, 1, 1, A4, 0, F32, F32, 0, 1, 1, 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        for (int size = 1; size <= MAX_RANKS; size++)
            if (cases[i].E >= size) run_case(&st, &rng, ctx, &cases[i], size);
    bad_rank_case(&st, &rng);
    codec_case(&st, &rng);
    fp4moe_context_destroy(ctx);
    return testing_finish(&st, TEST_NAME);
}
