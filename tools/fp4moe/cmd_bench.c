/* fp4moe bench: model presets over a token sweep. Reports the median time of repeated calls
 * beside the floor: the NVFP4 bytes of the experts the call touches (packed values + E4M3
 * scales) plus activations in and out, over the memory read bandwidth measured in the same run;
 * and the achieved FP32 rate. Inputs rotate among several sets so the touched experts change
 * from call to call and the caches do not hold them. */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "commands.h"
#include "presets.h"
#include "synthetic.h"

#ifdef FP4MOE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

#define INPUT_SETS 8

typedef struct bench_options {
    fp4moe_backend backend;
    long long threads;
    long long repeat;
    int json;
    fp4moe_dtype dtype; /* hidden states and output (CUDA path) */
    long long threshold; /* decode_threshold of the plan; -1: the default */
    long long layers;    /* CUDA: forward calls per graph (a model's layers in one graph) */
    char presets[512];
    char tokens[256];
} bench_options;

static int parse(int argc, char **argv, bench_options *o)
{
    memset(o, 0, sizeof *o);
    o->backend = FP4MOE_BACKEND_AUTO;
    o->repeat = 10;
    o->dtype = FP4MOE_DTYPE_F32;
    o->threshold = -1;
    o->layers = 1;
    snprintf(o->presets, sizeof o->presets, "qwen3-30b-a3b");
    snprintf(o->tokens, sizeof o->tokens, "1,16,256");
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0) {
            printf("usage: fp4moe bench [--preset A,B|all] [--tokens 1,16,256] [--repeat N]\n"
                   "                    [--backend auto|cpu|cuda] [--threads N] [--json]\n"
                   "                    [--dtype f32|bf16]  (hidden states and output, cuda)\n"
                   "                    [--threshold T]     (largest T on the decode path)\n"
                   "                    [--graph-layers N]  (cuda: 1-64 calls per graph, the time of one)\n");
            exit(0);
        }
        if (strcmp(a, "--json") == 0) {
            o->json = 1;
            continue;
        }
        const char *v = i + 1 < argc ? argv[++i] : NULL;
        if (v == NULL) {
            fprintf(stderr, "fp4moe bench: %s needs a value\n", a);
            return 2;
        }
        if (strcmp(a, "--backend") == 0) {
            if (cli_parse_backend(v, &o->backend)) return 2;
        } else if (strcmp(a, "--threads") == 0) {
            if (cli_parse_int(v, 0, 4096, &o->threads)) goto bad;
        } else if (strcmp(a, "--repeat") == 0) {
            if (cli_parse_int(v, 1, 100000, &o->repeat)) goto bad;
        } else if (strcmp(a, "--preset") == 0) {
            snprintf(o->presets, sizeof o->presets, "%s", v);
        } else if (strcmp(a, "--graph-layers") == 0) {
            if (cli_parse_int(v, 1, 64, &o->layers)) goto bad;
        } else if (strcmp(a, "--threshold") == 0) {
            if (cli_parse_int(v, 0, 1 << 20, &o->threshold)) goto bad;
        } else if (strcmp(a, "--dtype") == 0) {
            if (strcmp(v, "f32") == 0) o->dtype = FP4MOE_DTYPE_F32;
            else if (strcmp(v, "bf16") == 0) o->dtype = FP4MOE_DTYPE_BF16;
            else goto bad;
        } else if (strcmp(a, "--tokens") == 0) {
            snprintf(o->tokens, sizeof o->tokens, "%s", v);
        } else {
            fprintf(stderr, "fp4moe bench: unknown option %s\n", a);
            return 2;
        }
        continue;
    bad:
        fprintf(stderr, "fp4moe bench: bad value '%s' for %s\n", v, a);
        return 2;
    }
    return 0;
}

static int compare_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Read bandwidth of this machine with `threads` threads: the best of three passes summing a
 * 512 MiB buffer (bytes read / time). */
static double measure_read_bandwidth(int threads)
{
    const size_t n = (size_t)64 << 20; /* doubles: 512 MiB */
    double *buf = malloc(n * sizeof(double));
    if (buf == NULL) return 0.0;
#pragma omp parallel for num_threads(threads)
    for (size_t i = 0; i < n; i++) buf[i] = (double)(i & 1023);
    double best = 0.0, sink = 0.0;
    for (int pass = 0; pass < 3; pass++) {
        double t0 = cli_now_seconds(), sum = 0.0;
#pragma omp parallel for num_threads(threads) reduction(+ : sum)
        for (size_t i = 0; i < n; i++) sum += buf[i];
        double dt = cli_now_seconds() - t0;
        sink += sum;
        double bw = (double)(n * sizeof(double)) / dt;
        if (bw > best) best = bw;
    }
    free(buf);
    return sink == -1.0 ? 0.0 : best; /* keeps the sums alive */
}

typedef struct bench_row {
    const char *preset;
    long long tokens;
    double median_ms;
    double touched_experts; /* mean over the input sets */
    double bytes;           /* mean bytes a call must move */
    double floor_ms;
    double gflops;
} bench_row;

static void print_row(const bench_row *r, int json, int first)
{
    if (json) {
        printf("%s{\"preset\": \"%s\", \"tokens\": %lld, \"median_ms\": %.4f, "
               "\"touched_experts\": %.1f, \"bytes\": %.0f, \"floor_ms\": %.4f, "
               "\"ratio_to_floor\": %.3f, \"achieved_gbps\": %.2f, \"gflops\": %.2f}",
               first ? "" : ",\n", r->preset, r->tokens, r->median_ms, r->touched_experts,
               r->bytes, r->floor_ms, r->median_ms / r->floor_ms,
               r->bytes / (r->median_ms * 1e-3) / 1e9, r->gflops);
    } else {
        printf("%-24s %6lld %10.3f %8.1f %9.1f %9.3f %7.2f %8.2f %8.2f\n", r->preset, r->tokens,
               r->median_ms, r->touched_experts, r->bytes / 1e6, r->floor_ms,
               r->median_ms / r->floor_ms, r->bytes / (r->median_ms * 1e-3) / 1e9, r->gflops);
    }
}

/* The largest count of a comma-separated token list; 0 on success, 2 (usage) on a bad entry. */
static int largest_token_count(const char *list, long long *max_t)
{
    char tokens[256];
    snprintf(tokens, sizeof tokens, "%s", list);
    *max_t = 1;
    char *save = NULL;
    for (char *s = strtok_r(tokens, ",", &save); s; s = strtok_r(NULL, ",", &save)) {
        long long v;
        if (cli_parse_int(s, 1, 1 << 20, &v)) {
            fprintf(stderr, "fp4moe bench: bad token count '%s'\n", s);
            return 2;
        }
        if (v > *max_t) *max_t = v;
    }
    return 0;
}

/* Distinct local experts among n routed ids (touched: scratch of num_experts bytes). */
static int64_t count_touched(const fp4moe_config *cfg, const int32_t *ids, int64_t n,
                             unsigned char *touched)
{
    const int64_t e = cfg->num_experts;
    memset(touched, 0, (size_t)e);
    for (int64_t i = 0; i < n; i++) {
        int64_t id = ids[i] - cfg->local_expert_offset;
        if (id >= 0 && id < e) touched[id] = 1;
    }
    int64_t count = 0;
    for (int64_t i = 0; i < e; i++) count += touched[i];
    return count;
}

/* NVFP4 bytes of one expert's FC1 and FC2 (packed values + E4M3 scales). */
static double expert_nvfp4_bytes(const fp4moe_config *cfg)
{
    const int64_t h = cfg->hidden_size, n1 = fp4moe_config_fc1_rows(cfg);
    return (double)(n1 * h + h * cfg->intermediate_size) * (0.5 + 1.0 / 16.0);
}

/* One result row: bytes the call must move (touched experts' weights + activations in and out,
 * act_bytes each), its floor over the measured bandwidth, and the achieved rate. */
static void emit_row(const preset *p, const fp4moe_config *cfg, long long t, double median_ms,
                     double touched_experts, double bandwidth, double act_bytes, int json,
                     int *first_row)
{
    const int64_t h = cfg->hidden_size, n1 = fp4moe_config_fc1_rows(cfg);
    bench_row row;
    row.preset = p->name;
    row.tokens = t;
    row.median_ms = median_ms;
    row.touched_experts = touched_experts;
    row.bytes = touched_experts * expert_nvfp4_bytes(cfg) + 2.0 * (double)(t * h) * act_bytes;
    row.floor_ms = row.bytes / bandwidth * 1e3;
    double flops = 2.0 * (double)t * (double)cfg->top_k *
                   (double)(n1 * h + h * cfg->intermediate_size);
    row.gflops = flops / (median_ms * 1e-3) / 1e9;
    print_row(&row, json, *first_row);
    *first_row = 0;
    fflush(stdout);
}

/* The preset's layer from random codes, planned on ctx (NULL after printing why). */
static fp4moe_plan *create_bench_plan(fp4moe_context *ctx, const preset *p,
                                      const fp4moe_config *cfg)
{
    synthetic_layer layer;
    if (synthetic_layer_create(cfg, p->has_routing_bias, p->has_biases, SYNTHETIC_RANDOM_CODES,
                               1234, &layer))
        return NULL;
    fp4moe_plan *plan = NULL;
    fp4moe_status st = fp4moe_plan_create(ctx, cfg, &layer.weights, &plan);
    synthetic_layer_free(&layer); /* the plan owns its copy */
    if (st != FP4MOE_SUCCESS) {
        fprintf(stderr, "fp4moe bench: %s: plan creation failed: %s\n", p->name,
                fp4moe_last_error(ctx));
        return NULL;
    }
    return plan;
}

/* The preset's configuration for this run: max_tokens the largest count of the token list
 * (also in *max_t), the decode threshold if given. 2 (usage) on a bad token list. */
static int bench_config(const preset *p, const bench_options *o, fp4moe_config *cfg,
                        long long *max_t)
{
    *cfg = p->cfg;
    if (largest_token_count(o->tokens, max_t)) return 2;
    cfg->max_tokens = *max_t;
    if (o->threshold >= 0) cfg->decode_threshold = o->threshold;
    return 0;
}

/* Runs one preset over the token list; rows printed as they come. */
static int bench_preset(fp4moe_context *ctx, const preset *p, const bench_options *o,
                        double bandwidth, int *first_row)
{
    fp4moe_config cfg;
    long long max_t = 1;
    char tokens[256];
    if (bench_config(p, o, &cfg, &max_t)) return 2;
    const int64_t e = cfg.num_experts, h = cfg.hidden_size, k = cfg.top_k;
    /* The generator's copy and the backend's copy coexist while the plan is made (the CPU
     * backend keeps no canonical copy); the third copy is headroom for the rest. */
    double need = 3.0 * expert_nvfp4_bytes(&cfg) * (double)e;
    double avail = (double)sysconf(_SC_AVPHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
    if (need > avail) {
        fprintf(stderr, "fp4moe bench: skipping %s: needs about %.1f GB, %.1f GB free\n", p->name,
                need / 1e9, avail / 1e9);
        return 0;
    }
    fp4moe_plan *plan = create_bench_plan(ctx, p, &cfg);
    if (plan == NULL) return 1;
    fp4moe_status st = FP4MOE_SUCCESS;
    int rc = 0;
    size_t ws_bytes = 0;
    fp4moe_plan_workspace_size(plan, max_t, &ws_bytes);
    void *ws = cli_aligned_alloc(ws_bytes);
    float *x = malloc((size_t)(INPUT_SETS * max_t * h) * sizeof(float));
    float *logits = malloc((size_t)(INPUT_SETS * max_t * e) * sizeof(float));
    float *out = malloc((size_t)(max_t * h) * sizeof(float));
    int32_t *ids = malloc((size_t)(max_t * k) * sizeof(int32_t));
    float *weights = malloc((size_t)(max_t * k) * sizeof(float));
    unsigned char *touched = malloc((size_t)e);
    double *times = malloc((size_t)o->repeat * sizeof(double));
    if (!ws || !x || !logits || !out || !ids || !weights || !touched || !times) {
        fprintf(stderr, "fp4moe bench: out of memory\n");
        rc = 1;
        goto done;
    }
    synthetic_fill_normal(x, INPUT_SETS * max_t * h, 1.0f, 3);
    synthetic_fill_normal(logits, INPUT_SETS * max_t * e, 2.0f, 5);
    snprintf(tokens, sizeof tokens, "%s", o->tokens);
    for (char *s = strtok(tokens, ","); s; s = strtok(NULL, ",")) {
        long long t = atoll(s);
        /* Bytes a call must move, averaged over the input sets. */
        double touched_sum = 0;
        for (int set = 0; set < INPUT_SETS; set++) {
            st = fp4moe_route(plan, t, logits + (size_t)set * max_t * e, FP4MOE_DTYPE_F32, ids,
                              weights, ws, ws_bytes, NULL);
            if (st != FP4MOE_SUCCESS) break;
            touched_sum += (double)count_touched(&cfg, ids, t * k, touched);
        }
        fp4moe_forward_args args;
        fp4moe_forward_args_init(&args);
        args.num_tokens = t;
        args.output = out;
        for (long long r = -2; r < o->repeat && st == FP4MOE_SUCCESS; r++) {
            int set = (int)((r + 2) % INPUT_SETS);
            args.hidden_states = x + (size_t)set * max_t * h;
            args.router_logits = logits + (size_t)set * max_t * e;
            double t0 = cli_now_seconds();
            st = fp4moe_forward(plan, &args, ws, ws_bytes, NULL);
            if (r >= 0) times[r] = cli_now_seconds() - t0;
        }
        if (st != FP4MOE_SUCCESS) {
            fprintf(stderr, "fp4moe bench: %s T=%lld failed: %s\n", p->name, t,
                    fp4moe_last_error(ctx));
            rc = 1;
            break;
        }
        qsort(times, (size_t)o->repeat, sizeof(double), compare_double);
        emit_row(p, &cfg, t, times[o->repeat / 2] * 1e3, touched_sum / INPUT_SETS, bandwidth, 4.0,
                 o->json, first_row);
    }
done:
    free(ws);
    free(x);
    free(logits);
    free(out);
    free(ids);
    free(weights);
    free(touched);
    free(times);
    fp4moe_plan_destroy(plan);
    return rc;
}

#ifdef FP4MOE_HAVE_CUDA
/* The GPU path: device buffers, one CUDA graph per input set (each replays the whole forward
 * call, routing included), CUDA events around every replay, the median of the replays after a
 * warm-up; the sets rotate so the touched experts change from replay to replay and the
 * weights (far larger than L2 for every preset) come from device memory. With --graph-layers
 * N, graph s holds N calls one after another on input sets s * N, s * N + 1, ... (mod the
 * sets: replays of graphs 0, 1, 2, ... walk the sets in one rotation, each set's next call 8
 * calls later), as a model's decode step holds its layers in one graph, so the graph's launch
 * is paid once for all of them; a call's time is the replay's over N. */
#define GPU_MIN_REPLAYS 200

/* Device-to-device copy bandwidth, counting bytes read plus bytes written: the best of five
 * 1 GiB copies. */
static double measure_device_copy_bandwidth(void)
{
    const size_t bytes = (size_t)1 << 30;
    void *a = NULL, *b = NULL;
    cudaEvent_t e0 = NULL, e1 = NULL;
    double best = 0.0;
    if (cudaMalloc(&a, bytes) != cudaSuccess || cudaMalloc(&b, bytes) != cudaSuccess ||
        cudaMemset(a, 1, bytes) != cudaSuccess || cudaEventCreate(&e0) != cudaSuccess ||
        cudaEventCreate(&e1) != cudaSuccess)
        goto done;
    for (int pass = 0; pass < 6; pass++) {
        float ms = 0.0f;
        if (cudaEventRecord(e0, NULL) != cudaSuccess ||
            cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, NULL) != cudaSuccess ||
            cudaEventRecord(e1, NULL) != cudaSuccess || cudaEventSynchronize(e1) != cudaSuccess ||
            cudaEventElapsedTime(&ms, e0, e1) != cudaSuccess)
            break;
        double bw = 2.0 * (double)bytes / (ms * 1e-3);
        if (pass > 0 && bw > best) best = bw;
    }
done:
    (void)cudaGetLastError();
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    cudaFree(a);
    cudaFree(b);
    return best;
}

static int bench_preset_cuda(fp4moe_context *ctx, const preset *p, const bench_options *o,
                             double bandwidth, int *first_row)
{
    fp4moe_config cfg;
    long long max_t = 1;
    char tokens[256];
    if (bench_config(p, o, &cfg, &max_t)) return 2;
    const int64_t e = cfg.num_experts, h = cfg.hidden_size, k = cfg.top_k;
    fp4moe_plan *plan = create_bench_plan(ctx, p, &cfg);
    if (plan == NULL) return 1;
    fp4moe_status st = FP4MOE_SUCCESS;
    const long long replays = o->repeat > GPU_MIN_REPLAYS ? o->repeat : GPU_MIN_REPLAYS;
    int rc = 0;
    size_t ws_bytes = 0;
    fp4moe_plan_workspace_size(plan, max_t, &ws_bytes);
    const size_t x_set = (size_t)(max_t * h), l_set = (size_t)(max_t * e);
    const size_t xsz = o->dtype == FP4MOE_DTYPE_BF16 ? 2 : 4; /* bytes per hidden value */
    float *x = malloc(INPUT_SETS * x_set * sizeof(float));
    float *logits = malloc(INPUT_SETS * l_set * sizeof(float));
    int32_t *ids = malloc((size_t)(max_t * k) * sizeof(int32_t));
    unsigned char *touched = malloc((size_t)e);
    float *ms = malloc((size_t)replays * sizeof(float));
    cudaEvent_t *events = calloc((size_t)(2 * replays), sizeof(cudaEvent_t));
    cudaGraphExec_t execs[INPUT_SETS] = {0};
    void *d_x = NULL, *d_logits = NULL, *d_out = NULL, *d_ws = NULL, *d_ids = NULL, *d_w = NULL;
    cudaStream_t stream = NULL;
    if (!x || !logits || !ids || !touched || !ms || !events) {
        fprintf(stderr, "fp4moe bench: out of memory\n");
        rc = 1;
        goto done;
    }
    if (fp4moe_buffer_alloc(ctx, INPUT_SETS * x_set * xsz, &d_x) ||
        fp4moe_buffer_alloc(ctx, INPUT_SETS * l_set * sizeof(float), &d_logits) ||
        fp4moe_buffer_alloc(ctx, x_set * xsz, &d_out) ||
        fp4moe_buffer_alloc(ctx, ws_bytes, &d_ws) ||
        fp4moe_buffer_alloc(ctx, (size_t)(max_t * k) * 4, &d_ids) ||
        fp4moe_buffer_alloc(ctx, (size_t)(max_t * k) * 4, &d_w) ||
        cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess) {
        fprintf(stderr, "fp4moe bench: device buffers: %s\n", fp4moe_last_error(ctx));
        rc = 1;
        goto done;
    }
    for (long long i = 0; i < 2 * replays; i++)
        if (cudaEventCreate(&events[i]) != cudaSuccess) {
            rc = 1;
            goto done;
        }
    synthetic_fill_normal(x, INPUT_SETS * (int64_t)x_set, 1.0f, 3);
    synthetic_fill_normal(logits, INPUT_SETS * (int64_t)l_set, 2.0f, 5);
    if (xsz == 2) { /* BF16 in place: the first half of x's bytes */
        uint16_t *xb = (uint16_t *)x;
        for (size_t i = 0; i < INPUT_SETS * x_set; i++) xb[i] = fp4moe_float_to_bf16(x[i]);
    }
    fp4moe_buffer_upload(ctx, d_x, x, INPUT_SETS * x_set * xsz);
    fp4moe_buffer_upload(ctx, d_logits, logits, INPUT_SETS * l_set * sizeof(float));
    snprintf(tokens, sizeof tokens, "%s", o->tokens);
    for (char *s = strtok(tokens, ","); s && rc == 0; s = strtok(NULL, ",")) {
        long long t = atoll(s);
        double touched_sum = 0;
        for (int set = 0; set < INPUT_SETS && st == FP4MOE_SUCCESS; set++) {
            st = fp4moe_route(plan, t, (float *)d_logits + set * l_set, FP4MOE_DTYPE_F32,
                              (int32_t *)d_ids, (float *)d_w, d_ws, ws_bytes, stream);
            if (st == FP4MOE_SUCCESS) st = fp4moe_synchronize(ctx, stream);
            if (st == FP4MOE_SUCCESS) st = fp4moe_buffer_download(ctx, ids, d_ids, (size_t)(t * k) * 4);
            touched_sum += (double)count_touched(&cfg, ids, t * k, touched);
        }
        for (int set = 0; set < INPUT_SETS && st == FP4MOE_SUCCESS; set++) {
            fp4moe_forward_args args;
            fp4moe_forward_args_init(&args);
            args.num_tokens = t;
            args.output = d_out;
            args.hidden_dtype = args.output_dtype = o->dtype;
            cudaGraph_t graph = NULL;
            if (execs[set]) cudaGraphExecDestroy(execs[set]);
            execs[set] = NULL;
            if (cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
                st = FP4MOE_ERROR_CUDA;
                break;
            }
            for (long long layer = 0; layer < o->layers && st == FP4MOE_SUCCESS; layer++) {
                const size_t in = (size_t)((set * o->layers + layer) % INPUT_SETS);
                args.hidden_states = (char *)d_x + in * x_set * xsz;
                args.router_logits = (float *)d_logits + in * l_set;
                st = fp4moe_forward(plan, &args, d_ws, ws_bytes, stream);
            }
            cudaError_t err = cudaStreamEndCapture(stream, &graph);
            if (st == FP4MOE_SUCCESS && err == cudaSuccess)
                err = cudaGraphInstantiate(&execs[set], graph, 0);
            if (graph) cudaGraphDestroy(graph);
            if (st == FP4MOE_SUCCESS && err != cudaSuccess) st = FP4MOE_ERROR_CUDA;
        }
        /* warm-up, then timed replays back to back, one event pair around each */
        for (int r = 0; r < 3 * INPUT_SETS && st == FP4MOE_SUCCESS; r++)
            if (cudaGraphLaunch(execs[r % INPUT_SETS], stream) != cudaSuccess) st = FP4MOE_ERROR_CUDA;
        for (long long r = 0; r < replays && st == FP4MOE_SUCCESS; r++) {
            if (cudaEventRecord(events[2 * r], stream) != cudaSuccess ||
                cudaGraphLaunch(execs[r % INPUT_SETS], stream) != cudaSuccess ||
                cudaEventRecord(events[2 * r + 1], stream) != cudaSuccess)
                st = FP4MOE_ERROR_CUDA;
        }
        if (st == FP4MOE_SUCCESS && cudaStreamSynchronize(stream) != cudaSuccess) st = FP4MOE_ERROR_CUDA;
        for (long long r = 0; r < replays && st == FP4MOE_SUCCESS; r++)
            if (cudaEventElapsedTime(&ms[r], events[2 * r], events[2 * r + 1]) != cudaSuccess)
                st = FP4MOE_ERROR_CUDA;
        if (st != FP4MOE_SUCCESS) {
            fprintf(stderr, "fp4moe bench: %s T=%lld failed: %s %s\n", p->name, t,
                    fp4moe_last_error(ctx), cudaGetErrorString(cudaGetLastError()));
            rc = 1;
            break;
        }
        double *times = malloc((size_t)replays * sizeof(double));
        if (times == NULL) {
            rc = 1;
            break;
        }
        for (long long r = 0; r < replays; r++) times[r] = ms[r] * 1e-3 / (double)o->layers;
        qsort(times, (size_t)replays, sizeof(double), compare_double);
        emit_row(p, &cfg, t, times[replays / 2] * 1e3, touched_sum / INPUT_SETS, bandwidth, (double)xsz,
                 o->json, first_row);
        free(times);
    }
done:
    for (int i = 0; i < INPUT_SETS; i++)
        if (execs[i]) cudaGraphExecDestroy(execs[i]);
    if (events)
        for (long long i = 0; i < 2 * replays; i++)
            if (events[i]) cudaEventDestroy(events[i]);
    if (stream) cudaStreamDestroy(stream);
    fp4moe_buffer_free(ctx, d_x);
    fp4moe_buffer_free(ctx, d_logits);
    fp4moe_buffer_free(ctx, d_out);
    fp4moe_buffer_free(ctx, d_ws);
    fp4moe_buffer_free(ctx, d_ids);
    fp4moe_buffer_free(ctx, d_w);
    free(x);
    free(logits);
    free(ids);
    free(touched);
    free(ms);
    free(events);
    fp4moe_plan_destroy(plan);
    return rc;
}
#endif

int cmd_bench(int argc, char **argv)
{
    bench_options o;
    int rc = parse(argc, argv, &o);
    if (rc) return rc;
    fp4moe_context *ctx = cli_create_context(o.backend, (int)o.threads);
    if (ctx == NULL) return 1;
    int threads = o.threads > 0 ? (int)o.threads : omp_get_num_procs();
    const int on_gpu = fp4moe_context_backend(ctx) == FP4MOE_BACKEND_CUDA;
    if (!on_gpu && o.layers != 1) {
        fprintf(stderr, "fp4moe bench: --graph-layers needs the cuda backend\n");
        fp4moe_context_destroy(ctx);
        return 2;
    }
    double bandwidth = 0.0;
#ifdef FP4MOE_HAVE_CUDA
    if (on_gpu) bandwidth = measure_device_copy_bandwidth();
#endif
    if (!on_gpu) bandwidth = measure_read_bandwidth(threads);
    if (bandwidth <= 0.0) {
        fprintf(stderr, "fp4moe bench: cannot measure the memory bandwidth\n");
        fp4moe_context_destroy(ctx);
        return 1;
    }
    if (o.json)
        printf("{\"backend\": \"%s\", \"%s\": %.2f, \"calls_per_graph\": %lld, \"rows\": [\n",
               fp4moe_context_description(ctx),
               on_gpu ? "device_copy_bandwidth_gbps" : "read_bandwidth_gbps", bandwidth / 1e9,
               on_gpu ? o.layers : 0LL);
    else if (on_gpu)
        printf("backend: %s\nmeasured device-to-device copy bandwidth: %.2f GB/s (read + write)\n"
               "timing: CUDA events around CUDA-graph replays, median of >= %d, %d input sets rotated, "
               "%lld call(s) per graph (time per call)\n"
               "%-24s %6s %10s %8s %9s %9s %7s %8s %8s\n",
               fp4moe_context_description(ctx), bandwidth / 1e9, 200, INPUT_SETS, o.layers, "preset", "T",
               "median_ms", "experts", "MB", "floor_ms", "ratio", "GB/s", "GFLOP/s");
    else
        printf("backend: %s\nmeasured read bandwidth: %.2f GB/s (%d threads)\n"
               "%-24s %6s %10s %8s %9s %9s %7s %8s %8s\n",
               fp4moe_context_description(ctx), bandwidth / 1e9, threads, "preset", "T",
               "median_ms", "experts", "MB", "floor_ms", "ratio", "GB/s", "GFLOP/s");
    char presets[512];
    snprintf(presets, sizeof presets, "%s", strcmp(o.presets, "all") == 0 ? "" : o.presets);
    if (presets[0] == '\0') {
        size_t used = 0;
        for (const char *const *n = preset_names(); *n; n++)
            used += (size_t)snprintf(presets + used, sizeof presets - used, "%s%s",
                                     used ? "," : "", *n);
    }
    int first_row = 1;
    char *save = NULL;
    for (char *name = strtok_r(presets, ",", &save); name && rc == 0;
         name = strtok_r(NULL, ",", &save)) {
        preset p;
        if (preset_find(name, &p)) {
            fprintf(stderr, "fp4moe bench: unknown preset '%s'\n", name);
            rc = 2;
            break;
        }
#ifdef FP4MOE_HAVE_CUDA
        if (on_gpu) {
            rc = bench_preset_cuda(ctx, &p, &o, bandwidth, &first_row);
            continue;
        }
#endif
        rc = bench_preset(ctx, &p, &o, bandwidth, &first_row);
    }
    if (o.json) printf("\n]}\n");
    fp4moe_context_destroy(ctx);
    return rc;
}
