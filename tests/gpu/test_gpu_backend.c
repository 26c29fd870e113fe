/* The CUDA backend against the CPU backend and the float64 reference, on fresh random layers
 * and inputs: every routing method and activation, W4A16 / W4A4 / FP8 down input, biases,
 * per-half and per-expert SwiGLU parameters, local-expert subsets, router weight on the input,
 * finalize off, per-token scale, routed calls, in-place output, F32/F16/BF16 inputs and
 * outputs, odd shapes (H = 2688, I = 1856, K not a multiple of 32), T from 1 to 16 and beyond
 * (the multi-kernel routing path and several token chunks). Outputs are poisoned with NaN
 * before each call. A CUDA-graph capture of the call is replayed and must equal the direct call
 * bit for bit. Built only with CUDA and run on the GPU machine (scripts/gpu-check.sh). */
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ref/ref_moe.h"
#include "testing.h"

#define MAX_CASES 128

typedef struct gpu_case {
    const char *name;
    fp4moe_config cfg;
    ref_gen_options gen;
    int64_t tokens;
    fp4moe_dtype hidden_dtype, output_dtype, logits_dtype;
    int routed;          /* fp4moe_forward_routed with caller ids (BF16 weights) */
    int skip_finalize;
    int per_token_scale;
    int in_place;
    int graph;           /* also capture + replay */
    int skewed;          /* routed: expert 1 in every token's slot 0, expert 0 in none */
} gpu_case;

/* FNV-1a of the GPU output: two builds run with the same FP4MOE_TEST_SEED print the same value
 * for a case exactly when its output bits agree (each case draws its inputs from the seed and
 * its index in the list: compare cases of equal index, #NNN in the output line). */
static uint64_t bytes_hash(const void *p, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ ((const unsigned char *)p)[i]) * 1099511628211ull;
    return h;
}

static fp4moe_config base_config(int64_t e, int32_t k, int64_t h, int64_t inter)
{
    fp4moe_config c;
    fp4moe_config_init(&c);
    c.num_experts = e, c.top_k = k, c.hidden_size = h, c.intermediate_size = inter;
    c.routing = FP4MOE_ROUTING_RENORMALIZE_NAIVE;
    c.max_tokens = 512;
    /* the cases were laid out for the peers' split: T <= 16 on the decode path, the "prefill"
     * cases above it (the library's default, 128, is tested by the last cases of the list) */
    c.decode_threshold = 16;
    return c;
}

#define CUDA_OK(st, call)                                                                   \
    do {                                                                                    \
        cudaError_t err_ = (call);                                                          \
        CHECK(st, err_ == cudaSuccess, "%s: %s", #call, cudaGetErrorString(err_));           \
        if (err_ != cudaSuccess) goto done;                                                 \
    } while (0)

static float to_f32(const void *p, fp4moe_dtype d, int64_t i)
{
    if (d == FP4MOE_DTYPE_BF16) return fp4moe_bf16_to_float(((const uint16_t *)p)[i]);
    if (d == FP4MOE_DTYPE_F16) return fp4moe_f16_to_float(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}

static size_t dsize(fp4moe_dtype d) { return d == FP4MOE_DTYPE_F32 ? 4 : 2; }

/* Tolerance on the relative L2 error from the float64 reference. */
static double tolerance(const gpu_case *c)
{
    double tol = c->output_dtype == FP4MOE_DTYPE_BF16 ? 1e-2
                 : c->output_dtype == FP4MOE_DTYPE_F16 ? 3e-3 : 2e-4;
    if (c->hidden_dtype != FP4MOE_DTYPE_F32 && tol < 3e-3) tol = 3e-3;
    if (c->cfg.precision == FP4MOE_PRECISION_W4A4 || c->cfg.fc2_input_fp8) tol = 3e-2;
    return tol;
}

static void run_case(testing_state *st, fp4moe_context *cpu, fp4moe_context *gpu, const gpu_case *c,
                     int index, testing_rng *rng)
{
    ref_layer layer;
    if (ref_layer_generate(&layer, &c->cfg, &c->gen, rng) != 0) {
        CHECK(st, 0, "%s: layer generation failed", c->name);
        return;
    }
    const fp4moe_config *cfg = &c->cfg;
    const int64_t t = c->tokens, h = cfg->hidden_size, e = cfg->num_experts, k = cfg->top_k;
    const int64_t out_rows = c->skip_finalize ? t * k : t;
    const size_t x_bytes = (size_t)(t * h) * dsize(c->hidden_dtype);
    const size_t logit_bytes = (size_t)(t * e) * dsize(c->logits_dtype);
    const size_t out_bytes = (size_t)(out_rows * h) * dsize(c->output_dtype);
    void *x = malloc(x_bytes), *logits = malloc(logit_bytes), *out_cpu = malloc(out_bytes);
    void *out_gpu = malloc(out_bytes), *out_graph = malloc(out_bytes);
    int32_t *ids = malloc((size_t)(t * k) * 4), *ids_cpu = malloc((size_t)(t * k) * 4);
    int32_t *ids_gpu = malloc((size_t)(t * k) * 4);
    uint16_t *tw = malloc((size_t)(t * k) * 2);
    float *pts = malloc((size_t)t * 4), *w_gpu = malloc((size_t)(t * k) * 4);
    double *ref = malloc((size_t)(out_rows * h) * sizeof(double));
    float *got = malloc((size_t)(out_rows * h) * 4), *got_cpu = malloc((size_t)(out_rows * h) * 4);
    fp4moe_plan *pc = NULL, *pg = NULL;
    void *d_x = NULL, *d_logits = NULL, *d_out = NULL, *d_ids = NULL, *d_tw = NULL, *d_pts = NULL;
    void *d_ids_out = NULL, *d_w_out = NULL, *d_ws = NULL, *h_ws = NULL;
    cudaStream_t stream = NULL;
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    if (!x || !logits || !out_cpu || !out_gpu || !out_graph || !ids || !ids_cpu || !ids_gpu ||
        !tw || !pts || !w_gpu || !ref || !got || !got_cpu) {
        CHECK(st, 0, "%s: out of host memory", c->name);
        goto done;
    }
    ref_random_fill(rng, x, c->hidden_dtype, t * h, 1.0);
    ref_random_fill(rng, logits, c->logits_dtype, t * e, 2.0);
    for (int64_t i = 0; i < t; i++) pts[i] = (float)(0.5 + testing_uniform(rng));
    for (int64_t i = 0; i < t; i++) {
        /* distinct random ids, some outside the local range when the layer is a subset */
        for (int64_t j = 0; j < k; j++) {
            int32_t id;
            int dup;
            do {
                id = c->skewed ? (j == 0 ? 1 : (int32_t)testing_int(rng, 2, e - 1))
                               : (int32_t)testing_int(rng, 0, e - 1);
                dup = 0;
                for (int64_t q = 0; q < j; q++) dup |= ids[i * k + q] == id;
            } while (dup);
            ids[i * k + j] = id;
            tw[i * k + j] = fp4moe_float_to_bf16((float)(0.1 + testing_uniform(rng)));
        }
    }

    fp4moe_status s = fp4moe_plan_create(cpu, cfg, &layer.w, &pc);
    CHECK(st, s == FP4MOE_SUCCESS, "%s: cpu plan: %s", c->name, fp4moe_last_error(cpu));
    s = fp4moe_plan_create(gpu, cfg, &layer.w, &pg);
    CHECK(st, s == FP4MOE_SUCCESS, "%s: cuda plan: %s", c->name, fp4moe_last_error(gpu));
    if (pc == NULL || pg == NULL) goto done;

    /* the CPU backend: the library's own oracle */
    size_t ws_cpu = 0, ws_gpu = 0;
    fp4moe_plan_workspace_size(pc, t, &ws_cpu);
    fp4moe_plan_workspace_size(pg, t, &ws_gpu);
    h_ws = aligned_alloc(256, (ws_cpu + 255) / 256 * 256 + 256);
    if (h_ws == NULL) goto done;
    fp4moe_forward_args a;
    fp4moe_forward_args_init(&a);
    a.num_tokens = t;
    a.hidden_states = x;
    a.hidden_dtype = c->hidden_dtype;
    a.router_logits = logits;
    a.router_logits_dtype = c->logits_dtype;
    a.topk_ids = ids;
    a.topk_weights = tw;
    a.topk_weights_dtype = FP4MOE_DTYPE_BF16;
    a.per_token_scale = c->per_token_scale ? pts : NULL;
    a.output = out_cpu;
    a.output_dtype = c->output_dtype;
    a.skip_finalize = c->skip_finalize;
    if (!c->routed) a.topk_ids_out = ids_cpu;
    s = c->routed ? fp4moe_forward_routed(pc, &a, h_ws, ws_cpu, NULL)
                  : fp4moe_forward(pc, &a, h_ws, ws_cpu, NULL);
    CHECK(st, s == FP4MOE_SUCCESS, "%s: cpu forward: %s", c->name, fp4moe_last_error(cpu));

    /* the reference */
    ref_args ra;
    memset(&ra, 0, sizeof ra);
    ra.num_tokens = t;
    ra.hidden_states = x;
    ra.hidden_dtype = c->hidden_dtype;
    if (c->routed) {
        ra.topk_ids = ids;
        ra.topk_weights = tw;
        ra.topk_weights_dtype = FP4MOE_DTYPE_BF16;
    } else {
        ra.router_logits = logits;
        ra.router_logits_dtype = c->logits_dtype;
    }
    ra.per_token_scale = c->per_token_scale ? pts : NULL;
    ra.finalize = !c->skip_finalize;
    ra.output_dtype = c->output_dtype;
    ref_stats stats;
    memset(&stats, 0, sizeof stats);
    if (ref_forward(&layer, &ra, ref, NULL, NULL, &stats) != 0) {
        CHECK(st, 0, "%s: reference failed", c->name);
        goto done;
    }

    /* the GPU: device buffers, NaN-poisoned output */
    CUDA_OK(st, cudaStreamCreate(&stream));
    if (fp4moe_buffer_alloc(gpu, x_bytes > out_bytes ? x_bytes : out_bytes, &d_x) ||
        fp4moe_buffer_alloc(gpu, logit_bytes, &d_logits) ||
        fp4moe_buffer_alloc(gpu, out_bytes, &d_out) ||
        fp4moe_buffer_alloc(gpu, (size_t)(t * k) * 4, &d_ids) ||
        fp4moe_buffer_alloc(gpu, (size_t)(t * k) * 2, &d_tw) ||
        fp4moe_buffer_alloc(gpu, (size_t)t * 4, &d_pts) ||
        fp4moe_buffer_alloc(gpu, (size_t)(t * k) * 4, &d_ids_out) ||
        fp4moe_buffer_alloc(gpu, (size_t)(t * k) * 4, &d_w_out) ||
        fp4moe_buffer_alloc(gpu, ws_gpu, &d_ws)) {
        CHECK(st, 0, "%s: device buffers: %s", c->name, fp4moe_last_error(gpu));
        goto done;
    }
    fp4moe_buffer_upload(gpu, d_x, x, x_bytes);
    fp4moe_buffer_upload(gpu, d_logits, logits, logit_bytes);
    fp4moe_buffer_upload(gpu, d_ids, ids, (size_t)(t * k) * 4);
    fp4moe_buffer_upload(gpu, d_tw, tw, (size_t)(t * k) * 2);
    fp4moe_buffer_upload(gpu, d_pts, pts, (size_t)t * 4);
    void *dst = c->in_place ? d_x : d_out;
    CUDA_OK(st, cudaMemset(dst, 0xff, out_bytes)); /* NaN in every dtype */
    if (c->in_place) fp4moe_buffer_upload(gpu, d_x, x, x_bytes);
    a.hidden_states = d_x;
    a.router_logits = d_logits;
    a.topk_ids = d_ids;
    a.topk_weights = d_tw;
    a.per_token_scale = c->per_token_scale ? d_pts : NULL;
    a.output = dst;
    a.topk_ids_out = c->routed ? NULL : d_ids_out;
    a.topk_weights_out = c->routed ? NULL : d_w_out;
    s = c->routed ? fp4moe_forward_routed(pg, &a, d_ws, ws_gpu, stream)
                  : fp4moe_forward(pg, &a, d_ws, ws_gpu, stream);
    CHECK(st, s == FP4MOE_SUCCESS, "%s: cuda forward: %s", c->name, fp4moe_last_error(gpu));
    CUDA_OK(st, cudaStreamSynchronize(stream));
    fp4moe_buffer_download(gpu, out_gpu, dst, out_bytes);

    for (int64_t i = 0; i < out_rows * h; i++) {
        got[i] = to_f32(out_gpu, c->output_dtype, i);
        got_cpu[i] = to_f32(out_cpu, c->output_dtype, i);
    }
    int64_t nans = 0;
    for (int64_t i = 0; i < out_rows * h; i++) nans += isnan(got[i]);
    const double err_ref = testing_rel_l2_f32_f64(got, ref, out_rows * h);
    const double err_cpu = testing_rel_l2_f32(got, got_cpu, out_rows * h);
    const double tol = tolerance(c);
    printf("  #%03d %-34s T=%-4lld err_ref %.2e err_cpu %.2e (tol %.0e, near ties %lld) out %016llx\n", index,
           c->name, (long long)t, err_ref, err_cpu, tol, (long long)(stats.inner.near_ties),
           (unsigned long long)bytes_hash(out_gpu, out_bytes));
    if (getenv("FP4MOE_GPU_DEBUG") && err_ref > tol)
        for (int64_t i = 0; i < 8 && i < out_rows * h; i++)
            printf("    out[%lld]: gpu %.6g cpu %.6g ref %.6g\n", (long long)i, got[i], got_cpu[i], ref[i]);
    CHECK(st, nans == 0, "%s: %lld NaN outputs (unwritten?)", c->name, (long long)nans);
    CHECK(st, err_ref <= tol, "%s: GPU vs float64 reference %.3e > %.1e", c->name, err_ref, tol);
    CHECK(st, err_cpu <= tol, "%s: GPU vs CPU backend %.3e > %.1e", c->name, err_cpu, tol);
    if (!c->routed) {
        fp4moe_buffer_download(gpu, ids_gpu, d_ids_out, (size_t)(t * k) * 4);
        fp4moe_buffer_download(gpu, w_gpu, d_w_out, (size_t)(t * k) * 4);
        int64_t differ = 0;
        for (int64_t i = 0; i < t * k; i++) differ += ids_gpu[i] != ids_cpu[i];
        CHECK(st, differ == 0, "%s: %lld routing replay ids differ from the CPU", c->name,
              (long long)differ);
        /* fp4moe_route on the GPU gives the same ids */
        CUDA_OK(st, cudaMemset(d_ids_out, 0xff, (size_t)(t * k) * 4));
        s = fp4moe_route(pg, t, d_logits, c->logits_dtype, (int32_t *)d_ids_out, (float *)d_w_out,
                         d_ws, ws_gpu, stream);
        CHECK(st, s == FP4MOE_SUCCESS, "%s: cuda route: %s", c->name, fp4moe_last_error(gpu));
        CUDA_OK(st, cudaStreamSynchronize(stream));
        fp4moe_buffer_download(gpu, ids_gpu, d_ids_out, (size_t)(t * k) * 4);
        differ = 0;
        for (int64_t i = 0; i < t * k; i++) differ += ids_gpu[i] != ids_cpu[i];
        CHECK(st, differ == 0, "%s: fp4moe_route ids differ from the CPU in %lld places", c->name,
              (long long)differ);
    }

    if (c->graph && !c->in_place) {
        CUDA_OK(st, cudaMemset(dst, 0xff, out_bytes));
        CUDA_OK(st, cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
        s = c->routed ? fp4moe_forward_routed(pg, &a, d_ws, ws_gpu, stream)
                      : fp4moe_forward(pg, &a, d_ws, ws_gpu, stream);
        cudaError_t cap = cudaStreamEndCapture(stream, &graph);
        CHECK(st, s == FP4MOE_SUCCESS && cap == cudaSuccess, "%s: capture: %s / %s", c->name,
              fp4moe_last_error(gpu), cudaGetErrorString(cap));
        if (cap != cudaSuccess) goto done;
        CUDA_OK(st, cudaGraphInstantiate(&exec, graph, 0));
        /* Repeatability: every replay (FP4MOE_GPU_REPEAT of them, default 3) must give the
         * direct call's bits; the output is poisoned between replays. */
        const char *rep_env = getenv("FP4MOE_GPU_REPEAT");
        const int repeats = rep_env ? atoi(rep_env) : 3;
        int differing = 0;
        for (int rep = 0; rep < repeats; rep++) {
            CUDA_OK(st, cudaMemsetAsync(dst, 0xff, out_bytes, stream));
            CUDA_OK(st, cudaGraphLaunch(exec, stream));
            CUDA_OK(st, cudaStreamSynchronize(stream));
            fp4moe_buffer_download(gpu, out_graph, dst, out_bytes);
            differing += memcmp(out_graph, out_gpu, out_bytes) != 0;
        }
        CHECK(st, differing == 0, "%s: %d of %d graph replays differ from the direct call",
              c->name, differing, repeats);
    }
done:
    if (exec) cudaGraphExecDestroy(exec);
    if (graph) cudaGraphDestroy(graph);
    if (stream) cudaStreamDestroy(stream);
    fp4moe_buffer_free(gpu, d_x);
    fp4moe_buffer_free(gpu, d_logits);
    fp4moe_buffer_free(gpu, d_out);
    fp4moe_buffer_free(gpu, d_ids);
    fp4moe_buffer_free(gpu, d_tw);
    fp4moe_buffer_free(gpu, d_pts);
    fp4moe_buffer_free(gpu, d_ids_out);
    fp4moe_buffer_free(gpu, d_w_out);
    fp4moe_buffer_free(gpu, d_ws);
    free(h_ws);
    fp4moe_plan_destroy(pc);
    fp4moe_plan_destroy(pg);
    free(x), free(logits), free(out_cpu), free(out_gpu), free(out_graph), free(ids);
    free(ids_cpu), free(ids_gpu), free(tw), free(pts), free(w_gpu), free(ref), free(got);
    free(got_cpu);
    ref_layer_free(&layer);
}

static gpu_case make(const char *name, fp4moe_config cfg, int64_t tokens)
{
    gpu_case c;
    memset(&c, 0, sizeof c);
    c.name = name;
    c.cfg = cfg;
    c.tokens = tokens;
    c.hidden_dtype = c.output_dtype = c.logits_dtype = FP4MOE_DTYPE_F32;
    c.graph = 1;
    return c;
}

/* A case whose layer has a routing bias (the methods that take one). */
static gpu_case make_biased(const char *name, fp4moe_config cfg, int64_t tokens)
{
    gpu_case c = make(name, cfg, tokens);
    c.gen.routing_bias = 1;
    return c;
}

/* Appends a case to the list (MAX_CASES long); returns the new count. A list grown past its
 * bound stops the program with a message instead of writing past the array. */
static int add_case(gpu_case *cases, int n, gpu_case c)
{
    if (n >= MAX_CASES) {
        fprintf(stderr, "test_gpu_backend: more than MAX_CASES (%d) cases: raise it\n", MAX_CASES);
        exit(1);
    }
    cases[n] = c;
    return n + 1;
}

/* One case per activation (gate/up order alternating), with biases, per-half global scales and
 * per-expert SwiGLU parameters, at the given T; returns the new case count. */
static int add_activation_cases(gpu_case *cases, int n, const char *name, int64_t tokens)
{
    static const fp4moe_activation acts[] = {FP4MOE_ACT_SWIGLU, FP4MOE_ACT_GEGLU, FP4MOE_ACT_GEGLU_TANH,
                                             FP4MOE_ACT_RELU2, FP4MOE_ACT_SILU, FP4MOE_ACT_GELU,
                                             FP4MOE_ACT_IDENTITY};
    for (int i = 0; i < 7; i++) {
        fp4moe_config c = base_config(32, 4, 256, 192);
        c.activation = acts[i];
        c.gate_up_order = i % 2 ? FP4MOE_UP_GATE : FP4MOE_GATE_UP;
        gpu_case g = make(name, c, tokens);
        g.gen.biases = 1, g.gen.half2_scale = 1, g.gen.per_expert_swiglu = 1;
        n = add_case(cases, n, g);
    }
    return n;
}

/* Every case, in list order (an index names a case and seeds its inputs); returns the count. */
static int build_cases(gpu_case *cases)
{
    int n = 0;
    /* decode sizes on a small qwen-like layer */
    static const int64_t decode_t[] = {1, 2, 3, 4, 5, 8, 11, 16};
    for (int i = 0; i < 8; i++)
        n = add_case(cases, n, make("qwen-like swiglu renorm_naive", base_config(64, 8, 512, 256), decode_t[i]));
    /* every routing method */
    static const struct { fp4moe_routing r; const char *name; } methods[] = {
        {FP4MOE_ROUTING_SOFTMAX_TOPK, "softmax_topk + bias"}, {FP4MOE_ROUTING_RENORMALIZE, "renormalize + bias"},
        {FP4MOE_ROUTING_DEEPSEEK_V3, "deepseek_v3 groups 8/4"}, {FP4MOE_ROUTING_LLAMA4, "llama4 (on input)"},
        {FP4MOE_ROUTING_TOPK, "topk"}, {FP4MOE_ROUTING_SIGMOID_RENORM, "sigmoid_renorm"},
        {FP4MOE_ROUTING_MINIMAX2, "minimax2 + bias"}, {FP4MOE_ROUTING_SIGMOID, "sigmoid"},
        {FP4MOE_ROUTING_TOPK_SIGMOID, "topk_sigmoid"}};
    for (int i = 0; i < 9; i++) {
        fp4moe_config c = base_config(64, 6, 256, 128);
        c.routing = methods[i].r;
        if (c.routing == FP4MOE_ROUTING_LLAMA4) c.top_k = 1;
        if (c.routing == FP4MOE_ROUTING_DEEPSEEK_V3) c.n_group = 8, c.topk_group = 4, c.routed_scaling_factor = 2.5f;
        if (c.routing == FP4MOE_ROUTING_MINIMAX2) c.routed_scaling_factor = 1.5f;
        gpu_case g = make(methods[i].name, c, 9);
        g.gen.routing_bias = c.routing == FP4MOE_ROUTING_SOFTMAX_TOPK || c.routing == FP4MOE_ROUTING_RENORMALIZE ||
                             c.routing == FP4MOE_ROUTING_DEEPSEEK_V3 || c.routing == FP4MOE_ROUTING_MINIMAX2;
        n = add_case(cases, n, g);
    }
    /* the real models' expert counts, where the routing warp holds 8 or 16 keys per lane, and
     * one above 512, where it scans shared memory (cuda_front.cu's warp_select) */
    {
        fp4moe_config c = base_config(256, 8, 256, 128);
        c.routing = FP4MOE_ROUTING_DEEPSEEK_V3;
        c.n_group = 8, c.topk_group = 4, c.routed_scaling_factor = 2.5f;
        n = add_case(cases, n, make_biased("256 experts, deepseek_v3 groups 8/4", c, 5));
        c = base_config(512, 22, 256, 128);
        c.routing = FP4MOE_ROUTING_DEEPSEEK_V3;
        c.routed_scaling_factor = 2.5f;
        n = add_case(cases, n, make_biased("512 experts, top 22, sigmoid + bias", c, 3));
        n = add_case(cases, n, make("640 experts (routing by scan)", base_config(640, 8, 256, 128), 4));
    }
    /* every activation, with biases and per-half scales */
    n = add_activation_cases(cases, n, "activation (+b1/b2, half2, per-expert)", 6);
    /* nemotron-nano shape: H = 2688, I = 1856, relu2, deepseek n_group 1 with bias */
    {
        fp4moe_config c = base_config(8, 6, 2688, 1856);
        c.activation = FP4MOE_ACT_RELU2;
        c.routing = FP4MOE_ROUTING_DEEPSEEK_V3;
        c.routed_scaling_factor = 2.5f;
        for (int i = 0; i < 3; i++) {
            n = add_case(cases, n, make_biased("nemotron shape 2688x1856", c, i == 0 ? 1 : i == 1 ? 7 : 16));
        }
    }
    /* K not a multiple of 32 (padding) */
    n = add_case(cases, n, make("H=272 I=80 (padded K)", base_config(8, 2, 272, 80), 5));
    /* precision modes */
    {
        fp4moe_config c = base_config(32, 4, 512, 256);
        c.precision = FP4MOE_PRECISION_W4A4;
        n = add_case(cases, n, make("W4A4", c, 1));
        n = add_case(cases, n, make("W4A4", c, 13));
        c.precision = FP4MOE_PRECISION_W4A16;
        c.fc2_input_fp8 = 1;
        n = add_case(cases, n, make("FP8 down input", c, 10));
    }
    /* dtypes, per-token scale, finalize off, routed, in place, local subset */
    {
        fp4moe_config c = base_config(32, 4, 512, 256);
        gpu_case g = make("bf16 in/out, bf16 logits", c, 12);
        g.hidden_dtype = g.output_dtype = g.logits_dtype = FP4MOE_DTYPE_BF16;
        n = add_case(cases, n, g);
        g = make("f16 in, f32 out, f16 logits", c, 7);
        g.hidden_dtype = g.logits_dtype = FP4MOE_DTYPE_F16;
        n = add_case(cases, n, g);
        g = make("f16 in/out + per_token_scale", c, 4);
        g.hidden_dtype = g.output_dtype = FP4MOE_DTYPE_F16;
        g.per_token_scale = 1;
        n = add_case(cases, n, g);
        g = make("finalize off", c, 6);
        g.skip_finalize = 1;
        n = add_case(cases, n, g);
        g = make("routed, bf16 weights", c, 16);
        g.routed = 1;
        n = add_case(cases, n, g);
        g = make("in place bf16", c, 3);
        g.hidden_dtype = g.output_dtype = FP4MOE_DTYPE_BF16;
        g.in_place = 1;
        n = add_case(cases, n, g);
        fp4moe_config sub = c;
        sub.local_expert_offset = 8, sub.local_num_experts = 12;
        g = make("local experts 8..19 of 32", sub, 9);
        n = add_case(cases, n, g);
        g = make("local subset, routed, finalize off", sub, 5);
        g.routed = 1, g.skip_finalize = 1;
        n = add_case(cases, n, g);
        g = make("local subset + per_token_scale", sub, 2);
        g.per_token_scale = 1;
        n = add_case(cases, n, g);
    }
    /* the decode path above its fused front and over several chunks (threshold raised) */
    {
        fp4moe_config c = base_config(64, 8, 512, 256);
        c.decode_threshold = 512;
        n = add_case(cases, n, make("decode path, T > fused limit", c, 100));
        n = add_case(cases, n, make("decode path, T > one chunk", c, 300));
    }
    /* the prefill path (T > decode_threshold): both tile sizes (64 / 128 tokens), FP32 inputs
     * as FP16 hi + lo and FP16/BF16 inputs as one part, every mode, odd shapes */
    {
        fp4moe_config c = base_config(64, 8, 512, 256);
        n = add_case(cases, n, make("prefill T=17", c, 17));
        n = add_case(cases, n, make("prefill T=100", c, 100));
        c.max_tokens = 1024;
        n = add_case(cases, n, make("prefill T=1000 (128-token tiles)", c, 1000));
        gpu_case g = make("prefill bf16 T=1000", c, 1000);
        g.hidden_dtype = g.output_dtype = g.logits_dtype = FP4MOE_DTYPE_BF16;
        n = add_case(cases, n, g);
        g = make("prefill f16 in/out + per_token_scale", c, 50);
        g.hidden_dtype = g.output_dtype = FP4MOE_DTYPE_F16;
        g.per_token_scale = 1;
        n = add_case(cases, n, g);
        g = make("prefill routed: expert 1 gets all, 0 none", c, 300);
        g.routed = 1, g.skewed = 1;
        n = add_case(cases, n, g);
        g = make("prefill finalize off", c, 33);
        g.skip_finalize = 1;
        n = add_case(cases, n, g);
        fp4moe_config sub = c;
        sub.local_expert_offset = 16, sub.local_num_experts = 20;
        n = add_case(cases, n, make("prefill local experts 16..35 of 64", sub, 70));
        g = make("prefill local subset, routed, finalize off", sub, 45);
        g.routed = 1, g.skip_finalize = 1;
        n = add_case(cases, n, g);
        fp4moe_config big = base_config(32, 4, 256, 128);
        big.max_tokens = 16384;
        g = make("prefill 16384 tokens (two chunks), bf16", big, 16384);
        g.hidden_dtype = g.output_dtype = g.logits_dtype = FP4MOE_DTYPE_BF16;
        g.graph = 0;
        n = add_case(cases, n, g);
    }
    n = add_activation_cases(cases, n, "prefill activation (+b1/b2, half2)", 40);
    {
        fp4moe_config c = base_config(8, 6, 2688, 1856);
        c.activation = FP4MOE_ACT_RELU2;
        c.routing = FP4MOE_ROUTING_DEEPSEEK_V3;
        c.routed_scaling_factor = 2.5f;
        n = add_case(cases, n, make_biased("prefill nemotron shape 2688x1856", c, 64));
        n = add_case(cases, n, make("prefill H=272 I=80 (padded K)", base_config(8, 2, 272, 80), 77));
        c = base_config(32, 4, 512, 256);
        c.precision = FP4MOE_PRECISION_W4A4;
        n = add_case(cases, n, make("prefill W4A4", c, 40));
        c.precision = FP4MOE_PRECISION_W4A16;
        c.fc2_input_fp8 = 1;
        n = add_case(cases, n, make("prefill FP8 down input", c, 40));
        c = base_config(64, 1, 256, 128);
        c.routing = FP4MOE_ROUTING_LLAMA4;
        n = add_case(cases, n, make("prefill llama4 (on input)", c, 50));
        c = base_config(64, 6, 256, 128);
        c.routing = FP4MOE_ROUTING_DEEPSEEK_V3;
        c.n_group = 8, c.topk_group = 4, c.routed_scaling_factor = 2.5f;
        n = add_case(cases, n, make_biased("prefill deepseek_v3 groups 8/4", c, 200));
    }

    /* 16-bit hidden states on the decode path (B rows in one FP16 part) in every mode that
     * makes B rows: W4A4, FP8 down input, router weight on the input, routing outside the front,
     * several chunks, finalize off. (Last in the list: the earlier cases keep their indices, so
     * their inputs and output hashes compare with builds from before these were added.) */
    {
        fp4moe_config c = base_config(32, 4, 512, 256);
        c.precision = FP4MOE_PRECISION_W4A4;
        gpu_case g = make("bf16 W4A4", c, 5);
        g.hidden_dtype = g.logits_dtype = FP4MOE_DTYPE_BF16;
        n = add_case(cases, n, g);
        g = make("f16 W4A4, f16 out", c, 13);
        g.hidden_dtype = g.output_dtype = FP4MOE_DTYPE_F16;
        n = add_case(cases, n, g);
        c.precision = FP4MOE_PRECISION_W4A16;
        c.fc2_input_fp8 = 1;
        g = make("bf16 FP8 down input", c, 10);
        g.hidden_dtype = FP4MOE_DTYPE_BF16;
        n = add_case(cases, n, g);
        c = base_config(64, 1, 256, 128);
        c.routing = FP4MOE_ROUTING_LLAMA4;
        g = make("f16 llama4 (on input)", c, 7);
        g.hidden_dtype = FP4MOE_DTYPE_F16;
        n = add_case(cases, n, g);
        c = base_config(64, 8, 512, 256);
        c.decode_threshold = 512;
        g = make("bf16 decode path, T > fused limit", c, 100);
        g.hidden_dtype = FP4MOE_DTYPE_BF16;
        n = add_case(cases, n, g);
        c.precision = FP4MOE_PRECISION_W4A4;
        g = make("bf16 W4A4 decode path, T > one chunk", c, 300);
        g.hidden_dtype = FP4MOE_DTYPE_BF16;
        n = add_case(cases, n, g);
        c.precision = FP4MOE_PRECISION_W4A16;
        g = make("bf16 finalize off", c, 6);
        g.hidden_dtype = FP4MOE_DTYPE_BF16;
        g.skip_finalize = 1;
        n = add_case(cases, n, g);
    }
    /* a split at 128 tokens: T = 48 on the fused front, 128 (the largest decode call) and 129
     * (the smallest prefill call); then the library's default (auto) split, which for E = 64,
     * k = 8 decodes up to T * k = 5.5 * E (T = 44) with BF16 hidden states and 10 * E (T = 80)
     * with FP32 ones */
    {
        fp4moe_config c = base_config(64, 8, 512, 256);
        c.decode_threshold = 128;
        gpu_case g = make("bf16 split 128 T=48", c, 48);
        g.hidden_dtype = g.output_dtype = g.logits_dtype = FP4MOE_DTYPE_BF16;
        n = add_case(cases, n, g);
        n = add_case(cases, n, make("split 128 T=128", c, 128));
        g = make("bf16 split 128 T=129 (prefill)", c, 129);
        g.hidden_dtype = g.output_dtype = g.logits_dtype = FP4MOE_DTYPE_BF16;
        n = add_case(cases, n, g);
        fp4moe_config d;
        fp4moe_config_init(&d);
        c.decode_threshold = d.decode_threshold;
        g = make("bf16 auto split T=44 (decode)", c, 44);
        g.hidden_dtype = g.output_dtype = g.logits_dtype = FP4MOE_DTYPE_BF16;
        n = add_case(cases, n, g);
        g = make("bf16 auto split T=45 (prefill)", c, 45);
        g.hidden_dtype = g.output_dtype = g.logits_dtype = FP4MOE_DTYPE_BF16;
        n = add_case(cases, n, g);
        n = add_case(cases, n, make("auto split T=80 (decode)", c, 80));
        n = add_case(cases, n, make("auto split T=81 (prefill)", c, 81));
    }
    /* one-token chunks, where FC2 and the finalize may run as one kernel (fc2_token_kernel):
     * more slots than its 8 warps, non-local slots, every input to its epilogue and sum, H above
     * 4096, a one-token last chunk (t0 > 0), and the paths that keep two kernels */
    {
        fp4moe_config c = base_config(64, 12, 512, 256);
        n = add_case(cases, n, make("one token: k=12 (slots > warps)", c, 1));
        c = base_config(32, 4, 512, 256);
        c.local_expert_offset = 8, c.local_num_experts = 12;
        gpu_case g = make("one token: local experts 8..19 of 32 + per_token_scale", c, 1);
        g.per_token_scale = 1;
        n = add_case(cases, n, g);
        c = base_config(32, 1, 512, 256);
        c.routing = FP4MOE_ROUTING_LLAMA4;
        n = add_case(cases, n, make("one token: llama4 (on input)", c, 1));
        c = base_config(32, 4, 512, 256);
        g = make("one token: b1/b2 biases, bf16 in/out", c, 1);
        g.gen.biases = 1;
        g.hidden_dtype = g.output_dtype = g.logits_dtype = FP4MOE_DTYPE_BF16;
        n = add_case(cases, n, g);
        c.fc2_input_fp8 = 1;
        n = add_case(cases, n, make("one token: FP8 down input", c, 1));
        c.fc2_input_fp8 = 0;
        g = make("one token: routed, f16 in/out", c, 1);
        g.routed = 1;
        g.hidden_dtype = g.output_dtype = FP4MOE_DTYPE_F16;
        n = add_case(cases, n, g);
        g = make("one token: finalize off (two kernels)", c, 1);
        g.skip_finalize = 1;
        n = add_case(cases, n, g);
        c = base_config(16, 8, 4608, 256);
        g = make("one token: H=4608 (> 4096)", c, 1);
        g.hidden_dtype = g.output_dtype = FP4MOE_DTYPE_BF16;
        n = add_case(cases, n, g);
        c = base_config(64, 8, 512, 256);
        c.decode_threshold = 512;
        n = add_case(cases, n, make("one token: T=257 on the decode path (last chunk t0 = 256)", c, 257));
    }
    /* H >= 4096, 16-bit inputs, >= 128 rows per expert: the prefill GEMMs' 256-row blocks by the
     * per-call rule (the other cases run them only under FP4MOE_CUDA_GEMM_ROWS=256; last here
     * so that earlier cases keep their indices for hash comparisons) */
    {
        fp4moe_config c = base_config(8, 2, 4096, 192);
        c.max_tokens = 1024;
        gpu_case g = make("prefill bf16 H=4096 (256-row blocks by rule)", c, 1000);
        g.hidden_dtype = g.output_dtype = g.logits_dtype = FP4MOE_DTYPE_BF16;
        n = add_case(cases, n, g);
    }
    /* One-token BF16 chunks take their FC2 inputs from FC1 (BF16 MMAs in FC2) in every FC2
     * kernel: a block per tile (K of 19 groups > 16, H <= 4096: no FC2 + finalize kernel), a warp
     * per tile at T = 1 (H > 4096, finalize off), and a one-token last chunk after a 256-token one
     * on the other FC2 inputs, I = 208 so that K2 has padding columns (padded to 256) on the
     * direct rows (decode v12; added last for the hash indices) */
    {
        fp4moe_config c = base_config(32, 4, 512, 1216);
        gpu_case g = make("one token bf16: FC2 inputs by FC1, FC2 a block per tile (K 19 groups)", c, 1);
        g.hidden_dtype = g.output_dtype = g.logits_dtype = FP4MOE_DTYPE_BF16;
        n = add_case(cases, n, g);
        c = base_config(16, 8, 4608, 256);
        g = make("one token bf16: FC2 inputs by FC1, finalize off, H=4608", c, 1);
        g.hidden_dtype = g.output_dtype = FP4MOE_DTYPE_BF16;
        g.skip_finalize = 1;
        n = add_case(cases, n, g);
        c = base_config(64, 8, 512, 208);
        c.decode_threshold = 512;
        g = make("one token bf16: T=257 on the decode path, FC2 inputs by FC1 in the last chunk", c, 257);
        g.hidden_dtype = g.output_dtype = FP4MOE_DTYPE_BF16;
        n = add_case(cases, n, g);
    }

    return n;
}

int main(void)
{
    testing_state st = {0, 0};
    testing_rng rng = testing_rng_from_env("test_gpu_backend");
    gpu_case cases[MAX_CASES];
    const int n = build_cases(cases);

    /* FP4MOE_GPU_QUICK=1: every 5th case (the compute-sanitizer runs, which are slow). */
    /* FP4MOE_GPU_FILTER=text: only the cases whose name contains it (e.g. "prefill"); "!text":
     * only those whose name does not (e.g. "!prefill": the decode cases). */
    /* FP4MOE_GPU_SHARD=i/n: only the cases whose index is i modulo n (scripts/gpu-tests.sh runs
     * the n shards side by side; a case's inputs depend on the seed and its index only). */
    const int stride = getenv("FP4MOE_GPU_QUICK") ? 5 : 1;
    const char *filter = getenv("FP4MOE_GPU_FILTER");
    const int exclude = filter != NULL && filter[0] == '!';
    int shard = 0, shards = 1;
    const char *shard_env = getenv("FP4MOE_GPU_SHARD");
    if (shard_env != NULL && (sscanf(shard_env, "%d/%d", &shard, &shards) != 2 || shards < 1 || shard < 0 ||
                              shard >= shards)) {
        CHECK(&st, 0, "FP4MOE_GPU_SHARD=%s: expected i/n with 0 <= i < n", shard_env);
        return testing_finish(&st, "test_gpu_backend");
    }
    /* FP4MOE_GPU_LIST=1: print the selected cases and stop (no GPU needed) */
    const int list_only = getenv("FP4MOE_GPU_LIST") != NULL;
    fp4moe_context *cpu = NULL, *gpu = NULL;
    if (!list_only) {
        fp4moe_context_options o;
        fp4moe_context_options_init(&o);
        o.backend = FP4MOE_BACKEND_CPU;
        if (fp4moe_context_create(&o, &cpu) != FP4MOE_SUCCESS) return 1;
        o.backend = FP4MOE_BACKEND_CUDA;
        fp4moe_status s = fp4moe_context_create(&o, &gpu);
        CHECK(&st, s == FP4MOE_SUCCESS, "no CUDA backend: %s", fp4moe_status_string(s));
        if (gpu == NULL) return testing_finish(&st, "test_gpu_backend");
        fp4moe_context_options_init(&o);
        fp4moe_context *autoctx = NULL;
        fp4moe_context_create(&o, &autoctx);
        CHECK(&st, fp4moe_context_backend(autoctx) == FP4MOE_BACKEND_CUDA, "AUTO did not pick CUDA");
        fp4moe_context_destroy(autoctx);
        printf("device: %s\n", fp4moe_context_description(gpu));
    }
    for (int i = 0; i < n; i += stride) {
        if (i % shards != shard) continue;
        if (filter != NULL && (strstr(cases[i].name, filter + exclude) != NULL) == exclude) continue;
        if (list_only) {
            printf("  #%03d %-34s T=%lld\n", i, cases[i].name, (long long)cases[i].tokens);
            continue;
        }
        testing_rng case_rng = testing_rng_split(&rng, (uint64_t)i);
        run_case(&st, cpu, gpu, &cases[i], i, &case_rng);
    }
    fp4moe_context_destroy(cpu);
    fp4moe_context_destroy(gpu);
    return testing_finish(&st, "test_gpu_backend");
}
