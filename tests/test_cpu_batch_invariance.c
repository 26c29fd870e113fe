/* Batch invariance of the CPU backend: a token's output bits must not depend on which other
 * tokens share its forward call (expert-parallel combines compare rows computed on different
 * ranks, in different batches). For every kernel level the CPU runs (FP4MOE_CPU_ISA, read at
 * plan creation), W4A16 and W4A4, F32 and BF16 activations: token 0's output row alone is the
 * reference; then token 0 goes into batches of up to 30 tokens at a random position, with
 * 0..23 other tokens on one or both of its experts (so that its experts see every token count
 * the kernels split into tiles of 1, 2-3, 4-6 and up to 24 tokens) and the rest elsewhere. Its
 * row must be bit-identical every time. H spans more than one AVX2 decode segment (32 pairs)
 * and ends in a partial pair; I = 48 does not fill its second pair either. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fp4moe.h"
#include "ref/ref_moe.h"
#include "testing.h"

#define TEST_NAME "test_cpu_batch_invariance"
#define NUM_EXPERTS 8
#define TOP_K 2
#define HIDDEN 1040 /* 32.5 pairs */
#define INTER 48    /* 1.5 pairs */
#define MAX_T 30

typedef struct buffers {
    void *hidden;   /* [MAX_T, HIDDEN] in the activation dtype */
    float *alone;   /* token 0's row computed alone */
    float *out;     /* [MAX_T, HIDDEN] */
    int32_t *ids;   /* [MAX_T, TOP_K] */
    float *weights; /* [MAX_T, TOP_K] */
    void *ws;
    size_t ws_bytes;
} buffers;

static fp4moe_status forward(fp4moe_plan *plan, buffers *b, int64_t t, fp4moe_dtype dtype,
                             float *out)
{
    fp4moe_forward_args a;
    fp4moe_forward_args_init(&a);
    a.num_tokens = t;
    a.hidden_states = b->hidden;
    a.hidden_dtype = dtype;
    a.topk_ids = b->ids;
    a.topk_weights = b->weights;
    a.topk_weights_dtype = FP4MOE_DTYPE_F32;
    a.output = out;
    a.output_dtype = FP4MOE_DTYPE_F32;
    return fp4moe_forward_routed(plan, &a, b->ws, b->ws_bytes, NULL);
}

/* n values spread over 2^-8..2^8 times N(0, 1), never zero: with BF16 inputs and values of one
 * magnitude, FP32 sums of the short products are often exact in any order, and a changed order
 * would go unseen. */
static void fill_wide(testing_rng *rng, void *data, fp4moe_dtype dtype, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        double v = testing_normal(rng) * ldexp(1.0, (int)testing_int(rng, -8, 8));
        if (ref_round_dtype(v, dtype) == 0.0) v = 1.0;
        ref_store(data, dtype, i, v);
    }
}

/* Two distinct experts outside token 0's pair {0, 1}. */
static void other_experts(testing_rng *rng, int32_t *ids)
{
    ids[0] = (int32_t)testing_int(rng, 2, NUM_EXPERTS - 1);
    do
        ids[1] = (int32_t)testing_int(rng, 2, NUM_EXPERTS - 1);
    while (ids[1] == ids[0]);
}

/* Token 0 (its input saved in x0) at a random position among `sharing` tokens on its experts
 * and random others; its row must equal b->alone bit for bit. */
static void check_batch(testing_state *st, testing_rng *rng, fp4moe_plan *plan, buffers *b,
                        fp4moe_dtype dtype, const void *x0, const float w0[TOP_K], int sharing,
                        const char *what)
{
    const size_t row = (size_t)HIDDEN * ref_dtype_bytes(dtype);
    const int64_t t = testing_int(rng, 1 + sharing, MAX_T);
    const int64_t pos = testing_int(rng, 0, t - 1);
    fill_wide(rng, b->hidden, dtype, t * HIDDEN);
    for (int64_t i = 0, shared = 0; i < t; i++) {
        int32_t *ids = b->ids + i * TOP_K;
        for (int j = 0; j < TOP_K; j++) b->weights[i * TOP_K + j] = (float)testing_uniform(rng);
        if (i == pos) {
            memcpy((uint8_t *)b->hidden + (size_t)i * row, x0, row);
            ids[0] = 0;
            ids[1] = 1;
            memcpy(b->weights + i * TOP_K, w0, sizeof(float) * TOP_K);
        } else if (shared < sharing) {
            /* Both of token 0's experts, or one of them and another, in either slot order. */
            shared++;
            other_experts(rng, ids);
            const int mode = (int)testing_int(rng, 0, 2);
            if (mode == 0 || mode == 2) ids[0] = 0;
            if (mode == 1 || mode == 2) ids[1] = 1;
            if (testing_int(rng, 0, 1)) {
                const int32_t s = ids[0];
                ids[0] = ids[1];
                ids[1] = s;
            }
        } else {
            other_experts(rng, ids);
        }
    }
    fp4moe_status s = forward(plan, b, t, dtype, b->out);
    CHECK(st, s == FP4MOE_SUCCESS, "%s: forward_routed T=%lld", what, (long long)t);
    if (s != FP4MOE_SUCCESS) return;
    const float *got = b->out + pos * HIDDEN;
    CHECK(st, memcmp(got, b->alone, sizeof(float) * HIDDEN) == 0,
          "%s: %d sharing tokens, T=%lld, at %lld: row differs from the token alone", what,
          sharing, (long long)t, (long long)pos);
}

static void run_level(testing_state *st, testing_rng *rng, const char *isa,
                      fp4moe_precision precision, fp4moe_dtype dtype, buffers *b)
{
    static const int sharing[] = {0, 1, 2, 3, 5, 7, 11, 23};
    char what[96];
    snprintf(what, sizeof what, "%s %s %s", isa,
             precision == FP4MOE_PRECISION_W4A4 ? "W4A4" : "W4A16",
             dtype == FP4MOE_DTYPE_BF16 ? "BF16" : "F32");
    setenv("FP4MOE_CPU_ISA", isa, 1);
    fp4moe_context_options o;
    fp4moe_context_options_init(&o);
    o.backend = FP4MOE_BACKEND_CPU;
    /* One thread: results do not depend on it (test_layer), and idle OpenMP threads spin. */
    o.num_threads = 1;
    fp4moe_context *ctx = NULL;
    fp4moe_plan *plan = NULL;
    ref_layer L;
    int have_layer = 0;
    void *x0 = malloc((size_t)HIDDEN * 4);
    fp4moe_status s = fp4moe_context_create(&o, &ctx);
    CHECK(st, s == FP4MOE_SUCCESS && x0 != NULL, "%s: context_create", what);
    if (s != FP4MOE_SUCCESS || x0 == NULL) goto done;

    fp4moe_config cfg;
    fp4moe_config_init(&cfg);
    cfg.num_experts = NUM_EXPERTS;
    cfg.top_k = TOP_K;
    cfg.hidden_size = HIDDEN;
    cfg.intermediate_size = INTER;
    cfg.activation = FP4MOE_ACT_SWIGLU;
    cfg.precision = precision;
    cfg.max_tokens = MAX_T;
    const ref_gen_options gen = {1, 0, 0, 0};
    have_layer = ref_layer_generate(&L, &cfg, &gen, rng) == 0;
    CHECK(st, have_layer, "%s: cannot generate the layer", what);
    if (!have_layer) goto done;
    if (precision == FP4MOE_PRECISION_W4A4) {
        /* Realistic activation scales, so that W4A4 quantises with nontrivial block scales. */
        ref_random_fill(rng, b->out, FP4MOE_DTYPE_F32, MAX_T * HIDDEN, 1.0);
        CHECK(st, ref_layer_calibrate(&L, b->out, MAX_T) == 0, "%s: calibrate", what);
    }
    fp4moe_weights w = L.w;
    if (precision != FP4MOE_PRECISION_W4A4) w.a1_global_scale = w.a2_global_scale = NULL;
    w.fc2_input_fp8_scale = NULL;
    s = fp4moe_plan_create(ctx, &cfg, &w, &plan);
    CHECK(st, s == FP4MOE_SUCCESS, "%s: plan_create: %s", what, fp4moe_last_error(ctx));
    if (s != FP4MOE_SUCCESS) goto done;
    printf("%s: %s\n", what, fp4moe_context_description(ctx));
    s = fp4moe_plan_workspace_size(plan, MAX_T, &b->ws_bytes);
    CHECK(st, s == FP4MOE_SUCCESS, "%s: workspace_size", what);
    if (s != FP4MOE_SUCCESS) goto done;
    b->ws = aligned_alloc(256, (b->ws_bytes + 255) / 256 * 256);
    CHECK(st, b->ws != NULL, "%s: out of memory", what);
    if (b->ws == NULL) goto done;

    /* Token 0 alone. */
    float w0[TOP_K] = {(float)testing_uniform(rng), (float)testing_uniform(rng)};
    fill_wide(rng, x0, dtype, HIDDEN);
    memcpy(b->hidden, x0, (size_t)HIDDEN * ref_dtype_bytes(dtype));
    b->ids[0] = 0;
    b->ids[1] = 1;
    memcpy(b->weights, w0, sizeof w0);
    s = forward(plan, b, 1, dtype, b->alone);
    CHECK(st, s == FP4MOE_SUCCESS, "%s: forward_routed alone", what);
    if (s != FP4MOE_SUCCESS) goto done;
    for (size_t i = 0; i < sizeof sharing / sizeof sharing[0]; i++)
        for (int rep = 0; rep < 3; rep++)
            check_batch(st, rng, plan, b, dtype, x0, w0, sharing[i], what);

done:
    free(b->ws);
    b->ws = NULL;
    fp4moe_plan_destroy(plan);
    if (have_layer) ref_layer_free(&L);
    fp4moe_context_destroy(ctx);
    free(x0);
    unsetenv("FP4MOE_CPU_ISA");
}

int main(void)
{
    testing_state st;
    memset(&st, 0, sizeof st);
    testing_rng rng = testing_rng_from_env(TEST_NAME);
    buffers b;
    memset(&b, 0, sizeof b);
    b.hidden = malloc((size_t)MAX_T * HIDDEN * 4);
    b.alone = malloc((size_t)HIDDEN * 4);
    b.out = malloc((size_t)MAX_T * HIDDEN * 4);
    b.ids = malloc((size_t)MAX_T * TOP_K * sizeof(int32_t));
    b.weights = malloc((size_t)MAX_T * TOP_K * sizeof(float));
    CHECK(&st, b.hidden && b.alone && b.out && b.ids && b.weights, "out of memory");
    if (!(b.hidden && b.alone && b.out && b.ids && b.weights)) goto done;

    static const char *const levels[] = {"generic", "avx2", "avx512"};
    static const fp4moe_precision precisions[] = {FP4MOE_PRECISION_W4A16, FP4MOE_PRECISION_W4A4};
    static const fp4moe_dtype dtypes[] = {FP4MOE_DTYPE_F32, FP4MOE_DTYPE_BF16};
    for (size_t l = 0; l < 3; l++)
        for (size_t p = 0; p < 2; p++)
            for (size_t d = 0; d < 2; d++) {
                run_level(&st, &rng, levels[l], precisions[p], dtypes[d], &b);
            }

done:
    free(b.hidden);
    free(b.alone);
    free(b.out);
    free(b.ids);
    free(b.weights);
    return testing_finish(&st, TEST_NAME);
}
