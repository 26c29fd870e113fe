/* Plan serialisation: round trip (same config, same outputs bit for bit), and every kind of
 * damage (truncation at every length, flipped bytes, a foreign version, a re-checksummed blob
 * with a bad field) gives an error status, never a crash or a plan. */
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "fp4moe.h"
#include "ref/ref_moe.h"
#include "testing.h"

static void put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* Recomputes the trailing CRC so that a deliberately bad field gets past the checksum. */
static void reseal(uint8_t *blob, size_t n)
{
    put_u32(blob + n - 4, (uint32_t)crc32_z(0L, blob, n - 4));
}

static int run_layer(fp4moe_plan *plan, int64_t t, const float *x, const float *logits, float *out)
{
    size_t ws_bytes = 0;
    if (fp4moe_plan_workspace_size(plan, t, &ws_bytes) != FP4MOE_SUCCESS) return 1;
    void *ws = aligned_alloc(256, (ws_bytes + 256) / 256 * 256);
    fp4moe_forward_args a;
    fp4moe_forward_args_init(&a);
    a.num_tokens = t;
    a.hidden_states = x;
    a.router_logits = logits;
    a.output = out;
    fp4moe_status st = fp4moe_forward(plan, &a, ws, ws_bytes, NULL);
    free(ws);
    return st != FP4MOE_SUCCESS;
}

/* Whether needle[0, len) occurs in hay[0, n). */
static int contains(const uint8_t *hay, size_t n, const uint8_t *needle, size_t len)
{
    for (size_t i = 0; i + len <= n; i++)
        if (hay[i] == needle[0] && memcmp(hay + i, needle, len) == 0) return 1;
    return 0;
}

int main(void)
{
    testing_state st = {0, 0};
    testing_rng rng = testing_rng_from_env("test_serialize");
    fp4moe_context_options opt;
    fp4moe_context_options_init(&opt);
    opt.backend = FP4MOE_BACKEND_CPU;
    fp4moe_context *ctx = NULL;
    CHECK(&st, fp4moe_context_create(&opt, &ctx) == FP4MOE_SUCCESS, "context");

    fp4moe_config cfg;
    fp4moe_config_init(&cfg);
    cfg.num_experts = 12, cfg.top_k = 3, cfg.hidden_size = 64, cfg.intermediate_size = 48;
    cfg.routing = FP4MOE_ROUTING_DEEPSEEK_V3, cfg.n_group = 4, cfg.topk_group = 2;
    cfg.routed_scaling_factor = 2.5f, cfg.max_tokens = 64;
    cfg.local_expert_offset = 2, cfg.local_num_experts = 9;
    cfg.swiglu_alpha = 1.702f, cfg.swiglu_beta = 1.0f, cfg.swiglu_limit = 7.0f;
    ref_gen_options gen = {.biases = 1, .routing_bias = 1, .half2_scale = 1};
    ref_layer layer;
    CHECK(&st, ref_layer_generate(&layer, &cfg, &gen, &rng) == 0, "generate");
    fp4moe_plan *plan = NULL;
    CHECK(&st, fp4moe_plan_create(ctx, &cfg, &layer.w, &plan) == FP4MOE_SUCCESS, "create: %s",
          fp4moe_last_error(ctx));

    size_t n = 0;
    CHECK(&st, fp4moe_plan_serialized_size(plan, &n) == FP4MOE_SUCCESS && n > 64, "size");
    uint8_t *blob = malloc(n);
    uint8_t *copy = malloc(n);
    size_t written = 0;
    CHECK(&st, fp4moe_plan_serialize(plan, blob, n - 1, &written) == FP4MOE_ERROR_INVALID_ARGUMENT,
          "short buffer refused");
    CHECK(&st, fp4moe_plan_serialize(plan, blob, n, &written) == FP4MOE_SUCCESS && written == n,
          "serialize");

    /* The CPU backend keeps only its repacked weights: the blob's expert matrices are rebuilt
     * from them and must be the caller's canonical bytes (w2 has an odd number of 16-value
     * blocks per row: the repacked pair padding must not leak). */
    {
        /* (the layer holds the local experts only) */
        const int64_t el = cfg.local_num_experts;
        const int64_t h = cfg.hidden_size, in = cfg.intermediate_size, n1 = 2 * in;
        const struct { const uint8_t *src; size_t bytes; const char *name; } m[] = {
            {layer.w.w1, (size_t)(el * n1 * h / 2), "w1"},
            {layer.w.w1_scale, (size_t)(el * n1 * h / 16), "w1_scale"},
            {layer.w.w2, (size_t)(el * h * in / 2), "w2"},
            {layer.w.w2_scale, (size_t)(el * h * in / 16), "w2_scale"}};
        for (int i = 0; i < 4; i++)
            CHECK(&st, contains(blob, n, m[i].src, m[i].bytes), "blob holds the canonical %s",
                  m[i].name);
    }

    /* Round trip: same config, same outputs bit for bit. */
    fp4moe_plan *back = NULL;
    CHECK(&st, fp4moe_plan_deserialize(ctx, blob, n, &back) == FP4MOE_SUCCESS, "deserialize: %s",
          fp4moe_last_error(ctx));
    if (back != NULL) {
        fp4moe_config c1, c2;
        fp4moe_plan_get_config(plan, &c1);
        fp4moe_plan_get_config(back, &c2);
        /* Field by field: struct padding is not part of the value. */
        CHECK(&st, c1.num_experts == c2.num_experts && c1.top_k == c2.top_k &&
                       c1.hidden_size == c2.hidden_size &&
                       c1.intermediate_size == c2.intermediate_size &&
                       c1.activation == c2.activation && c1.swiglu_alpha == c2.swiglu_alpha &&
                       c1.swiglu_beta == c2.swiglu_beta && c1.swiglu_limit == c2.swiglu_limit &&
                       c1.gate_up_order == c2.gate_up_order && c1.routing == c2.routing &&
                       c1.n_group == c2.n_group && c1.topk_group == c2.topk_group &&
                       c1.norm_topk_prob == c2.norm_topk_prob &&
                       c1.routed_scaling_factor == c2.routed_scaling_factor &&
                       c1.apply_router_weight_on_input == c2.apply_router_weight_on_input &&
                       c1.local_expert_offset == c2.local_expert_offset &&
                       c1.local_num_experts == c2.local_num_experts &&
                       c1.precision == c2.precision && c1.fc2_input_fp8 == c2.fc2_input_fp8 &&
                       c1.decode_threshold == c2.decode_threshold &&
                       c1.max_tokens == c2.max_tokens,
              "config round trip");
        const int64_t t = 37;
        float *x = malloc(sizeof(float) * (size_t)(t * cfg.hidden_size));
        float *logits = malloc(sizeof(float) * (size_t)(t * cfg.num_experts));
        float *o1 = malloc(sizeof(float) * (size_t)(t * cfg.hidden_size));
        float *o2 = malloc(sizeof(float) * (size_t)(t * cfg.hidden_size));
        ref_random_fill(&rng, x, FP4MOE_DTYPE_F32, t * cfg.hidden_size, 1.0);
        ref_random_fill(&rng, logits, FP4MOE_DTYPE_F32, t * cfg.num_experts, 2.0);
        CHECK(&st, run_layer(plan, t, x, logits, o1) == 0, "forward original: %s", fp4moe_last_error(ctx));
        CHECK(&st, run_layer(back, t, x, logits, o2) == 0, "forward restored: %s", fp4moe_last_error(ctx));
        CHECK(&st, memcmp(o1, o2, sizeof(float) * (size_t)(t * cfg.hidden_size)) == 0,
              "restored plan computes the same bits");
        free(x), free(logits), free(o1), free(o2);
        /* Serialising the restored plan gives the same bytes. */
        size_t n2 = 0;
        fp4moe_plan_serialized_size(back, &n2);
        uint8_t *blob2 = malloc(n2);
        CHECK(&st, n2 == n && fp4moe_plan_serialize(back, blob2, n2, NULL) == FP4MOE_SUCCESS &&
                       memcmp(blob, blob2, n) == 0,
              "re-serialised bytes identical");
        free(blob2);
        fp4moe_plan_destroy(back);
    }

    /* Truncation at every length (every 7th past the fixed part, to stay fast). */
    int truncation_ok = 1;
    for (size_t len = 0; len < n; len += len < 256 ? 1 : 7) {
        fp4moe_plan *p = NULL;
        fp4moe_status s = fp4moe_plan_deserialize(ctx, blob, len, &p);
        if (s != FP4MOE_ERROR_CORRUPT_DATA || p != NULL) {
            truncation_ok = 0;
            fprintf(stderr, "truncated to %zu: status %d\n", len, (int)s);
            fp4moe_plan_destroy(p);
            break;
        }
    }
    CHECK(&st, truncation_ok, "every truncation is CORRUPT_DATA");

    /* One flipped bit at random positions (outside the version field). */
    int flips_ok = 1;
    for (int trial = 0; trial < 300; trial++) {
        memcpy(copy, blob, n);
        size_t pos = (size_t)testing_int(&rng, 0, (int64_t)n - 1);
        if (pos >= 8 && pos < 12) continue;
        copy[pos] ^= (uint8_t)(1u << testing_int(&rng, 0, 7));
        fp4moe_plan *p = NULL;
        fp4moe_status s = fp4moe_plan_deserialize(ctx, copy, n, &p);
        if (s != FP4MOE_ERROR_CORRUPT_DATA || p != NULL) {
            flips_ok = 0;
            fprintf(stderr, "flip at %zu: status %d\n", pos, (int)s);
            fp4moe_plan_destroy(p);
            break;
        }
    }
    CHECK(&st, flips_ok, "every flipped bit is CORRUPT_DATA");

    /* Another format version. */
    memcpy(copy, blob, n);
    put_u32(copy + 8, 99);
    fp4moe_plan *p = NULL;
    CHECK(&st, fp4moe_plan_deserialize(ctx, copy, n, &p) == FP4MOE_ERROR_VERSION_MISMATCH && !p,
          "version mismatch");

    /* Valid checksum, bad contents: top_k (second config int at offset 40) = 0, a NaN global
     * scale, and an array length that disagrees with the config. */
    memcpy(copy, blob, n);
    copy[40] = 0;
    reseal(copy, n);
    CHECK(&st, fp4moe_plan_deserialize(ctx, copy, n, &p) == FP4MOE_ERROR_CORRUPT_DATA && !p,
          "bad top_k refused: %s", fp4moe_last_error(ctx));
    CHECK(&st, strstr(fp4moe_last_error(ctx), "top_k") != NULL, "message names top_k: %s",
          fp4moe_last_error(ctx));
    const size_t arrays = 32 + 17 * 8 + 4 * 4 + 4;
    memcpy(copy, blob, n);
    copy[arrays] ^= 1; /* w1's byte count */
    reseal(copy, n);
    CHECK(&st, fp4moe_plan_deserialize(ctx, copy, n, &p) == FP4MOE_ERROR_CORRUPT_DATA && !p,
          "bad array size refused");
    CHECK(&st, fp4moe_plan_deserialize(ctx, NULL, n, &p) == FP4MOE_ERROR_INVALID_ARGUMENT,
          "NULL buffer");
    CHECK(&st, fp4moe_plan_deserialize(NULL, blob, n, &p) == FP4MOE_ERROR_INVALID_ARGUMENT,
          "NULL context");

    free(blob);
    free(copy);
    fp4moe_plan_destroy(plan);
    ref_layer_free(&layer);
    fp4moe_context_destroy(ctx);
    return testing_finish(&st, "test_serialize");
}
