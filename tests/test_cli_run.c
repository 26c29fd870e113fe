/* The CLI end to end: a random layer and its inputs written with the safetensors writer plus a
 * hand-written layer.json, `fp4moe run ... --backend cpu` run in a temporary directory, and its
 * output, topk_ids and topk_weights read back and compared with the float64 reference, for every
 * routing method, every activation, W4A16, W4A4 and FP8 down input. With W4A16 and F32
 * activations the bound is 1e-5 relative L2; where the contract rounds a value that comes out
 * of an FP32 sum (FP8 / W4A4 FC2 input) the bound grows with the reference's near ties, as in
 * test_layer.c (see there). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "fp4moe.h"
#include "io/safetensors.h"
#include "ref/ref_moe.h"
#include "testing.h"

#define TEST_NAME "test_cli_run"

static const char *const routing_names[] = {"softmax_topk", "renormalize", "deepseek_v3", "llama4",
                                             "renormalize_naive", "topk", "sigmoid_renorm",
                                             "minimax2", "sigmoid", "topk_sigmoid"};
static const char *const activation_names[] = {"swiglu", "geglu", "geglu_tanh", "relu2",
                                               "silu", "gelu", "identity"};

typedef struct cli_case {
    fp4moe_routing routing;
    fp4moe_activation act;
    fp4moe_precision precision;
    int fp8;
    int routed; /* topk_ids + topk_weights instead of router_logits */
} cli_case;

static int takes_bias(fp4moe_routing r)
{
    return r == FP4MOE_ROUTING_SOFTMAX_TOPK || r == FP4MOE_ROUTING_RENORMALIZE ||
           r == FP4MOE_ROUTING_RENORMALIZE_NAIVE || r == FP4MOE_ROUTING_DEEPSEEK_V3 ||
           r == FP4MOE_ROUTING_MINIMAX2;
}

static int write_config(const char *path, const fp4moe_config *c)
{
    char limit[32] = "null"; /* +inf has no JSON spelling: null means none */
    if (isfinite(c->swiglu_limit)) snprintf(limit, sizeof limit, "%.9g", (double)c->swiglu_limit);
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    fprintf(f,
            "{\n  \"num_experts\": %lld, \"top_k\": %d, \"hidden_size\": %lld, \"intermediate_size\": %lld,\n"
            "  \"activation\": \"%s\", \"routing\": \"%s\", \"precision\": \"%s\",\n"
            "  \"gate_up_order\": \"%s\", \"n_group\": %d, \"topk_group\": %d,\n"
            "  \"norm_topk_prob\": %s, \"routed_scaling_factor\": %.9g, \"fc2_input_fp8\": %s,\n"
            "  \"swiglu_alpha\": %.9g, \"swiglu_beta\": %.9g, \"swiglu_limit\": %s, \"max_tokens\": 64\n}\n",
            (long long)c->num_experts, c->top_k, (long long)c->hidden_size,
            (long long)c->intermediate_size, activation_names[c->activation], routing_names[c->routing],
            c->precision == FP4MOE_PRECISION_W4A4 ? "w4a4" : "w4a16",
            c->gate_up_order == FP4MOE_UP_GATE ? "up_gate" : "gate_up", c->n_group, c->topk_group,
            c->norm_topk_prob ? "true" : "false", (double)c->routed_scaling_factor,
            c->fc2_input_fp8 ? "true" : "false", (double)c->swiglu_alpha, (double)c->swiglu_beta,
            limit);
    return fclose(f) == 0 ? 0 : -1;
}

/* Copies a named F32/I32 tensor of n elements out of the (possibly unaligned) mapping. */
static int read_tensor(const st_file *f, const char *name, fp4moe_dtype dtype, int64_t n, void *dst)
{
    const st_tensor *t = st_find(f, name);
    if (!t || !t->dtype_known || t->dtype != dtype || t->bytes != (size_t)n * 4) return -1;
    memcpy(dst, t->data, t->bytes);
    return 0;
}

static void run_cli_case(testing_state *st, testing_rng *rng, const char *dir, const cli_case *cc)
{
    char what[160];
    snprintf(what, sizeof what, "%s/%s/%s%s", cc->routed ? "pre-routed" : routing_names[cc->routing],
             activation_names[cc->act], cc->precision == FP4MOE_PRECISION_W4A4 ? "w4a4" : "w4a16",
             cc->fp8 ? "+fp8" : "");
    fp4moe_config c;
    fp4moe_config_init(&c);
    c.num_experts = 8;
    c.top_k = cc->routing == FP4MOE_ROUTING_LLAMA4 ? 1 : 3;
    c.hidden_size = 48;
    c.intermediate_size = 32;
    c.activation = cc->act;
    c.routing = cc->routing;
    c.precision = cc->precision;
    c.fc2_input_fp8 = cc->fp8;
    c.gate_up_order = testing_uniform(rng) < 0.5 ? FP4MOE_GATE_UP : FP4MOE_UP_GATE;
    if (cc->routing == FP4MOE_ROUTING_DEEPSEEK_V3) {
        c.n_group = 4;
        c.topk_group = 2;
        c.routed_scaling_factor = 2.5f;
    }
    if (cc->routing == FP4MOE_ROUTING_MINIMAX2) c.routed_scaling_factor = 1.5f;
    if (cc->act == FP4MOE_ACT_SWIGLU && cc->routing == FP4MOE_ROUTING_RENORMALIZE) {
        c.swiglu_alpha = 1.702f;
        c.swiglu_beta = 1.0f;
        c.swiglu_limit = 7.0f;
    }
    const ref_gen_options gen = {1, takes_bias(cc->routing), 0, 0};
    ref_layer L;
    if (ref_layer_generate(&L, &c, &gen, rng) != 0) {
        CHECK(st, 0, "%s: cannot generate the layer", what);
        return;
    }
    const int64_t T = 5, E = c.num_experts, H = c.hidden_size, I = c.intermediate_size, k = c.top_k;
    const int64_t N1 = ref_fc1_rows(&c);
    float *hidden = malloc((size_t)(T * H) * 4), *logits = malloc((size_t)(T * E) * 4);
    float *pts = malloc((size_t)T * 4), *out = malloc((size_t)(T * H) * 4), *w_out = malloc((size_t)(T * k) * 4);
    int32_t *ids_out = malloc((size_t)(T * k) * 4), *ref_ids = malloc((size_t)(T * k) * 4);
    double *ref_out = malloc((size_t)(T * H) * 8), *ref_w = malloc((size_t)(T * k) * 8);
    st_writer *wr = st_writer_create();
    char cfg_path[512], in_path[512], out_path[512], cmd[2048], err[256];
    snprintf(cfg_path, sizeof cfg_path, "%s/layer.json", dir);
    snprintf(in_path, sizeof in_path, "%s/in.safetensors", dir);
    snprintf(out_path, sizeof out_path, "%s/out.safetensors", dir);
    if (!hidden || !logits || !pts || !out || !w_out || !ids_out || !ref_ids || !ref_out || !ref_w || !wr) {
        CHECK(st, 0, "%s: out of memory", what);
        goto done;
    }
    ref_random_fill(rng, hidden, FP4MOE_DTYPE_F32, T * H, 1.0);
    ref_random_fill(rng, logits, FP4MOE_DTYPE_F32, T * E, 2.0);
    for (int64_t t = 0; t < T; t++) pts[t] = (float)(0.5 + testing_uniform(rng));
    int32_t given_ids[5 * 3];
    float given_w[5 * 3];
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < k; j++) {
            given_ids[t * k + j] = (int32_t)((t + 3 * j) % E); /* distinct within a token */
            given_w[t * k + j] = (float)(0.1 + 0.9 * testing_uniform(rng));
        }

    const int64_t s_th[] = {T, H}, s_te[] = {T, E}, s_tk[] = {T, k}, s_t[] = {T}, s_e[] = {E}, s_el[] = {E};
    const int64_t s_w1[] = {E, N1, H / 2}, s_w1s[] = {E, N1, H / 16}, s_w2[] = {E, H, I / 2};
    const int64_t s_w2s[] = {E, H, I / 16}, s_b1[] = {E, N1}, s_b2[] = {E, H};
    int bad = st_writer_add(wr, "hidden_states", FP4MOE_DTYPE_F32, 2, s_th, hidden) ||
              (cc->routed ? st_writer_add(wr, "topk_ids", FP4MOE_DTYPE_I32, 2, s_tk, given_ids) ||
                                st_writer_add(wr, "topk_weights", FP4MOE_DTYPE_F32, 2, s_tk, given_w)
                          : st_writer_add(wr, "router_logits", FP4MOE_DTYPE_F32, 2, s_te, logits)) ||
              st_writer_add(wr, "per_token_scale", FP4MOE_DTYPE_F32, 1, s_t, pts) ||
              st_writer_add(wr, "w1", FP4MOE_DTYPE_U8, 3, s_w1, L.w.w1) ||
              st_writer_add(wr, "w1_scale", FP4MOE_DTYPE_E4M3, 3, s_w1s, L.w.w1_scale) ||
              st_writer_add(wr, "w1_global_scale", FP4MOE_DTYPE_F32, 1, s_el, L.w.w1_global_scale) ||
              st_writer_add(wr, "w2", FP4MOE_DTYPE_U8, 3, s_w2, L.w.w2) ||
              st_writer_add(wr, "w2_scale", FP4MOE_DTYPE_E4M3, 3, s_w2s, L.w.w2_scale) ||
              st_writer_add(wr, "w2_global_scale", FP4MOE_DTYPE_F32, 1, s_el, L.w.w2_global_scale) ||
              st_writer_add(wr, "b1", FP4MOE_DTYPE_F32, 2, s_b1, L.w.b1) ||
              st_writer_add(wr, "b2", FP4MOE_DTYPE_F32, 2, s_b2, L.w.b2);
    if (L.w.routing_bias) bad |= st_writer_add(wr, "routing_bias", FP4MOE_DTYPE_F32, 1, s_e, L.w.routing_bias);
    if (cc->precision == FP4MOE_PRECISION_W4A4)
        bad |= st_writer_add(wr, "a1_global_scale", FP4MOE_DTYPE_F32, 1, s_el, L.w.a1_global_scale) ||
               st_writer_add(wr, "a2_global_scale", FP4MOE_DTYPE_F32, 1, s_el, L.w.a2_global_scale);
    else
        L.w.a1_global_scale = L.w.a2_global_scale = NULL;
    if (cc->fp8) bad |= st_writer_add(wr, "fc2_input_fp8_scale", FP4MOE_DTYPE_F32, 1, s_el, L.w.fc2_input_fp8_scale);
    if (bad || st_writer_write(wr, in_path, err, sizeof err) != 0 || write_config(cfg_path, &c) != 0) {
        CHECK(st, 0, "%s: cannot write the inputs (%s)", what, bad ? "st_writer_add" : err);
        goto done;
    }

    snprintf(cmd, sizeof cmd, "'%s' run --config '%s' --tensors '%s' --out '%s' --backend cpu --threads 2 > '%s/log' 2>&1",
             FP4MOE_CLI_PATH, cfg_path, in_path, out_path, dir);
    unlink(out_path);
    int rc = system(cmd);
    if (rc != 0) {
        char log_path[600], line[512];
        snprintf(log_path, sizeof log_path, "%s/log", dir);
        FILE *lf = fopen(log_path, "r");
        CHECK(st, 0, "%s: fp4moe run exited with %d", what, rc);
        while (lf && fgets(line, sizeof line, lf)) fprintf(stderr, "    | %s", line);
        if (lf) fclose(lf);
        goto done;
    }
    st_file *res = NULL;
    if (st_open(out_path, &res, err, sizeof err) != 0) {
        CHECK(st, 0, "%s: cannot read the CLI's output: %s", what, err);
        goto done;
    }
    int read_bad = read_tensor(res, "output", FP4MOE_DTYPE_F32, T * H, out) ||
                   read_tensor(res, "topk_ids", FP4MOE_DTYPE_I32, T * k, ids_out) ||
                   read_tensor(res, "topk_weights", FP4MOE_DTYPE_F32, T * k, w_out);
    st_close(res);
    CHECK(st, !read_bad, "%s: output, topk_ids or topk_weights missing or mis-shaped", what);
    if (read_bad) goto done;

    ref_args ra = {T, hidden, FP4MOE_DTYPE_F32, cc->routed ? NULL : logits, FP4MOE_DTYPE_F32,
                   cc->routed ? given_ids : NULL, cc->routed ? given_w : NULL, FP4MOE_DTYPE_F32,
                   pts, 1, FP4MOE_DTYPE_F32};
    ref_stats rs;
    if (ref_forward(&L, &ra, ref_out, ref_ids, ref_w, &rs) != 0) {
        CHECK(st, 0, "%s: reference failed", what);
        goto done;
    }
    int64_t id_bad = 0, w_bad = 0;
    for (int64_t i = 0; i < T * k; i++) {
        id_bad += ids_out[i] != ref_ids[i];
        w_bad += !(fabs(w_out[i] - ref_w[i]) <= 2e-6 * fabs(ref_w[i]) + 1e-7);
    }
    CHECK(st, id_bad == 0 && w_bad == 0, "%s: %lld ids and %lld weights differ from the reference", what,
          (long long)id_bad, (long long)w_bad);
    double num = 0, den = 0;
    for (int64_t i = 0; i < T * H; i++) {
        num += (out[i] - ref_out[i]) * (out[i] - ref_out[i]);
        den += ref_out[i] * ref_out[i];
    }
    double err_l2 = isfinite(num) ? sqrt(num / den) : INFINITY;
    double tol = 1e-5 + (rs.inner.total ? 3.0 * sqrt(rs.inner.jump_sq / (double)rs.inner.total) : 0.0);
    CHECK(st, err_l2 < tol, "%s: rel L2 %.3g >= %.3g (near ties %lld/%lld)", what, err_l2, tol,
          (long long)rs.inner.near_ties, (long long)rs.inner.total);
    if (getenv("FP4MOE_TEST_VERBOSE")) printf("  %-40s rel L2 %.3g (tol %.3g)\n", what, err_l2, tol);

done:
    st_writer_destroy(wr);
    free(hidden); free(logits); free(pts); free(out); free(w_out); free(ids_out); free(ref_ids);
    free(ref_out); free(ref_w);
    ref_layer_free(&L);
}

int main(void)
{
    testing_state st = {0, 0};
    testing_rng rng = testing_rng_from_env(TEST_NAME);
    char dir[] = "/tmp/fp4moe_cli_run_XXXXXX";
    if (!mkdtemp(dir)) {
        CHECK(&st, 0, "mkdtemp failed");
        return testing_finish(&st, TEST_NAME);
    }
    /* every routing method (W4A16 and W4A4), every activation in every precision mode */
    for (int r = 0; r <= FP4MOE_ROUTING_TOPK_SIGMOID; r++) {
        cli_case a = {(fp4moe_routing)r, FP4MOE_ACT_SWIGLU, FP4MOE_PRECISION_W4A16, 0, 0};
        run_cli_case(&st, &rng, dir, &a);
        cli_case b = {(fp4moe_routing)r, FP4MOE_ACT_RELU2, FP4MOE_PRECISION_W4A4, 0, 0};
        run_cli_case(&st, &rng, dir, &b);
    }
    for (int act = 0; act <= FP4MOE_ACT_IDENTITY; act++) {
        cli_case a = {FP4MOE_ROUTING_RENORMALIZE, (fp4moe_activation)act, FP4MOE_PRECISION_W4A16, 0, 0};
        cli_case b = {FP4MOE_ROUTING_RENORMALIZE_NAIVE, (fp4moe_activation)act, FP4MOE_PRECISION_W4A4, 0, 0};
        cli_case c = {FP4MOE_ROUTING_SIGMOID, (fp4moe_activation)act, FP4MOE_PRECISION_W4A16, 1, 0};
        run_cli_case(&st, &rng, dir, &a);
        run_cli_case(&st, &rng, dir, &b);
        run_cli_case(&st, &rng, dir, &c);
    }
    cli_case routed = {FP4MOE_ROUTING_RENORMALIZE, FP4MOE_ACT_SWIGLU, FP4MOE_PRECISION_W4A16, 0, 1};
    run_cli_case(&st, &rng, dir, &routed);
    cli_case routed4 = {FP4MOE_ROUTING_TOPK, FP4MOE_ACT_GEGLU, FP4MOE_PRECISION_W4A4, 0, 1};
    run_cli_case(&st, &rng, dir, &routed4);
    /* bench's --graph-layers: a count of 1 to 64, on the cuda backend only (usage errors: 2) */
    const char *bad_bench[] = {"--backend cpu --graph-layers 2", "--graph-layers 0", "--graph-layers 65"};
    for (size_t i = 0; i < 3; i++) {
        char cmd[600];
        snprintf(cmd, sizeof cmd, "%s bench --preset qwen3-30b-a3b --tokens 1 %s > %s/log 2>&1",
                 FP4MOE_CLI_PATH, bad_bench[i], dir);
        const int rc = system(cmd);
        CHECK(&st, rc != -1 && WIFEXITED(rc) && WEXITSTATUS(rc) == 2, "bench %s: %s %d, not exit status 2",
              bad_bench[i], rc == -1 ? "system() failed:" : WIFEXITED(rc) ? "exit status" : "wait status",
              rc == -1 ? -1 : WIFEXITED(rc) ? WEXITSTATUS(rc) : rc);
    }
    const char *files[] = {"layer.json", "in.safetensors", "out.safetensors", "log"};
    for (size_t i = 0; i < 4; i++) {
        char path[600];
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        unlink(path);
    }
    rmdir(dir);
    return testing_finish(&st, TEST_NAME);
}
