/* Sizes whose index products pass 2^31: every offset must be computed in 64 bits.
 *
 * 1. T*k*H > 2^31 (k = 32, 16385 tokens, small experts): the last tokens of the call must
 *    equal the same tokens run alone.
 * 2. E_loc*N1*H/2 > 2^31 bytes of FC1 weights (148 DeepSeek-V3-sized experts): tokens routed
 *    to the last experts must equal a small plan built from just those experts' slices.
 * Both compare a library run with another library run on the same numbers (bit for bit), which
 * is what a wrapped 32-bit offset would break. FP4MOE_TEST_BACKEND=cuda runs them on the GPU. The weights are random
 * codes, not quantised data, to keep set-up fast. */
#include <stdlib.h>
#include <string.h>

#include "fp4moe.h"
#include "testing.h"

static uint64_t fill_state = 0x243F6A8885A308D3ull;

static void fill_random_bytes(uint8_t *p, size_t n)
{
    uint64_t s = fill_state;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        s ^= s >> 12, s ^= s << 25, s ^= s >> 27;
        uint64_t r = s * 2685821657736338717ull;
        memcpy(p + i, &r, 8);
    }
    for (; i < n; i++) p[i] = (uint8_t)(i * 131u);
    fill_state = s;
}

/* E4M3 scale codes 0x30..0x3f (0.5 .. 0.94): random but tame. */
static void fill_scales(uint8_t *p, size_t n)
{
    fill_random_bytes(p, n);
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)(0x30 | (p[i] & 0x0f));
}

/* BF16 values +-[0.5, 2): random sign, exponent 126 or 127, random mantissa (fast). */
static void random_bf16(uint16_t *x, int64_t n)
{
    fill_random_bytes((uint8_t *)x, (size_t)n * 2);
    for (int64_t i = 0; i < n; i++) x[i] = (uint16_t)((x[i] & 0x80ff) | 0x3f00);
}

/* One pre-routed call through whatever backend the plan's context runs: inputs uploaded into
 * backend buffers (host memory on the CPU, device memory on CUDA), the output downloaded. */
static int forward_routed(fp4moe_context *ctx, fp4moe_plan *plan, int64_t t, int64_t k,
                          int64_t h, const uint16_t *x, const int32_t *ids, const float *w,
                          uint16_t *out)
{
    const size_t x_bytes = (size_t)(t * h) * 2, tk = (size_t)(t * k);
    size_t ws_bytes = 0;
    void *d_x = NULL, *d_ids = NULL, *d_w = NULL, *d_out = NULL, *d_ws = NULL;
    int failed = fp4moe_plan_workspace_size(plan, t, &ws_bytes) != FP4MOE_SUCCESS ||
                 fp4moe_buffer_alloc(ctx, x_bytes, &d_x) != FP4MOE_SUCCESS ||
                 fp4moe_buffer_alloc(ctx, tk * 4, &d_ids) != FP4MOE_SUCCESS ||
                 fp4moe_buffer_alloc(ctx, tk * 4, &d_w) != FP4MOE_SUCCESS ||
                 fp4moe_buffer_alloc(ctx, x_bytes, &d_out) != FP4MOE_SUCCESS ||
                 fp4moe_buffer_alloc(ctx, ws_bytes, &d_ws) != FP4MOE_SUCCESS ||
                 fp4moe_buffer_upload(ctx, d_x, x, x_bytes) != FP4MOE_SUCCESS ||
                 fp4moe_buffer_upload(ctx, d_ids, ids, tk * 4) != FP4MOE_SUCCESS ||
                 fp4moe_buffer_upload(ctx, d_w, w, tk * 4) != FP4MOE_SUCCESS ||
                 fp4moe_buffer_upload(ctx, d_out, out, x_bytes) != FP4MOE_SUCCESS; /* poison */
    if (!failed) {
        fp4moe_forward_args a;
        fp4moe_forward_args_init(&a);
        a.num_tokens = t;
        a.hidden_states = d_x;
        a.hidden_dtype = FP4MOE_DTYPE_BF16;
        a.topk_ids = d_ids;
        a.topk_weights = d_w;
        a.output = d_out;
        a.output_dtype = FP4MOE_DTYPE_BF16;
        failed = fp4moe_forward_routed(plan, &a, d_ws, ws_bytes, NULL) != FP4MOE_SUCCESS ||
                 fp4moe_synchronize(ctx, NULL) != FP4MOE_SUCCESS ||
                 fp4moe_buffer_download(ctx, out, d_out, x_bytes) != FP4MOE_SUCCESS;
    }
    void *bufs[] = {d_x, d_ids, d_w, d_out, d_ws};
    for (int i = 0; i < 5; i++) fp4moe_buffer_free(ctx, bufs[i]);
    return failed;
}

static void many_tokens(testing_state *st, fp4moe_context *ctx)
{
    fp4moe_config cfg;
    fp4moe_config_init(&cfg);
    cfg.num_experts = 32, cfg.top_k = 32, cfg.hidden_size = 4096, cfg.intermediate_size = 16;
    cfg.activation = FP4MOE_ACT_RELU2;
    const int64_t t = (1ll << 31) / (cfg.top_k * cfg.hidden_size) + 1; /* 16385 */
    cfg.max_tokens = t;
    const int64_t h = cfg.hidden_size, n1 = 16, inter = 16, e = 32, k = 32;
    uint8_t *w1 = malloc((size_t)(e * n1 * h / 2)), *w1s = malloc((size_t)(e * n1 * h / 16));
    uint8_t *w2 = malloc((size_t)(e * h * inter / 2)), *w2s = malloc((size_t)(e * h * inter / 16));
    float g[32];
    for (int i = 0; i < 32; i++) g[i] = 0.01f + 0.0005f * (float)i;
    fill_random_bytes(w1, (size_t)(e * n1 * h / 2));
    fill_random_bytes(w2, (size_t)(e * h * inter / 2));
    fill_scales(w1s, (size_t)(e * n1 * h / 16));
    fill_scales(w2s, (size_t)(e * h * inter / 16));
    fp4moe_weights w = {.w1 = w1, .w1_scale = w1s, .w1_global_scale = g,
                        .w2 = w2, .w2_scale = w2s, .w2_global_scale = g};
    fp4moe_plan *plan = NULL;
    CHECK(st, fp4moe_plan_create(ctx, &cfg, &w, &plan) == FP4MOE_SUCCESS, "plan: %s",
          fp4moe_last_error(ctx));
    uint16_t *x = malloc((size_t)(t * h) * 2), *out = malloc((size_t)(t * h) * 2);
    int32_t *ids = malloc((size_t)(t * k) * 4);
    float *rw = malloc((size_t)(t * k) * 4);
    random_bf16(x, t * h);
    for (int64_t i = 0; i < t; i++)
        for (int j = 0; j < k; j++) {
            ids[i * k + j] = (int32_t)((i + j) % e);
            rw[i * k + j] = 0.03f + 0.001f * (float)j;
        }
    memset(out, 0xff, (size_t)(t * h) * 2); /* NaN poison */
    CHECK(st, plan && forward_routed(ctx, plan, t, k, h, x, ids, rw, out) == 0, "large forward: %s",
          fp4moe_last_error(ctx));
    /* The last 3 tokens (their output rows start past 2^31 / k elements of the expanded
     * problem) run alone must give the same bits. */
    const int64_t tail = 3, first = t - tail;
    uint16_t *alone = malloc((size_t)(tail * h) * 2);
    memset(alone, 0xff, (size_t)(tail * h) * 2);
    CHECK(st, plan && forward_routed(ctx, plan, tail, k, h, x + first * h, ids + first * k,
                                     rw + first * k, alone) == 0,
          "tail forward");
    CHECK(st, memcmp(alone, out + first * h, (size_t)(tail * h) * 2) == 0,
          "tokens past 2^31 expanded elements equal the same tokens alone");
    int64_t poisoned = 0;
    for (int64_t i = 0; i < t * h; i++) poisoned += out[i] == 0xffff;
    CHECK(st, poisoned == 0, "%lld output elements never written", (long long)poisoned);
    free(alone), free(x), free(out), free(ids), free(rw);
    free(w1), free(w1s), free(w2), free(w2s);
    fp4moe_plan_destroy(plan);
}

static void many_experts(testing_state *st, fp4moe_context *ctx)
{
    fp4moe_config cfg;
    fp4moe_config_init(&cfg);
    /* DeepSeek-V3-sized experts (the CUDA backend routes at most a few thousand experts, so
     * the bytes come from the experts' size, not their count). */
    const int64_t h = 7168, inter = 2048, n1 = 2 * inter;
    const int64_t e = (1ll << 31) / (n1 * h / 2) + 2; /* 148: FC1 bytes just past 2^31 */
    cfg.num_experts = e, cfg.top_k = 2, cfg.hidden_size = h, cfg.intermediate_size = inter;
    cfg.routing = FP4MOE_ROUTING_TOPK;
    cfg.max_tokens = 8;
    const size_t w1_bytes = (size_t)(e * n1 * h / 2), w1s_bytes = (size_t)(e * n1 * h / 16);
    const size_t w2_bytes = (size_t)(e * h * inter / 2), w2s_bytes = (size_t)(e * h * inter / 16);
    uint8_t *w1 = malloc(w1_bytes), *w1s = malloc(w1s_bytes);
    uint8_t *w2 = malloc(w2_bytes), *w2s = malloc(w2s_bytes);
    float *g = malloc((size_t)e * 4);
    if (!w1 || !w1s || !w2 || !w2s || !g) {
        CHECK(st, 0, "cannot allocate %zu bytes of weights", w1_bytes + w2_bytes);
        free(w1), free(w1s), free(w2), free(w2s), free(g);
        return;
    }
    fill_random_bytes(w1, w1_bytes);
    fill_random_bytes(w2, w2_bytes);
    fill_scales(w1s, w1s_bytes);
    fill_scales(w2s, w2s_bytes);
    for (int64_t i = 0; i < e; i++) g[i] = 0.01f;
    fp4moe_weights w = {.w1 = w1, .w1_scale = w1s, .w1_global_scale = g,
                        .w2 = w2, .w2_scale = w2s, .w2_global_scale = g};
    fp4moe_plan *big = NULL;
    CHECK(st, fp4moe_plan_create(ctx, &cfg, &w, &big) == FP4MOE_SUCCESS, "big plan: %s",
          fp4moe_last_error(ctx));

    /* The small plan: experts e-2 and e-1 only, as local experts 0 and 1 of a 2-expert layer. */
    fp4moe_config small_cfg = cfg;
    small_cfg.num_experts = 2;
    fp4moe_weights sw = {.w1 = w1 + (size_t)(e - 2) * (size_t)(n1 * h / 2),
                         .w1_scale = w1s + (size_t)(e - 2) * (size_t)(n1 * h / 16),
                         .w1_global_scale = g,
                         .w2 = w2 + (size_t)(e - 2) * (size_t)(h * inter / 2),
                         .w2_scale = w2s + (size_t)(e - 2) * (size_t)(h * inter / 16),
                         .w2_global_scale = g};
    fp4moe_plan *small = NULL;
    CHECK(st, fp4moe_plan_create(ctx, &small_cfg, &sw, &small) == FP4MOE_SUCCESS, "small plan: %s",
          fp4moe_last_error(ctx));
    const int64_t t = 5;
    static uint16_t x[5 * 7168], out_big[5 * 7168], out_small[5 * 7168];
    int32_t ids_big[10], ids_small[10];
    float rw[10];
    random_bf16(x, t * h);
    for (int i = 0; i < 10; i++) {
        ids_small[i] = i % 2 ? 1 : 0;
        ids_big[i] = (int32_t)(e - 2) + ids_small[i];
        rw[i] = 0.5f + 0.1f * (float)(i % 3);
    }
    memset(out_big, 0xff, sizeof out_big);
    memset(out_small, 0xff, sizeof out_small);
    CHECK(st, big && forward_routed(ctx, big, t, 2, h, x, ids_big, rw, out_big) == 0, "big forward: %s",
          fp4moe_last_error(ctx));
    CHECK(st, small && forward_routed(ctx, small, t, 2, h, x, ids_small, rw, out_small) == 0,
          "small forward");
    CHECK(st, memcmp(out_big, out_small, sizeof out_big) == 0,
          "experts past 2^31 weight bytes compute what the same experts do alone");
    fp4moe_plan_destroy(big);
    fp4moe_plan_destroy(small);
    free(w1), free(w1s), free(w2), free(w2s), free(g);
}

int main(void)
{
    testing_state st = {0, 0};
    fp4moe_context_options opt;
    fp4moe_context_options_init(&opt);
    /* FP4MOE_TEST_BACKEND=cuda runs the same checks on the GPU (scripts/gpu-check.sh). */
    const char *backend = getenv("FP4MOE_TEST_BACKEND");
    opt.backend = backend && strcmp(backend, "cuda") == 0 ? FP4MOE_BACKEND_CUDA : FP4MOE_BACKEND_CPU;
    fp4moe_context *ctx = NULL;
    CHECK(&st, fp4moe_context_create(&opt, &ctx) == FP4MOE_SUCCESS, "context");
    if (ctx == NULL) return testing_finish(&st, "test_large_sizes");
    printf("test_large_sizes: %s\n", fp4moe_context_description(ctx));
    many_tokens(&st, ctx);
    many_experts(&st, ctx);
    fp4moe_context_destroy(ctx);
    return testing_finish(&st, "test_large_sizes");
}
