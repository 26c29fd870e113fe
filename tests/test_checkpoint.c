/* The checkpoint reader through the public API (include/fp4moe_checkpoint.h): a random NVFP4 layer
 * (tests/ref) written as a ModelOpt checkpoint folder (two shards, an index, config.json of
 * DeepSeek-V3, hf_quant_config.json; gate and up with different weight_scale_2), opened, listed,
 * planned and run against the float64 reference; its router logits against a double sum; broken
 * checkpoints listed by tensor name; and fp4moe_checkpoint_quantize's ModelOpt dequantisation
 * formula on a BF16 file. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fp4moe.h"
#include "fp4moe_checkpoint.h"
#include "io/safetensors.h"
#include "ref/ref_moe.h"
#include "testing.h"

#define TEST_NAME "test_checkpoint"
#define E 8
#define K 2
#define H 64
#define I 32
#define T 5

static int write_text(const char *dir, const char *name, const char *text)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    if (f == NULL) return -1;
    fputs(text, f);
    return fclose(f);
}

/* Expert e of the ref layer as ModelOpt tensors, experts [0,4) in shard 1, [4,8) in shard 2.
 * skip_name (may be NULL) is left out, to make a broken checkpoint. */
static int write_checkpoint(const char *dir, const ref_layer *L, const float *router, const char *skip_name)
{
    static const char *const proj[3] = {"gate_proj", "up_proj", "down_proj"};
    st_writer *w[2] = {st_writer_create(), st_writer_create()};
    char names[E * 3 * 3][128];
    int n = 0, bad = w[0] == NULL || w[1] == NULL;
    char index[16384];
    size_t at = (size_t)snprintf(index, sizeof index, "{\"metadata\": {}, \"weight_map\": {");
    const int64_t s_router[2] = {E, H}, s_bias[1] = {E};
    bad = bad || st_writer_add(w[0], "model.layers.2.mlp.gate.weight", FP4MOE_DTYPE_F32, 2, s_router, router) ||
          st_writer_add(w[0], "model.layers.2.mlp.gate.e_score_correction_bias", FP4MOE_DTYPE_F32, 1, s_bias,
                        L->w.routing_bias);
    at += (size_t)snprintf(index + at, sizeof index - at,
                           "\"model.layers.2.mlp.gate.weight\": \"a.safetensors\", "
                           "\"model.layers.2.mlp.gate.e_score_correction_bias\": \"a.safetensors\"");
    for (int e = 0; e < E && !bad; e++) {
        st_writer *sw = w[e / 4];
        for (int p = 0; p < 3; p++) {
            const int64_t rows = p == 2 ? H : I, cols = p == 2 ? I : H;
            const int64_t s_packed[2] = {rows, cols / 2}, s_scale[2] = {rows, cols / 16};
            const uint8_t *packed = p == 2 ? L->w.w2 + (size_t)e * H * I / 2
                                           : L->w.w1 + (size_t)e * 2 * I * H / 2 + (size_t)p * I * H / 2;
            const uint8_t *scale = p == 2 ? L->w.w2_scale + (size_t)e * H * I / 16
                                          : L->w.w1_scale + (size_t)e * 2 * I * H / 16 + (size_t)p * I * H / 16;
            const float *ws2 = p == 0 ? &L->w.w1_global_scale[e]
                               : p == 1 ? &L->w.w1_global_scale_half2[e]
                                        : &L->w.w2_global_scale[e];
            const char *suffix[3] = {"weight", "weight_scale", "weight_scale_2"};
            for (int s = 0; s < 3; s++) {
                snprintf(names[n], sizeof names[n], "model.layers.2.mlp.experts.%d.%s.%s", e, proj[p], suffix[s]);
                if (skip_name != NULL && strcmp(skip_name, names[n]) == 0) continue;
                bad = bad || (s == 0   ? st_writer_add(sw, names[n], FP4MOE_DTYPE_U8, 2, s_packed, packed)
                              : s == 1 ? st_writer_add(sw, names[n], FP4MOE_DTYPE_E4M3, 2, s_scale, scale)
                                       : st_writer_add(sw, names[n], FP4MOE_DTYPE_F32, 0, NULL, ws2));
                at += (size_t)snprintf(index + at, sizeof index - at, ", \"%s\": \"%s\"", names[n],
                                       e < 4 ? "a.safetensors" : "b.safetensors");
                n++;
            }
        }
    }
    snprintf(index + at, sizeof index - at, "}}\n");
    char path[512], err[256];
    for (int s = 0; s < 2 && !bad; s++) {
        snprintf(path, sizeof path, "%s/%s", dir, s ? "b.safetensors" : "a.safetensors");
        bad = st_writer_write(w[s], path, err, sizeof err) != 0;
    }
    st_writer_destroy(w[0]);
    st_writer_destroy(w[1]);
    bad = bad || write_text(dir, "model.safetensors.index.json", index) ||
          write_text(dir, "config.json",
                     "{\"model_type\": \"deepseek_v3\", \"hidden_size\": 64, \"moe_intermediate_size\": 32,\n"
                     " \"n_routed_experts\": 8, \"num_experts_per_tok\": 2, \"n_group\": 2, \"topk_group\": 1,\n"
                     " \"routed_scaling_factor\": 2.5, \"norm_topk_prob\": true, \"scoring_func\": \"sigmoid\",\n"
                     " \"topk_method\": \"noaux_tc\", \"hidden_act\": \"silu\", \"vocab_size\": 129280}\n") ||
          write_text(dir, "hf_quant_config.json",
                     "{\"producer\": {\"name\": \"modelopt\"}, \"quantization\": {\"quant_algo\": \"NVFP4\",\n"
                     " \"group_size\": 16, \"exclude_modules\": [\"lm_head\", \"model.layers.*.mlp.gate\"]}}\n");
    return bad ? -1 : 0;
}

static void test_layer_runs(testing_state *st, testing_rng *rng, fp4moe_context *ctx, const char *dir)
{
    fp4moe_config c;
    fp4moe_config_init(&c);
    c.num_experts = E;
    c.top_k = K;
    c.hidden_size = H;
    c.intermediate_size = I;
    c.routing = FP4MOE_ROUTING_DEEPSEEK_V3;
    c.n_group = 2;
    c.topk_group = 1;
    c.routed_scaling_factor = 2.5f;
    const ref_gen_options gen = {0, 1, 1, 0}; /* routing bias, separate gate/up global scales */
    ref_layer L;
    float router[E * H], hidden[T * H], logits[T * E], out[T * H];
    double ref_out[T * H];
    if (ref_layer_generate(&L, &c, &gen, rng) != 0) {
        CHECK(st, 0, "cannot generate the layer");
        return;
    }
    ref_random_fill(rng, router, FP4MOE_DTYPE_F32, E * H, 0.2);
    ref_random_fill(rng, hidden, FP4MOE_DTYPE_F32, T * H, 1.0);
    CHECK(st, write_checkpoint(dir, &L, router, NULL) == 0, "cannot write the checkpoint in %s", dir);

    fp4moe_checkpoint *ckpt = NULL;
    fp4moe_plan *plan = NULL;
    void *workspace = NULL;
    fp4moe_status status = fp4moe_checkpoint_open(ctx, dir, &ckpt);
    CHECK(st, status == FP4MOE_SUCCESS, "open: %s", fp4moe_last_error(ctx));
    if (status != FP4MOE_SUCCESS) goto done;
    fp4moe_checkpoint_summary s;
    fp4moe_checkpoint_get_summary(ckpt, &s);
    CHECK(st, s.num_layers == 1 && s.num_problems == 0 && s.num_shards == 2, "layers %d problems %d (%s)",
          s.num_layers, s.num_problems, s.num_problems ? fp4moe_checkpoint_problem(ckpt, 0) : "");
    CHECK(st, strcmp(s.quant_algo, "NVFP4") == 0 && s.group_size == 16 && s.num_exclude_modules == 2,
          "quant config: %s %lld %d", s.quant_algo, (long long)s.group_size, s.num_exclude_modules);
    fp4moe_checkpoint_layer_info li;
    status = fp4moe_checkpoint_get_layer(ctx, ckpt, 0, &li);
    CHECK(st, status == FP4MOE_SUCCESS && li.layer == 2 && li.quantized && li.split_gate_up_scale &&
                  li.has_router && li.has_routing_bias && !li.has_input_scales,
          "layer info: %lld q%d split%d", (long long)li.layer, li.quantized, li.split_gate_up_scale);
    CHECK(st, li.config.num_experts == E && li.config.top_k == K && li.config.hidden_size == H &&
                  li.config.intermediate_size == I && li.config.routing == FP4MOE_ROUTING_DEEPSEEK_V3 &&
                  li.config.n_group == 2 && li.config.topk_group == 1 &&
                  li.config.routed_scaling_factor == 2.5f && li.config.activation == FP4MOE_ACT_SWIGLU,
          "derived config");
    int32_t index = -1;
    CHECK(st, fp4moe_checkpoint_find_layer(ctx, ckpt, 3, &index) == FP4MOE_ERROR_INVALID_ARGUMENT &&
                  strstr(fp4moe_last_error(ctx), "MoE layers: 2") != NULL,
          "find_layer 3: %s", fp4moe_last_error(ctx));

    status = fp4moe_checkpoint_router_logits(ctx, ckpt, 2, T, hidden, FP4MOE_DTYPE_F32, logits);
    CHECK(st, status == FP4MOE_SUCCESS, "router logits: %s", fp4moe_last_error(ctx));
    double worst = 0;
    for (int t = 0; t < T; t++)
        for (int e = 0; e < E; e++) {
            double sum = 0;
            for (int h = 0; h < H; h++) sum += (double)hidden[t * H + h] * router[e * H + h];
            worst = fmax(worst, fabs(sum - logits[t * E + e]) / (fabs(sum) + 1e-30));
        }
    CHECK(st, worst < 1e-6, "router logits off by %g", worst);

    fp4moe_checkpoint_plan_options po;
    fp4moe_checkpoint_plan_options_init(&po);
    po.max_tokens = T;
    status = fp4moe_checkpoint_plan_create(ctx, ckpt, 2, &po, &plan);
    CHECK(st, status == FP4MOE_SUCCESS, "plan: %s", fp4moe_last_error(ctx));
    po.precision = FP4MOE_PRECISION_W4A4;
    fp4moe_plan *w4a4 = NULL;
    CHECK(st, fp4moe_checkpoint_plan_create(ctx, ckpt, 2, &po, &w4a4) == FP4MOE_ERROR_INVALID_ARGUMENT &&
                  w4a4 == NULL && strstr(fp4moe_last_error(ctx), "input_scale") != NULL,
          "W4A4 without input scales: %s", fp4moe_last_error(ctx));
    if (status != FP4MOE_SUCCESS) goto done;
    size_t ws_bytes = 0;
    fp4moe_plan_workspace_size(plan, T, &ws_bytes);
    workspace = aligned_alloc(256, (ws_bytes + 255) / 256 * 256 + 256);
    fp4moe_forward_args a;
    fp4moe_forward_args_init(&a);
    a.num_tokens = T;
    a.hidden_states = hidden;
    a.router_logits = logits;
    a.output = out;
    status = workspace ? fp4moe_forward(plan, &a, workspace, ws_bytes, NULL) : FP4MOE_ERROR_OUT_OF_MEMORY;
    CHECK(st, status == FP4MOE_SUCCESS, "forward: %s", fp4moe_last_error(ctx));
    ref_args ra = {.num_tokens = T, .hidden_states = hidden, .hidden_dtype = FP4MOE_DTYPE_F32,
                   .router_logits = logits, .router_logits_dtype = FP4MOE_DTYPE_F32, .finalize = 1,
                   .output_dtype = FP4MOE_DTYPE_F32};
    if (status == FP4MOE_SUCCESS && ref_forward(&L, &ra, ref_out, NULL, NULL, NULL) == 0) {
        double num = 0, den = 0;
        for (int i = 0; i < T * H; i++) {
            num += (out[i] - ref_out[i]) * (out[i] - ref_out[i]);
            den += ref_out[i] * ref_out[i];
        }
        CHECK(st, sqrt(num / den) < 1e-5, "checkpoint layer vs reference: relative L2 %g", sqrt(num / den));
    }
done:
    free(workspace);
    fp4moe_plan_destroy(plan);
    fp4moe_checkpoint_close(ckpt);

    /* The same checkpoint missing a scale: listed by name, refused by plan creation. */
    write_checkpoint(dir, &L, router, "model.layers.2.mlp.experts.5.up_proj.weight_scale_2");
    ckpt = NULL;
    status = fp4moe_checkpoint_open(ctx, dir, &ckpt);
    CHECK(st, status == FP4MOE_SUCCESS, "open broken: %s", fp4moe_last_error(ctx));
    if (ckpt != NULL) {
        const char *p = fp4moe_checkpoint_problem(ckpt, 0);
        CHECK(st, p != NULL && strstr(p, "experts.5.up_proj.weight_scale_2' is missing") != NULL,
              "problem: %s", p ? p : "(none)");
        CHECK(st, fp4moe_checkpoint_problem(ckpt, 1) == NULL, "one problem only: %s",
              fp4moe_checkpoint_problem(ckpt, 1));
        plan = NULL;
        CHECK(st, fp4moe_checkpoint_plan_create(ctx, ckpt, 2, NULL, &plan) == FP4MOE_ERROR_CORRUPT_DATA &&
                      plan == NULL, "plan of a broken layer: %s", fp4moe_last_error(ctx));
        fp4moe_checkpoint_close(ckpt);
    }
    write_text(dir, "config.json", "{\"num_experts_per_tok\": \"2\"}");
    ckpt = NULL;
    CHECK(st, fp4moe_checkpoint_open(ctx, dir, &ckpt) == FP4MOE_ERROR_CORRUPT_DATA && ckpt == NULL &&
                  strstr(fp4moe_last_error(ctx), "config.json: \"num_experts_per_tok\" must be an integer"),
          "bad config.json: %s", fp4moe_last_error(ctx));
    ref_layer_free(&L);
}

static void test_quantize(testing_state *st, testing_rng *rng, fp4moe_context *ctx, const char *dir)
{
    enum { R = 32, C = 64 };
    static uint16_t bf16[3][R * C];
    float values[R * C];
    st_writer *w = st_writer_create();
    char in_path[512], out_path[512], err[256], name[128];
    /* A lone file is read with its folder's configs: drop the broken ones of the test before. */
    snprintf(in_path, sizeof in_path, "%s/config.json", dir);
    unlink(in_path);
    snprintf(in_path, sizeof in_path, "%s/bf16.safetensors", dir);
    snprintf(out_path, sizeof out_path, "%s/nvfp4.safetensors", dir);
    static const char *const proj[3] = {"gate_proj", "up_proj", "down_proj"};
    int bad = w == NULL;
    for (int p = 0; p < 3 && !bad; p++) {
        ref_random_fill(rng, bf16[p], FP4MOE_DTYPE_BF16, R * C, 0.1);
        const int64_t shape[2] = {p == 2 ? C : R, p == 2 ? R : C};
        snprintf(name, sizeof name, "model.layers.0.mlp.experts.0.%s.weight", proj[p]);
        bad = st_writer_add(w, name, FP4MOE_DTYPE_BF16, 2, shape, bf16[p]);
    }
    bad = bad || st_writer_write(w, in_path, err, sizeof err);
    st_writer_destroy(w);
    CHECK(st, !bad, "cannot write %s", in_path);
    fp4moe_quantize_options o;
    fp4moe_quantize_options_init(&o);
    o.input_scale = 0.125f;
    fp4moe_status status = fp4moe_checkpoint_quantize(ctx, in_path, out_path, &o);
    CHECK(st, status == FP4MOE_SUCCESS, "quantize: %s", fp4moe_last_error(ctx));
    CHECK(st, fp4moe_checkpoint_quantize(ctx, in_path, in_path, &o) == FP4MOE_ERROR_INVALID_ARGUMENT &&
                  strstr(fp4moe_last_error(ctx), "overwrite"), "in place: %s", fp4moe_last_error(ctx));
    st_file *f = NULL;
    if (status != FP4MOE_SUCCESS || st_open(out_path, &f, err, sizeof err) != 0) return;
    for (int p = 0; p < 3; p++) {
        const int64_t rows = p == 2 ? C : R, cols = p == 2 ? R : C;
        const st_tensor *t[4];
        static const char *const suffix[4] = {"weight", "weight_scale", "weight_scale_2", "input_scale"};
        for (int s = 0; s < 4; s++) {
            snprintf(name, sizeof name, "model.layers.0.mlp.experts.0.%s.%s", proj[p], suffix[s]);
            t[s] = st_find(f, name);
        }
        if (!t[0] || !t[1] || !t[2] || !t[3] || t[0]->bytes != (size_t)(rows * cols / 2) ||
            t[1]->bytes != (size_t)(rows * cols / 16) || t[2]->bytes != 4 || t[3]->bytes != 4) {
            CHECK(st, 0, "%s: ModelOpt tensors missing or wrong", proj[p]);
            continue;
        }
        float ws2, in_scale;
        memcpy(&ws2, t[2]->data, 4);
        memcpy(&in_scale, t[3]->data, 4);
        uint8_t *packed = malloc(t[0]->bytes), *scales = malloc(t[1]->bytes);
        if (packed && scales) {
            memcpy(packed, t[0]->data, t[0]->bytes);
            memcpy(scales, t[1]->data, t[1]->bytes);
            fp4moe_nvfp4_dequantize(ctx, packed, scales, FP4MOE_SCALE_LINEAR, rows, cols, ws2, values);
            double amax = 0, num = 0, den = 0;
            for (int i = 0; i < R * C; i++) {
                double x = fp4moe_bf16_to_float(bf16[p][i]);
                amax = fmax(amax, fabs(x));
                num += (values[i] - x) * (values[i] - x);
                den += x * x;
            }
            CHECK(st, ws2 == (float)amax / (6.0f * 448.0f), "%s: weight_scale_2 %g, amax %g", proj[p],
                  (double)ws2, amax);
            CHECK(st, sqrt(num / den) < 0.15, "%s: dequantisation error %g", proj[p], sqrt(num / den));
            CHECK(st, in_scale == 0.125f, "%s: input_scale %g", proj[p], (double)in_scale);
        }
        free(packed);
        free(scales);
    }
    st_close(f);
}

int main(void)
{
    testing_state st = {0, 0};
    testing_rng rng = testing_rng_from_env(TEST_NAME);
    char dir[] = "/tmp/fp4moe_test_checkpoint_XXXXXX";
    fp4moe_context_options options;
    fp4moe_context_options_init(&options);
    options.backend = FP4MOE_BACKEND_CPU;
    fp4moe_context *ctx = NULL;
    if (mkdtemp(dir) == NULL || fp4moe_context_create(&options, &ctx) != FP4MOE_SUCCESS) {
        fprintf(stderr, "%s: cannot set up\n", TEST_NAME);
        return 1;
    }
    test_layer_runs(&st, &rng, ctx, dir);
    test_quantize(&st, &rng, ctx, dir);
    fp4moe_context_destroy(ctx);
    static const char *const files[] = {"a.safetensors", "b.safetensors", "model.safetensors.index.json",
                                        "config.json", "hf_quant_config.json", "bf16.safetensors",
                                        "nvfp4.safetensors"};
    char path[512];
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        unlink(path);
    }
    rmdir(dir);
    return testing_finish(&st, TEST_NAME);
}
