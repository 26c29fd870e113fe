/* Expert parallelism over NCCL, timed: one process, one thread per GPU, a communicator over all
 * visible GPUs (ncclCommInitAll). For a preset (default deepseek-v3) with random NVFP4 codes:
 *   1. the raw NCCL exchange rate between the GPUs (ncclSend/ncclRecv of 256 MiB to every
 *      peer at once, CUDA events, median of 10): the link floor;
 *   2. the single-GPU layer (every expert on GPU 0, fp4moe_forward, BF16 hidden states) on
 *      ranks x T tokens;
 *   3. fp4moe_ep_forward on every rank with T tokens each (dispatch + experts + combine;
 *      wall clock around the call and a stream synchronisation, median of --repeat), with the
 *      bytes each rank moved (fp4moe_ep_last_stats) and the rate they were moved at.
 * usage: ep_nccl_bench [--preset NAME] [--tokens 16,128,1024] [--repeat 10]
 * Built only with CUDA and NCCL; run by scripts/gpu-check.sh --ep. Prints a table last. */
#include <stdio.h>

#ifndef FP4MOE_HAVE_NCCL
int main(void)
{
    printf("ep_nccl_bench: skipped (built without NCCL)\n");
    return 0;
}
#else

#include <cuda_runtime.h>
#include <nccl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fp4moe.h"
#include "fp4moe_ep.h"
#include "presets.h"
#include "ref/ref_moe.h"
#include "synthetic.h"

#define MAX_RANKS 8
#define MAX_TOKEN_COUNTS 16
#define LINK_BYTES ((size_t)256 << 20)

typedef struct bench_setup {
    int ranks, repeat, num_t;
    long long tokens[MAX_TOKEN_COUNTS]; /* per rank */
    fp4moe_config cfg;
    const fp4moe_weights *w; /* the whole layer, host */
    ncclComm_t comms[MAX_RANKS];
    pthread_barrier_t barrier;
} bench_setup;

typedef struct rank_result {
    double link_ms;                     /* the raw exchange of LINK_BYTES to each peer */
    double ep_ms[MAX_TOKEN_COUNTS];     /* median of fp4moe_ep_forward */
    fp4moe_ep_stats stats[MAX_TOKEN_COUNTS];
    int failed;
    char message[256];
} rank_result;

typedef struct rank_job {
    bench_setup *setup;
    int rank;
    rank_result result;
} rank_job;

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

static int compare_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, compare_double);
    return v[n / 2];
}


/* Random BF16 hidden states and FP32 logits for T tokens (seeded per rank). */
static int make_inputs(const fp4moe_config *c, long long t, uint64_t seed, uint16_t **x,
                       float **logits)
{
    const int64_t h = c->hidden_size, e = c->num_experts;
    float *xf = malloc((size_t)(t * h) * sizeof(float));
    *x = malloc((size_t)(t * h) * sizeof(uint16_t));
    *logits = malloc((size_t)(t * e) * sizeof(float));
    if (!xf || !*x || !*logits) {
        free(xf);
        return 1;
    }
    synthetic_fill_normal(xf, t * h, 1.0f, seed);
    for (int64_t i = 0; i < t * h; i++) (*x)[i] = fp4moe_float_to_bf16(xf[i]);
    synthetic_fill_normal(*logits, t * e, 2.0f, seed + 1);
    free(xf);
    return 0;
}

/* The forward arguments of a timed call: t tokens of BF16 hidden states and FP32 router logits
 * in, BF16 out (the EP ranks and the single-GPU reference take the same ones). */
static fp4moe_forward_args bf16_args(long long t, void *x, void *logits, void *out)
{
    fp4moe_forward_args a;
    fp4moe_forward_args_init(&a);
    a.num_tokens = t;
    a.hidden_states = x;
    a.hidden_dtype = FP4MOE_DTYPE_BF16;
    a.router_logits = logits;
    a.output = out;
    a.output_dtype = FP4MOE_DTYPE_BF16;
    return a;
}

/* The raw exchange: LINK_BYTES to and from every peer at once. */
static double time_link(bench_setup *s, int rank, cudaStream_t stream)
{
    void *send = NULL, *recv = NULL;
    const size_t bytes = LINK_BYTES * (size_t)(s->ranks - 1);
    double times[10];
    cudaEvent_t a, b;
    if (s->ranks < 2 || cudaMalloc(&send, bytes) != cudaSuccess || cudaMalloc(&recv, bytes) != cudaSuccess)
        return 0.0;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    for (int r = -2; r < 10; r++) {
        cudaEventRecord(a, stream);
        ncclGroupStart();
        for (int p = 0, slot = 0; p < s->ranks; p++) {
            if (p == rank) continue;
            ncclSend((char *)send + (size_t)slot * LINK_BYTES, LINK_BYTES, ncclChar, p, s->comms[rank], stream);
            ncclRecv((char *)recv + (size_t)slot * LINK_BYTES, LINK_BYTES, ncclChar, p, s->comms[rank], stream);
            slot++;
        }
        ncclGroupEnd();
        cudaEventRecord(b, stream);
        cudaEventSynchronize(b);
        float ms = 0.0f;
        cudaEventElapsedTime(&ms, a, b);
        if (r >= 0) times[r] = ms;
    }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    cudaFree(send);
    cudaFree(recv);
    return median(times, 10);
}

static void *run_rank(void *arg)
{
    rank_job *job = arg;
    bench_setup *s = job->setup;
    rank_result *res = &job->result;
    const int rank = job->rank;
    cudaSetDevice(rank);
    cudaStream_t stream;
    cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    res->link_ms = time_link(s, rank, stream);

    fp4moe_context_options o;
    fp4moe_context_options_init(&o);
    o.backend = FP4MOE_BACKEND_CUDA;
    o.cuda_device = rank;
    fp4moe_context *ctx = NULL;
    fp4moe_ep *ep = NULL;
    fp4moe_ep_transport tr;
    fp4moe_config cfg = s->cfg;
    const int64_t e = cfg.num_experts, per = (e + s->ranks - 1) / s->ranks;
    cfg.local_expert_offset = rank * per;
    cfg.local_num_experts = rank * per + per <= e ? per : e - rank * per;
    long long max_t = 1;
    for (int i = 0; i < s->num_t; i++)
        if (s->tokens[i] > max_t) max_t = s->tokens[i];
    cfg.max_tokens = max_t;
    const fp4moe_weights w = ref_weights_slice(&s->cfg, s->w, cfg.local_expert_offset);
    fp4moe_status st = fp4moe_context_create(&o, &ctx);
    if (st == FP4MOE_SUCCESS) st = fp4moe_ep_nccl_transport(ctx, s->comms[rank], &tr);
    if (st == FP4MOE_SUCCESS) st = fp4moe_ep_create(ctx, &cfg, &w, &tr, stream, &ep);
    void *d_x = NULL, *d_logits = NULL, *d_out = NULL;
    const int64_t h = cfg.hidden_size;
    if (st == FP4MOE_SUCCESS) st = fp4moe_buffer_alloc(ctx, (size_t)(max_t * h) * 2, &d_x);
    if (st == FP4MOE_SUCCESS) st = fp4moe_buffer_alloc(ctx, (size_t)(max_t * e) * 4, &d_logits);
    if (st == FP4MOE_SUCCESS) st = fp4moe_buffer_alloc(ctx, (size_t)(max_t * h) * 2, &d_out);
    for (int i = 0; i < s->num_t && st == FP4MOE_SUCCESS; i++) {
        const long long t = s->tokens[i];
        uint16_t *x = NULL;
        float *logits = NULL;
        if (make_inputs(&cfg, t, 1000 + (uint64_t)rank * 17 + (uint64_t)i, &x, &logits)) {
            st = FP4MOE_ERROR_OUT_OF_MEMORY;
            break;
        }
        fp4moe_buffer_upload(ctx, d_x, x, (size_t)(t * h) * 2);
        fp4moe_buffer_upload(ctx, d_logits, logits, (size_t)(t * e) * 4);
        free(x);
        free(logits);
        fp4moe_forward_args a = bf16_args(t, d_x, d_logits, d_out);
        double times[256];
        const int n = s->repeat < 256 ? s->repeat : 256;
        for (int r = -2; r < n && st == FP4MOE_SUCCESS; r++) {
            pthread_barrier_wait(&s->barrier); /* every rank starts the call together */
            const double t0 = now_ms();
            st = fp4moe_ep_forward(ep, &a, stream);
            if (st == FP4MOE_SUCCESS && cudaStreamSynchronize(stream) != cudaSuccess) st = FP4MOE_ERROR_CUDA;
            if (r >= 0) times[r] = now_ms() - t0;
        }
        if (st == FP4MOE_SUCCESS) {
            res->ep_ms[i] = median(times, n);
            fp4moe_ep_last_stats(ep, &res->stats[i]);
        }
    }
    if (st != FP4MOE_SUCCESS) {
        res->failed = 1;
        snprintf(res->message, sizeof res->message, "%s: %s", fp4moe_status_string(st),
                 ctx ? fp4moe_last_error(ctx) : "no context");
    }
    fp4moe_buffer_free(ctx, d_x);
    fp4moe_buffer_free(ctx, d_logits);
    fp4moe_buffer_free(ctx, d_out);
    fp4moe_ep_destroy(ep);
    fp4moe_context_destroy(ctx);
    cudaStreamDestroy(stream);
    return NULL;
}

/* The whole layer on GPU 0 for `total` tokens: median of CUDA-event-timed fp4moe_forward. */
static double time_single_gpu(const bench_setup *s, long long total)
{
    fp4moe_context_options o;
    fp4moe_context_options_init(&o);
    o.backend = FP4MOE_BACKEND_CUDA;
    fp4moe_context *ctx = NULL;
    fp4moe_plan *plan = NULL;
    fp4moe_config cfg = s->cfg;
    cfg.max_tokens = total;
    double result = -1.0;
    void *d_x = NULL, *d_logits = NULL, *d_out = NULL, *d_ws = NULL;
    size_t ws = 0;
    uint16_t *x = NULL;
    float *logits = NULL;
    cudaSetDevice(0);
    const int64_t h = cfg.hidden_size, e = cfg.num_experts;
    if (fp4moe_context_create(&o, &ctx) != FP4MOE_SUCCESS ||
        fp4moe_plan_create(ctx, &cfg, s->w, &plan) != FP4MOE_SUCCESS ||
        fp4moe_plan_workspace_size(plan, total, &ws) != FP4MOE_SUCCESS ||
        fp4moe_buffer_alloc(ctx, (size_t)(total * h) * 2, &d_x) != FP4MOE_SUCCESS ||
        fp4moe_buffer_alloc(ctx, (size_t)(total * e) * 4, &d_logits) != FP4MOE_SUCCESS ||
        fp4moe_buffer_alloc(ctx, (size_t)(total * h) * 2, &d_out) != FP4MOE_SUCCESS ||
        fp4moe_buffer_alloc(ctx, ws, &d_ws) != FP4MOE_SUCCESS || make_inputs(&cfg, total, 77, &x, &logits)) {
        fprintf(stderr, "single GPU T=%lld: %s\n", total, ctx ? fp4moe_last_error(ctx) : "no context");
        goto done;
    }
    fp4moe_buffer_upload(ctx, d_x, x, (size_t)(total * h) * 2);
    fp4moe_buffer_upload(ctx, d_logits, logits, (size_t)(total * e) * 4);
    fp4moe_forward_args a = bf16_args(total, d_x, d_logits, d_out);
    cudaEvent_t ev0, ev1;
    cudaEventCreate(&ev0);
    cudaEventCreate(&ev1);
    double times[256];
    const int n = s->repeat < 256 ? s->repeat : 256;
    for (int r = -2; r < n; r++) {
        cudaEventRecord(ev0, NULL);
        if (fp4moe_forward(plan, &a, d_ws, ws, NULL) != FP4MOE_SUCCESS) goto done_events;
        cudaEventRecord(ev1, NULL);
        cudaEventSynchronize(ev1);
        float ms = 0.0f;
        cudaEventElapsedTime(&ms, ev0, ev1);
        if (r >= 0) times[r] = ms;
    }
    result = median(times, n);
done_events:
    cudaEventDestroy(ev0);
    cudaEventDestroy(ev1);
done:
    free(x);
    free(logits);
    fp4moe_buffer_free(ctx, d_x);
    fp4moe_buffer_free(ctx, d_logits);
    fp4moe_buffer_free(ctx, d_out);
    fp4moe_buffer_free(ctx, d_ws);
    fp4moe_plan_destroy(plan);
    fp4moe_context_destroy(ctx);
    return result;
}

int main(int argc, char **argv)
{
    static bench_setup s;
    const char *preset_name = "deepseek-v3", *tokens = "16,128,1024,4096";
    s.repeat = 10;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--preset") == 0) preset_name = argv[i + 1];
        else if (strcmp(argv[i], "--tokens") == 0) tokens = argv[i + 1];
        else if (strcmp(argv[i], "--repeat") == 0) s.repeat = atoi(argv[i + 1]);
    }
    if (s.repeat < 1) s.repeat = 1;
    char list[256];
    snprintf(list, sizeof list, "%s", tokens);
    for (char *t = strtok(list, ","); t && s.num_t < MAX_TOKEN_COUNTS; t = strtok(NULL, ","))
        if (atoll(t) > 0) s.tokens[s.num_t++] = atoll(t);
    preset p;
    if (preset_find(preset_name, &p)) {
        fprintf(stderr, "unknown preset %s\n", preset_name);
        return 2;
    }
    cudaGetDeviceCount(&s.ranks);
    const char *env = getenv("FP4MOE_EP_RANKS");
    if (env && atoi(env) > 0 && atoi(env) < s.ranks) s.ranks = atoi(env);
    if (s.ranks > MAX_RANKS) s.ranks = MAX_RANKS;
    if (s.ranks < 1) {
        printf("ep_nccl_bench: no GPU\n");
        return 1;
    }
    s.cfg = p.cfg;
    synthetic_layer layer;
    if (synthetic_layer_create(&s.cfg, p.has_routing_bias, p.has_biases, SYNTHETIC_RANDOM_CODES, 1234, &layer))
        return 1;
    s.w = &layer.weights;
    int devs[MAX_RANKS];
    for (int i = 0; i < s.ranks; i++) devs[i] = i;
    if (ncclCommInitAll(s.comms, s.ranks, devs) != ncclSuccess) {
        fprintf(stderr, "ncclCommInitAll failed\n");
        return 1;
    }
    pthread_barrier_init(&s.barrier, NULL, (unsigned)s.ranks);
    rank_job jobs[MAX_RANKS];
    pthread_t threads[MAX_RANKS];
    memset(jobs, 0, sizeof jobs);
    for (int r = 0; r < s.ranks; r++) {
        jobs[r].setup = &s;
        jobs[r].rank = r;
        pthread_create(&threads[r], NULL, run_rank, &jobs[r]);
    }
    for (int r = 0; r < s.ranks; r++) pthread_join(threads[r], NULL);
    int failed = 0;
    for (int r = 0; r < s.ranks; r++)
        if (jobs[r].result.failed) {
            fprintf(stderr, "rank %d: %s\n", r, jobs[r].result.message);
            failed = 1;
        }
    for (int r = 0; r < s.ranks; r++) ncclCommDestroy(s.comms[r]);
    if (failed) return 1;

    double link = 0.0;
    for (int r = 0; r < s.ranks; r++)
        if (jobs[r].result.link_ms > link) link = jobs[r].result.link_ms;
    const double link_gbps = link > 0.0 ? (double)LINK_BYTES * (s.ranks - 1) / (link * 1e-3) / 1e9 : 0.0;
    printf("%s, %d ranks (GPUs), %lld experts each; BF16 hidden states\n", preset_name, s.ranks,
           (long long)((s.cfg.num_experts + s.ranks - 1) / s.ranks));
    printf("raw NCCL exchange: %.1f GB/s sent per GPU (and as much received), %zu MiB to each peer\n",
           link_gbps, LINK_BYTES >> 20);
    printf("%8s %8s %11s %10s %9s %12s %12s %10s\n", "T/rank", "T total", "1 GPU ms", "EP ms",
           "EP/1GPU", "sent MB/rk", "recv MB/rk", "GB/s/rank");
    for (int i = 0; i < s.num_t; i++) {
        const long long total = s.tokens[i] * s.ranks;
        const double single = time_single_gpu(&s, total);
        double ep_ms = 0.0, sent = 0.0, recv = 0.0;
        for (int r = 0; r < s.ranks; r++) {
            const rank_result *q = &jobs[r].result;
            const fp4moe_ep_stats *st = &q->stats[i];
            if (q->ep_ms[i] > ep_ms) ep_ms = q->ep_ms[i];
            const double sb = (double)(st->dispatch_bytes_sent + st->combine_bytes_sent + st->count_bytes);
            const double rb = (double)(st->dispatch_bytes_received + st->combine_bytes_received + st->count_bytes);
            if (sb > sent) sent = sb;
            if (rb > recv) recv = rb;
        }
        printf("%8lld %8lld %11.3f %10.3f %9.2f %12.2f %12.2f %10.2f\n", s.tokens[i], total, single,
               ep_ms, single > 0 ? ep_ms / single : 0.0, sent / 1e6, recv / 1e6,
               sent / (ep_ms * 1e-3) / 1e9);
    }
    pthread_barrier_destroy(&s.barrier);
    synthetic_layer_free(&layer);
    return 0;
}
#endif
