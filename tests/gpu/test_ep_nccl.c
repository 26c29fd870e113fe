/* Expert parallelism over NCCL on the GPU machine: one process, one thread per GPU, a
 * communicator over the GPUs (ncclCommInitAll; size 1 on a one-GPU machine, or
 * FP4MOE_EP_RANKS=n for fewer ranks). Every rank's output is compared with the plain
 * single-GPU layer (CUDA backend, GPU 0) on the same tokens. Uneven expert splits, a rank
 * without tokens when there are 3 or more ranks, tokens whose experts all live elsewhere.
 *
 * What "equal" means here (docs/EP.md): W4A16 must agree to 1e-5 relative L2 with FP32 output
 * (bit-identical when a rank's expert call and the single-GPU call take the same path: the CUDA
 * backend's decode path (<= decode_threshold rows) and prefill path accumulate differently, ~1e-6
 * apart), and with BF16/FP16 output every element must equal the single-GPU one or be its
 * neighbouring code (one output rounding on the other side); the number of differing elements
 * is printed. W4A4 is required to agree to 1e-3: the EP path quantises the dispatched rows on
 * the host with the GPU quantiser's reciprocals (measured at create, docs/EP.md), so its codes
 * are the single-GPU layer's, but the expert calls may take the other CUDA path as above.
 * Never run by CTest (CI has no GPU); built only with CUDA and NCCL. */
#include <stdio.h>

#ifndef FP4MOE_HAVE_NCCL
int main(void)
{
    printf("test_ep_nccl: skipped (built without NCCL)\n");
    return 0;
}
#else

#include <cuda_runtime.h>
#include <math.h>
#include <nccl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "ep/ep_internal.h"
#include "fp4moe.h"
#include "fp4moe_ep.h"
#include "ref/ref_moe.h"
#include "testing.h"

#define TEST_NAME "test_ep_nccl"
#define MAX_RANKS 8
#define MAX_RANK_TOKENS 200 /* tokens of one rank in one call */

typedef struct gpu_ep_case {
    const char *name;
    int64_t E, H, I;
    int32_t k;
    fp4moe_precision precision;
    fp4moe_dtype hidden, out;
    int routed, per_token_scale, skip_finalize;
} gpu_ep_case;

typedef struct rank_job {
    int rank;
    ncclComm_t comm;
    const ref_layer *layer;
    const gpu_ep_case *c;
    int64_t e0, e_loc, t;
    const uint8_t *hidden; /* host slices */
    const float *logits, *weights, *scale;
    const int32_t *ids;
    uint8_t *out;          /* host slice of the gathered output */
    fp4moe_status status;
    char message[512];
} rank_job;

static void *dev_upload(fp4moe_context *ctx, const void *host, size_t bytes)
{
    void *d = NULL;
    if (fp4moe_buffer_alloc(ctx, bytes ? bytes : 256, &d) != FP4MOE_SUCCESS) return NULL;
    if (host && bytes) fp4moe_buffer_upload(ctx, d, host, bytes);
    return d;
}

/* Two 16-bit outputs (BF16 or FP16) equal or one code apart: where a rank's expert call and
 * the single-GPU call take different paths (~1e-6 apart in FP32), the rounding to 16 bits may
 * fall on either side of a tie for a few elements, which alone is ~1e-5 of relative L2. */
static int neighbouring_codes16(const uint8_t *x, const uint8_t *y)
{
    uint16_t u, v;
    memcpy(&u, x, 2);
    memcpy(&v, y, 2);
    if ((u ^ v) & 0x8000u) return (u & 0x7fffu) == 0 && (v & 0x7fffu) == 0; /* +0 / -0 */
    return u == v || u == v + 1 || v == u + 1;
}

/* The forward arguments of a case over t tokens in device buffers (the EP call and the
 * single-GPU reference take the same ones). */
static fp4moe_forward_args case_args(const gpu_ep_case *c, int64_t t, void *hidden, void *logits,
                                     void *ids, void *weights, void *scale, void *out)
{
    fp4moe_forward_args a;
    fp4moe_forward_args_init(&a);
    a.num_tokens = t;
    a.hidden_states = hidden;
    a.hidden_dtype = c->hidden;
    a.router_logits = logits;
    a.topk_ids = ids;
    a.topk_weights = weights;
    a.per_token_scale = c->per_token_scale ? scale : NULL;
    a.output = out;
    a.output_dtype = c->out;
    a.skip_finalize = c->skip_finalize;
    return a;
}

static void *run_rank(void *arg)
{
    rank_job *job = arg;
    const gpu_ep_case *c = job->c;
    const int64_t H = c->H, E = c->E, k = c->k;
    const size_t elt = ref_dtype_bytes(c->hidden), out_elt = ref_dtype_bytes(c->out);
    cudaSetDevice(job->rank);
    fp4moe_context_options o;
    fp4moe_context_options_init(&o);
    o.backend = FP4MOE_BACKEND_CUDA;
    o.cuda_device = job->rank;
    fp4moe_context *ctx = NULL;
    job->status = fp4moe_context_create(&o, &ctx);
    if (job->status != FP4MOE_SUCCESS) {
        snprintf(job->message, sizeof job->message, "context: %s", fp4moe_last_error(ctx));
        return NULL; /* the peers block in create: the run times out, which is the report */
    }
    cudaStream_t stream;
    cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    fp4moe_ep_transport tr;
    fp4moe_ep *ep = NULL;
    job->status = fp4moe_ep_nccl_transport(ctx, job->comm, &tr);
    fp4moe_config cfg = job->layer->cfg;
    cfg.local_expert_offset = job->e0;
    cfg.local_num_experts = job->e_loc;
    cfg.max_tokens = MAX_RANK_TOKENS; /* sizes this rank's staging */
    const fp4moe_weights w = ref_layer_slice_weights(job->layer, job->e0);
    if (job->status == FP4MOE_SUCCESS)
        job->status = fp4moe_ep_create(ctx, &cfg, &w, &tr, stream, &ep);
    size_t allocations = ep ? ep_allocation_count(ep) : 0;
    const int64_t out_rows = c->skip_finalize ? job->t * k : job->t;
    void *d_hidden = dev_upload(ctx, job->hidden, (size_t)(job->t * H) * elt);
    void *d_logits = dev_upload(ctx, job->logits, (size_t)(job->t * E) * sizeof(float));
    void *d_ids = dev_upload(ctx, job->ids, (size_t)(job->t * k) * sizeof(int32_t));
    void *d_weights = dev_upload(ctx, job->weights, (size_t)(job->t * k) * sizeof(float));
    void *d_scale = dev_upload(ctx, job->scale, (size_t)job->t * sizeof(float));
    void *d_out = dev_upload(ctx, NULL, (size_t)(out_rows * H) * out_elt);
    if (job->status == FP4MOE_SUCCESS) {
        fp4moe_forward_args a = case_args(c, job->t, d_hidden, d_logits, d_ids, d_weights, d_scale, d_out);
        job->status = c->routed ? fp4moe_ep_forward_routed(ep, &a, stream)
                                : fp4moe_ep_forward(ep, &a, stream);
        /* the output is written on the stream (the device path does not wait for it) */
        if (job->status == FP4MOE_SUCCESS) job->status = fp4moe_synchronize(ctx, stream);
        if (job->status == FP4MOE_SUCCESS && out_rows > 0)
            job->status =
                fp4moe_buffer_download(ctx, job->out, d_out, (size_t)(out_rows * H) * out_elt);
    }
    snprintf(job->message, sizeof job->message, "%s", fp4moe_last_error(ctx));
    if (job->status == FP4MOE_SUCCESS && ep_allocation_count(ep) != allocations) {
        job->status = FP4MOE_ERROR_INTERNAL;
        snprintf(job->message, sizeof job->message, "the forward call allocated staging");
    }
    if (job->status == FP4MOE_SUCCESS && job->rank == 0) {
        fp4moe_ep_footprint f;
        fp4moe_ep_get_footprint(ep, &f);
        printf("    rank 0 staging: max_received_rows %lld, host %zu B, device %zu B\n",
               (long long)f.max_received_rows, f.host_staging_bytes, f.device_staging_bytes);
    }
    void *bufs[] = {d_hidden, d_logits, d_ids, d_weights, d_scale, d_out};
    for (int i = 0; i < 6; i++)
        fp4moe_buffer_free(ctx, bufs[i]);
    fp4moe_ep_destroy(ep);
    cudaStreamDestroy(stream);
    fp4moe_context_destroy(ctx);
    return NULL;
}

static void run_case(testing_state *st, testing_rng *rng, const gpu_ep_case *c, int size,
                     ncclComm_t *comms)
{
    fp4moe_config cfg;
    fp4moe_config_init(&cfg);
    cfg.num_experts = c->E, cfg.top_k = c->k, cfg.hidden_size = c->H;
    cfg.intermediate_size = c->I;
    cfg.routing = FP4MOE_ROUTING_RENORMALIZE;
    cfg.precision = c->precision;
    cfg.max_tokens = MAX_RANK_TOKENS * MAX_RANKS; /* the single-GPU reference runs them all */
    ref_gen_options gen = {1, 0, 0, 0};
    ref_layer layer;
    if (ref_layer_generate(&layer, &cfg, &gen, rng) != 0) {
        CHECK(st, 0, "%s: layer", c->name);
        return;
    }
    const int64_t E = c->E, H = c->H, k = c->k;
    const size_t elt = ref_dtype_bytes(c->hidden), out_elt = ref_dtype_bytes(c->out);
    int64_t split[MAX_RANKS + 1], first[MAX_RANKS + 1], tokens[MAX_RANKS];
    split[0] = 0;
    first[0] = 0;
    for (int r = 0; r < size; r++) {
        split[r + 1] = r == size - 1 ? E : split[r] + testing_int(rng, 1, E - split[r] - (size - 1 - r));
        tokens[r] = (size > 2 && r == 1) ? 0 : testing_int(rng, 1, MAX_RANK_TOKENS);
        first[r + 1] = first[r] + tokens[r];
    }
    const int64_t T = first[size];
    const int64_t out_rows = c->skip_finalize ? T * k : T;
    uint8_t *hidden = malloc((size_t)(T * H) * elt + 1);
    float *calib = malloc((size_t)(T * H) * sizeof(float) + 1);
    float *logits = malloc((size_t)(T * E) * sizeof(float) + 1);
    int32_t *ids = malloc((size_t)(T * k) * sizeof(int32_t) + 1);
    float *weights = malloc((size_t)(T * k) * sizeof(float) + 1);
    float *scale = malloc((size_t)T * sizeof(float) + 1);
    uint8_t *expect = malloc((size_t)(out_rows * H) * out_elt + 1);
    uint8_t *got = malloc((size_t)(out_rows * H) * out_elt + 1);
    ref_random_fill(rng, hidden, c->hidden, T * H, 1.0);
    ref_random_fill(rng, logits, FP4MOE_DTYPE_F32, T * E, 2.0);
    for (int64_t i = 0; i < T * H; i++)
        calib[i] = (float)ref_load(hidden, c->hidden, i);
    ref_layer_calibrate(&layer, calib, T);
    for (int64_t t = 0; t < T; t++) {
        scale[t] = (float)(0.5 + testing_uniform(rng));
        for (int64_t j = 0; j < k; j++) {
            int32_t e;
            int dup;
            do { /* distinct ids */
                e = (int32_t)testing_int(rng, 0, E - 1);
                dup = 0;
                for (int64_t q = 0; q < j; q++)
                    dup |= ids[t * k + q] == e;
            } while (dup);
            ids[t * k + j] = e;
            weights[t * k + j] = (float)(0.1 + testing_uniform(rng));
        }
    }

    /* The plain single-GPU layer on GPU 0. */
    cudaSetDevice(0);
    fp4moe_context_options o;
    fp4moe_context_options_init(&o);
    o.backend = FP4MOE_BACKEND_CUDA;
    fp4moe_context *ctx = NULL;
    fp4moe_plan *plan = NULL;
    fp4moe_status s = fp4moe_context_create(&o, &ctx);
    if (s == FP4MOE_SUCCESS) s = fp4moe_plan_create(ctx, &layer.cfg, &layer.w, &plan);
    size_t ws_bytes = 0;
    void *ws = NULL;
    if (s == FP4MOE_SUCCESS) s = fp4moe_plan_workspace_size(plan, T, &ws_bytes);
    if (s == FP4MOE_SUCCESS) s = fp4moe_buffer_alloc(ctx, ws_bytes + 256, &ws);
    CHECK(st, s == FP4MOE_SUCCESS, "%s: single-GPU setup: %s", c->name, fp4moe_last_error(ctx));
    if (s == FP4MOE_SUCCESS) {
        void *d_hidden = dev_upload(ctx, hidden, (size_t)(T * H) * elt);
        void *d_logits = dev_upload(ctx, logits, (size_t)(T * E) * sizeof(float));
        void *d_ids = dev_upload(ctx, ids, (size_t)(T * k) * sizeof(int32_t));
        void *d_weights = dev_upload(ctx, weights, (size_t)(T * k) * sizeof(float));
        void *d_scale = dev_upload(ctx, scale, (size_t)T * sizeof(float));
        void *d_out = dev_upload(ctx, NULL, (size_t)(out_rows * H) * out_elt);
        fp4moe_forward_args a = case_args(c, T, d_hidden, d_logits, d_ids, d_weights, d_scale, d_out);
        s = c->routed ? fp4moe_forward_routed(plan, &a, ws, ws_bytes, NULL)
                      : fp4moe_forward(plan, &a, ws, ws_bytes, NULL);
        if (s == FP4MOE_SUCCESS) s = fp4moe_synchronize(ctx, NULL);
        if (s == FP4MOE_SUCCESS)
            s = fp4moe_buffer_download(ctx, expect, d_out, (size_t)(out_rows * H) * out_elt);
        CHECK(st, s == FP4MOE_SUCCESS, "%s: single-GPU forward: %s", c->name,
              fp4moe_last_error(ctx));
        void *bufs[] = {d_hidden, d_logits, d_ids, d_weights, d_scale, d_out, ws};
        for (int i = 0; i < 7; i++)
            fp4moe_buffer_free(ctx, bufs[i]);
    }
    fp4moe_plan_destroy(plan);
    fp4moe_context_destroy(ctx);

    rank_job jobs[MAX_RANKS];
    pthread_t threads[MAX_RANKS];
    for (int r = 0; r < size; r++) {
        rank_job *j = &jobs[r];
        memset(j, 0, sizeof *j);
        j->rank = r;
        j->comm = comms[r];
        j->layer = &layer;
        j->c = c;
        j->e0 = split[r];
        j->e_loc = split[r + 1] - split[r];
        j->t = tokens[r];
        j->hidden = hidden + (size_t)(first[r] * H) * elt;
        j->logits = logits + first[r] * E;
        j->ids = ids + first[r] * k;
        j->weights = weights + first[r] * k;
        j->scale = scale + first[r];
        j->out = got + (size_t)((c->skip_finalize ? first[r] * k : first[r]) * H) * out_elt;
        pthread_create(&threads[r], NULL, run_rank, j);
    }
    int ok = 1;
    for (int r = 0; r < size; r++) {
        pthread_join(threads[r], NULL);
        ok &= jobs[r].status == FP4MOE_SUCCESS;
        CHECK(st, jobs[r].status == FP4MOE_SUCCESS, "%s, %d ranks: rank %d: %s", c->name, size, r,
              jobs[r].message);
    }
    if (ok) {
        const int64_t n = out_rows * H;
        int64_t differ = 0, far = 0;
        float *a = malloc((size_t)n * sizeof(float) + 1), *b = malloc((size_t)n * sizeof(float) + 1);
        for (int64_t i = 0; i < n; i++) {
            a[i] = (float)ref_load(got, c->out, i);
            b[i] = (float)ref_load(expect, c->out, i);
            differ += memcmp(got + (size_t)i * out_elt, expect + (size_t)i * out_elt, out_elt) != 0;
            far += out_elt == 2 && !neighbouring_codes16(got + (size_t)i * 2, expect + (size_t)i * 2);
        }
        const double rel = testing_rel_l2_f32(a, b, n);
        printf("  %s, %d ranks, T = %lld: %lld of %lld elements differ, rel L2 %.3g\n", c->name,
               size, (long long)T, (long long)differ, (long long)n, rel);
        if (c->precision == FP4MOE_PRECISION_W4A16 && out_elt == 4)
            CHECK(st, rel < 1e-5, "%s, %d ranks: rel L2 %.3g from the single-GPU layer", c->name,
                  size, rel);
        else if (c->precision == FP4MOE_PRECISION_W4A16)
            CHECK(st, far == 0 && rel < 1e-3,
                  "%s, %d ranks: %lld elements beyond a neighbouring code, rel L2 %.3g", c->name,
                  size, (long long)far, rel);
        else
            CHECK(st, rel < 1e-3, "%s, %d ranks: rel L2 %.3g", c->name, size, rel);
        free(a);
        free(b);
    }
    free(hidden), free(calib), free(logits), free(ids), free(weights), free(scale);
    free(expect), free(got);
    ref_layer_free(&layer);
}

int main(void)
{
    testing_state st = {0, 0};
    testing_rng rng = testing_rng_from_env(TEST_NAME);
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices < 1) {
        printf("%s: skipped (no GPU)\n", TEST_NAME);
        return 0;
    }
    int size = devices < MAX_RANKS ? devices : MAX_RANKS;
    const char *env = getenv("FP4MOE_EP_RANKS");
    if (env && atoi(env) >= 1 && atoi(env) <= size) size = atoi(env);
    ncclComm_t comms[MAX_RANKS];
    int devlist[MAX_RANKS];
    for (int r = 0; r < size; r++)
        devlist[r] = r;
    ncclResult_t rc = ncclCommInitAll(comms, size, devlist);
    if (rc != ncclSuccess) {
        CHECK(&st, 0, "ncclCommInitAll(%d): %s", size, ncclGetErrorString(rc));
        return testing_finish(&st, TEST_NAME);
    }
    printf("%s: %d rank(s) over NCCL, %d GPU(s) visible\n", TEST_NAME, size, devices);
    const fp4moe_dtype F32 = FP4MOE_DTYPE_F32, BF16 = FP4MOE_DTYPE_BF16;
    const gpu_ep_case cases[] = {
        {"w4a16 bf16", 16, 256, 128, 4, FP4MOE_PRECISION_W4A16, BF16, BF16, 0, 1, 0},
        {"w4a16 f32 routed", 12, 128, 256, 2, FP4MOE_PRECISION_W4A16, F32, F32, 1, 0, 0},
        {"w4a16 bf16 skip finalize", 16, 128, 128, 3, FP4MOE_PRECISION_W4A16, BF16, F32, 0, 0, 1},
        {"w4a4 bf16", 16, 256, 128, 4, FP4MOE_PRECISION_W4A4, BF16, BF16, 0, 1, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        if (cases[i].E >= size) run_case(&st, &rng, &cases[i], size, comms);
    for (int r = 0; r < size; r++)
        ncclCommDestroy(comms[r]);
    return testing_finish(&st, TEST_NAME);
}
#endif
