// The CUDA backend's operations: upload and pad the weights once (prepare), carve the
// workspace, and queue a forward call as a few kernels on the caller's stream: routing + slot
// lists + FC1 inputs (one block for decode-sized calls), FC1 + activation, [W4A4 FC2-input
// quantisation], FC2, finalize. No allocation, no host synchronisation and no host decision on
// device data happens in forward, so a call can be captured in a CUDA graph.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.cuh"

#define MAX_DEVICE_ARRAYS 24

typedef struct cuda_state {
    int device;
    int sm_count;
    int route_warps;
    size_t route_smem;
    // calls with more tokens take the prefill path: [0] 16-bit hidden states, [1] FP32 ones
    int64_t threshold[2];
    void *arrays[MAX_DEVICE_ARRAYS];
    int num_arrays;
    cuda_plan_view view;
} cuda_state;

static fp4moe_status cuda_fail(fp4moe_plan *plan, cudaError_t err, const char *what)
{
    return fp4moe_fail(plan->ctx, FP4MOE_ERROR_CUDA, "cuda backend: %s: %s", what,
                       cudaGetErrorString(err));
}

static int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

static void cuda_release(fp4moe_plan *plan)
{
    cuda_state *st = (cuda_state *)plan->backend_state;
    if (st == NULL) return;
    int current = -1;
    if (cudaGetDevice(&current) == cudaSuccess && current != st->device) (void)cudaSetDevice(st->device);
    for (int i = 0; i < st->num_arrays; i++) (void)cudaFree(st->arrays[i]);
    (void)cudaGetLastError();
    free(st);
    plan->backend_state = NULL;
}

// Copies host bytes into a fresh device array owned by the state; NULL host -> NULL device.
static fp4moe_status upload(fp4moe_plan *plan, cuda_state *st, const void *host, size_t bytes,
                            void **out)
{
    *out = NULL;
    if (host == NULL) return FP4MOE_SUCCESS;
    if (st->num_arrays == MAX_DEVICE_ARRAYS)
        return fp4moe_fail(plan->ctx, FP4MOE_ERROR_INTERNAL, "cuda backend: too many arrays");
    cudaError_t err = cudaMalloc(out, bytes ? bytes : 1);
    if (err != cudaSuccess) {
        (void)cudaGetLastError();
        return fp4moe_fail(plan->ctx, FP4MOE_ERROR_OUT_OF_MEMORY, "cuda backend: cudaMalloc(%zu): %s",
                           bytes, cudaGetErrorString(err));
    }
    st->arrays[st->num_arrays++] = *out;
    if (bytes > 0) {
        err = cudaMemcpy(*out, host, bytes, cudaMemcpyHostToDevice);
        if (err != cudaSuccess) return cuda_fail(plan, err, "cudaMemcpy (weights)");
    }
    return FP4MOE_SUCCESS;
}

// A stack of [experts][rows][k/2] codes and [experts][rows][k/16] linear scales, uploaded
// expert by expert through one device staging buffer and repacked on the GPU into the tile
// layout (cuda_repack.cu). Plan creation only: the staging buffer is freed before returning.
static fp4moe_status upload_tiles(fp4moe_plan *plan, cuda_state *st, const uint8_t *codes,
                                  const uint8_t *scales, int64_t rows, int64_t k, int64_t kp,
                                  int gated_fc1, const uint8_t **codes_out,
                                  const uint8_t **scales_out)
{
    const int64_t experts = plan->e_loc;
    const size_t src_codes = (size_t)(rows * k / 2), src_scales = (size_t)(rows * k / 16);
    const size_t tile_codes = (size_t)(rows / CUDA_TILE_ROWS * (kp / CUDA_KGROUP) * 512);
    const size_t tile_scales = (size_t)(rows / CUDA_TILE_ROWS * (kp / CUDA_KGROUP) * 64);
    if (st->num_arrays + 2 > MAX_DEVICE_ARRAYS)
        return fp4moe_fail(plan->ctx, FP4MOE_ERROR_INTERNAL, "cuda backend: too many arrays");
    void *c = NULL, *s = NULL, *staging = NULL;
    cudaError_t err = cudaMalloc(&c, tile_codes * (size_t)experts);
    if (err == cudaSuccess) st->arrays[st->num_arrays++] = c;
    if (err == cudaSuccess) err = cudaMalloc(&s, tile_scales * (size_t)experts);
    if (err == cudaSuccess) st->arrays[st->num_arrays++] = s;
    if (err == cudaSuccess) err = cudaMalloc(&staging, src_codes + src_scales);
    if (err != cudaSuccess) {
        (void)cudaGetLastError();
        cudaFree(staging);
        return fp4moe_fail(plan->ctx, FP4MOE_ERROR_OUT_OF_MEMORY, "cuda backend: cudaMalloc: %s",
                           cudaGetErrorString(err));
    }
    const int gate_first = plan->cfg.gate_up_order == FP4MOE_GATE_UP;
    for (int64_t e = 0; e < experts && err == cudaSuccess; e++) {
        err = cudaMemcpy(staging, codes + (size_t)e * src_codes, src_codes, cudaMemcpyHostToDevice);
        if (err == cudaSuccess)
            err = cudaMemcpy((uint8_t *)staging + src_codes, scales + (size_t)e * src_scales,
                             src_scales, cudaMemcpyHostToDevice);
        if (err == cudaSuccess)
            err = cuda_launch_repack((const uint8_t *)staging, (const uint8_t *)staging + src_codes,
                                     rows, k, kp, gated_fc1, gate_first, plan->cfg.intermediate_size,
                                     (uint8_t *)c + (size_t)e * tile_codes,
                                     (uint8_t *)s + (size_t)e * tile_scales);
    }
    if (err == cudaSuccess) err = cudaDeviceSynchronize();
    cudaFree(staging);
    *codes_out = (const uint8_t *)c;
    *scales_out = (const uint8_t *)s;
    if (err != cudaSuccess) return cuda_fail(plan, err, "weight upload / repack");
    return FP4MOE_SUCCESS;
}

// The prefill path's permuted rows for `slots` (token, slot) pairs: every local expert padded to
// whole tiles (at most 256 rows each), plus one tile of slack (the workspace layout's bound).
static int64_t prefill_rows(const cuda_plan_view *v, int64_t slots) { return slots + (v->e_loc + 1) * 256; }

// A measurement switch from the environment: 0 or 1 as set, -1 (automatic) when unset or any
// other value.
static int env_switch(const char *name)
{
    const char *value = getenv(name);
    return value == NULL ? -1 : strcmp(value, "0") == 0 ? 0 : strcmp(value, "1") == 0 ? 1 : -1;
}

static fp4moe_status cuda_prepare(fp4moe_plan *plan)
{
    const fp4moe_config *cfg = &plan->cfg;
    cuda_state *st = (cuda_state *)calloc(1, sizeof *st);
    if (st == NULL) return fp4moe_fail(plan->ctx, FP4MOE_ERROR_OUT_OF_MEMORY, "cuda backend state");
    plan->backend_state = st;
    st->device = plan->ctx->cuda_device;
    // FP4MOE_DECODE_THRESHOLD_AUTO: decode while a call has at most 5.5 (token, slot) rows per
    // expert on average (T * k <= 5.5 * E) with 16-bit hidden states, 10 with FP32 ones (whose
    // prefill GEMMs multiply two FP16 parts), where the two paths cross over on the H100
    // (docs/PERF.md, "Decode/prefill crossover, session 10")
    const int64_t experts = plan->cfg.num_experts, k = plan->cfg.top_k, th = plan->cfg.decode_threshold;
    st->threshold[0] = th >= 0 ? th : 11 * experts / (2 * k);
    st->threshold[1] = th >= 0 ? th : 10 * experts / k;
    cudaError_t err = cudaSetDevice(st->device);
    if (err == cudaSuccess)
        err = cudaDeviceGetAttribute(&st->sm_count, cudaDevAttrMultiProcessorCount, st->device);
    if (err != cudaSuccess) {
        fp4moe_status s = cuda_fail(plan, err, "device setup");
        cuda_release(plan);
        return s;
    }

    const int64_t e_loc = plan->e_loc, n1 = plan->n1, h = cfg->hidden_size;
    const int64_t inter = cfg->intermediate_size, e = cfg->num_experts;
    cuda_plan_view *v = &st->view;
    v->num_experts = e, v->e_loc = e_loc, v->e0 = cfg->local_expert_offset;
    v->top_k = cfg->top_k, v->h = h, v->inter = inter, v->n1 = n1;
    v->k1p = round_up(h, CUDA_KGROUP), v->k2p = round_up(inter, CUDA_KGROUP);
    v->gated = plan->gated, v->gate_first = cfg->gate_up_order == FP4MOE_GATE_UP;
    v->activation = cfg->activation, v->routing = cfg->routing;
    v->n_group = cfg->n_group, v->topk_group = cfg->topk_group;
    v->norm_topk_prob = cfg->norm_topk_prob, v->routed_scaling_factor = cfg->routed_scaling_factor;
    v->on_input = cfg->apply_router_weight_on_input != 0;
    v->w4a4 = cfg->precision == FP4MOE_PRECISION_W4A4;
    v->fp8_down = cfg->fc2_input_fp8 != 0;
    // The prefill GEMMs address one expert's repacked matrix and the workspace's B rows (FP16,
    // two parts, a whole chunk's slots) in 16-byte units held in 32 bits (cuda_grouped_gemm.cu).
    const double units = 65536.0 * 65536.0 * 16.0;
    const double rows_max = (double)prefill_rows(v, CUDA_PREFILL_CHUNK * v->top_k);
    if ((double)n1 * v->k1p / 2 >= units || (double)h * v->k2p / 2 >= units ||
        rows_max * 4.0 * (double)(v->k1p > v->k2p ? v->k1p : v->k2p) >= units) {
        cuda_release(plan);
        return fp4moe_fail(plan->ctx, FP4MOE_ERROR_UNSUPPORTED,
                           "cuda backend: an expert matrix or the prefill workspace's rows reach 64 GiB "
                           "(hidden_size %lld, intermediate_size %lld, top_k %lld)",
                           (long long)h, (long long)inter, (long long)v->top_k);
    }
    // The prefill GEMMs: wgmma where this build has sm_90a code for the device; the mma.sync
    // kernels otherwise, or when FP4MOE_CUDA_MMA_SYNC=1 asks for them (tests, comparisons).
    err = cuda_gemm_has_wgmma(&v->wgmma);
    if (err != cudaSuccess) {
        fp4moe_status s = cuda_fail(plan, err, "wgmma probe");
        cuda_release(plan);
        return s;
    }
    const char *force_mma = getenv("FP4MOE_CUDA_MMA_SYNC");
    if (force_mma != NULL && strcmp(force_mma, "1") == 0) v->wgmma = 0;
    // Tuning knob for measurements: FP4MOE_CUDA_TILE_TOKENS=64|128|256 fixes the prefill tile.
    const char *tile = getenv("FP4MOE_CUDA_TILE_TOKENS");
    if (tile != NULL) {
        const int t = atoi(tile);
        if (t == 64 || t == 128 || (t == 256 && v->wgmma)) v->tile_tokens = t;
    }
    // The decode GEMVs run a block or a warp per tile, chosen per GEMV by T and H (launch_experts,
    // docs/PERF.md decode v10); FP4MOE_CUDA_DECODE_WARP_TILE=0 or 1 fixes the choice of both for every T,
    // =fc1 or =fc2 gives that GEMV alone a warp per tile (measurements, tests); any other value
    // leaves it to the token count.
    const char *warp_tile = getenv("FP4MOE_CUDA_DECODE_WARP_TILE");
    v->decode_warp_tile = -1;
    if (warp_tile != NULL) {
        if (strcmp(warp_tile, "0") == 0) v->decode_warp_tile = 0;
        else if (strcmp(warp_tile, "1") == 0) v->decode_warp_tile = CUDA_WT_FC1 | CUDA_WT_FC2;
        else if (strcmp(warp_tile, "fc1") == 0) v->decode_warp_tile = CUDA_WT_FC1;
        else if (strcmp(warp_tile, "fc2") == 0) v->decode_warp_tile = CUDA_WT_FC2;
    }
    // FP4MOE_CUDA_DECODE_FC2_DIRECT=0|1: FC1's epilogue writes the decode FC2 inputs (1) in every
    // decode chunk that allows it, or never (0: the FC2-input kernel, row scale from the row's
    // amax); unset or any other value: one-token chunks (cuda_forward)
    v->fc2_direct = env_switch("FP4MOE_CUDA_DECODE_FC2_DIRECT");
    // FP4MOE_CUDA_DECODE_TOKEN_FINALIZE=0|1: one-token chunks run FC2 and the finalize as one
    // kernel (1) or two (0); unset or any other value: automatic (launch_experts)
    v->token_finalize = env_switch("FP4MOE_CUDA_DECODE_TOKEN_FINALIZE");
    // wgmma blocks of 128 or 256 weight rows, chosen per call (0, cuda_prefill.cu);
    // FP4MOE_CUDA_GEMM_ROWS=128|256 fixes it (256 not with 256-token tiles: too many accumulators)
    const char *rows = getenv("FP4MOE_CUDA_GEMM_ROWS");
    v->gemm_rows = rows == NULL ? 0
                   : strcmp(rows, "256") == 0 && v->tile_tokens != 256 ? 256
                   : strcmp(rows, "128") == 0 ? 128 : 0;
    // FP4MOE_CUDA_STOP_AFTER=1..4: the decode path launches only its first n kernels (front,
    // FC1, FC2 inputs, FC2; the FC2-input step launches nothing in fc2_direct chunks): the
    // in-graph cost of each step, by difference; outputs undefined
    const char *stop = getenv("FP4MOE_CUDA_STOP_AFTER");
    v->stop_after = stop != NULL ? atoi(stop) : 0;

    // Routing scratch: as many warps per block as fit (the front block has 16 warps).
    const size_t per_warp = cuda_route_smem_bytes(e, 1);
    if (per_warp > ROUTE_SMEM_LIMIT) {
        cuda_release(plan);
        return fp4moe_fail(plan->ctx, FP4MOE_ERROR_UNSUPPORTED,
                           "cuda backend: num_experts = %lld needs more routing scratch than a block has",
                           (long long)e);
    }
    st->route_warps = (int)(ROUTE_SMEM_LIMIT / per_warp);
    if (st->route_warps > CUDA_FRONT_THREADS / 32) st->route_warps = CUDA_FRONT_THREADS / 32;
    st->route_smem = cuda_route_smem_bytes(e, st->route_warps);
    err = cuda_front_set_smem(st->route_smem);
    if (err != cudaSuccess) {
        fp4moe_status s = cuda_fail(plan, err, "cudaFuncSetAttribute");
        cuda_release(plan);
        return s;
    }

    const plan_weights *w = &plan->w;
    const size_t fe = (size_t)e_loc * sizeof(float);
    void *p = NULL;
    fp4moe_status status = upload_tiles(plan, st, w->w1, w->w1_scale, n1, h, v->k1p, plan->gated,
                                        &v->w1_codes, &v->w1_scales);
    if (status == FP4MOE_SUCCESS)
        status = upload_tiles(plan, st, w->w2, w->w2_scale, h, inter, v->k2p, 0, &v->w2_codes,
                              &v->w2_scales);
#define UPLOAD(field, host, bytes)                                                         \
    if (status == FP4MOE_SUCCESS) {                                                        \
        status = upload(plan, st, host, bytes, &p);                                        \
        v->field = (const float *)p;                                                       \
    }
    UPLOAD(w1_global, w->w1_global, fe)
    UPLOAD(w1_global_half2, w->w1_global_half2, fe)
    UPLOAD(w2_global, w->w2_global, fe)
    UPLOAD(b1, w->b1, fe * (size_t)n1)
    UPLOAD(b2, w->b2, fe * (size_t)h)
    UPLOAD(routing_bias, w->routing_bias, (size_t)e * sizeof(float))
    UPLOAD(a1_global, w->a1_global, fe)
    UPLOAD(a2_global, w->a2_global, fe)
    UPLOAD(fp8_scale, w->fc2_input_fp8_scale, fe)
    UPLOAD(swiglu_alpha, w->swiglu_alpha, fe)
    UPLOAD(swiglu_beta, w->swiglu_beta, fe)
    UPLOAD(swiglu_limit, w->swiglu_limit, fe)
#undef UPLOAD
    if (status != FP4MOE_SUCCESS) cuda_release(plan);
    return status;
}

// ------------------------------------------------------------------ workspace
static size_t align256(size_t n) { return (n + 255) / 256 * 256; }

static int x_per_slot(const cuda_plan_view *v) { return v->on_input || v->w4a4; }

// The prefill path's tiling of a chunk of `chunk` tokens: tokens per GEMM tile and the most
// tiles it can need (every expert's last tile may be partial). 128-token tiles from 64 rows per
// expert on average where the wgmma kernels multiply only a tile's filled quarters (one B part:
// FP16/BF16 hidden states), so that a half-filled 128-token tile costs one weight decode where
// two 64-token tiles cost two (H100, docs/PERF.md prefill v10: 6-7% faster at 64 rows per
// expert, 14% slower at 32); from 96 where whole tiles are multiplied (mma.sync, or FP32 hidden
// states). 256 measured slower.
static int prefill_tile_tokens(const cuda_plan_view *v, int64_t chunk, int parts)
{
    const int64_t rows = chunk * v->top_k; // over num_experts experts on average
    if (v->tile_tokens) return v->tile_tokens;
    return rows >= (v->wgmma && parts == 1 ? 64 : 96) * v->num_experts ? 128 : 64;
}
static int64_t prefill_max_tiles(const cuda_plan_view *v, int64_t chunk, int tile_tokens)
{
    return (chunk * v->top_k + tile_tokens - 1) / tile_tokens + v->e_loc;
}

#define WS_REGIONS 20

// Offsets of every region for a call of num_tokens tokens; returns the total. Calls above the
// decode threshold take the prefill path, whose regions are sized for its largest chunk.
static size_t layout(const cuda_plan_view *v, int64_t threshold, int64_t num_tokens,
                     size_t off[WS_REGIONS])
{
    const int64_t k = v->top_k;
    size_t sizes[WS_REGIONS] = {0};
    sizes[0] = sizes[1] = (size_t)(num_tokens * k) * 4; // ids, weights
    sizes[3] = (size_t)v->e_loc * 4;                     // counts
    if (num_tokens <= threshold) {
        const int64_t chunk = num_tokens < CUDA_TOKEN_CHUNK ? num_tokens : CUDA_TOKEN_CHUNK;
        const int64_t slots = chunk * k, x_rows = x_per_slot(v) ? slots : chunk;
        sizes[2] = (size_t)slots * 4;
        sizes[4] = (size_t)(1 + slots) * 4, sizes[5] = (size_t)(slots + 1) * 4;
        sizes[6] = (size_t)slots * 4;
        sizes[7] = sizes[8] = (size_t)(x_rows * v->k1p) * 4;
        sizes[9] = sizes[10] = (size_t)x_rows * 4;
        sizes[11] = sizes[12] = (size_t)(slots * v->k2p) * 4;
        sizes[13] = (size_t)slots * 4;
        sizes[14] = (size_t)(slots * v->h) * 4;
    } else {
        const int64_t chunk = num_tokens < CUDA_PREFILL_CHUNK ? num_tokens : CUDA_PREFILL_CHUNK;
        const int64_t slots = chunk * k, x_rows = x_per_slot(v) ? slots : chunk;
        // bounds over both tile sizes (a last, smaller chunk may use the other one)
        const int64_t max_tiles = prefill_max_tiles(v, chunk, 64) + 1;
        const int64_t rows = prefill_rows(v, slots);
        sizes[2] = (size_t)slots * 4;
        sizes[3] = (size_t)(cuda_prefill_perm_blocks(slots) * v->e_loc) * 4;
        sizes[10] = (size_t)x_rows * 4;
        sizes[11] = (size_t)(rows * v->k2p) * 4;
        sizes[13] = (size_t)rows * 4;
        sizes[14] = (size_t)(slots * v->h) * 4;
        sizes[15] = (size_t)rows * 4;
        sizes[16] = (size_t)max_tiles * 8;
        sizes[17] = 4;
        sizes[18] = (size_t)(x_rows * 2 * v->k1p) * 2;
        sizes[19] = (size_t)(rows * 2 * v->k2p) * 2;
    }
    size_t total = 0;
    for (int i = 0; i < WS_REGIONS; i++) {
        off[i] = total;
        total += align256(sizes[i]);
    }
    return total;
}

// (a call's hidden dtype picks its threshold: the size covers either path's layout)
static size_t cuda_workspace_size(const fp4moe_plan *plan, int64_t num_tokens)
{
    size_t off[WS_REGIONS];
    const cuda_state *st = (const cuda_state *)plan->backend_state;
    const size_t a = layout(&st->view, st->threshold[0], num_tokens, off);
    const size_t b = layout(&st->view, st->threshold[1], num_tokens, off);
    return a > b ? a : b;
}

static cuda_workspace carve(const cuda_plan_view *v, int64_t threshold, int64_t num_tokens,
                            void *base)
{
    size_t off[WS_REGIONS];
    layout(v, threshold, num_tokens, off);
    uint8_t *b = (uint8_t *)base;
    cuda_workspace ws;
    ws.ids = (int32_t *)(b + off[0]);
    ws.weights = (float *)(b + off[1]);
    ws.slot_local = (int32_t *)(b + off[2]);
    ws.counts = (int32_t *)(b + off[3]);
    ws.touched = (int32_t *)(b + off[4]);
    ws.touched_begin = (int32_t *)(b + off[5]);
    ws.entries = (int32_t *)(b + off[6]);
    ws.x = (float *)(b + off[7]);
    ws.xh = b + off[8];
    ws.x_amax = (int32_t *)(b + off[9]);
    ws.x_scale = (float *)(b + off[10]);
    ws.u = (float *)(b + off[11]);
    ws.uh = b + off[12];
    ws.u_scale = (float *)(b + off[13]);
    ws.y = (float *)(b + off[14]);
    ws.perm = (int32_t *)(b + off[15]);
    ws.tile_list = (int2 *)(b + off[16]);
    ws.num_tiles = (int32_t *)(b + off[17]);
    ws.xb = (__half *)(b + off[18]);
    ws.ub = (__half *)(b + off[19]);
    return ws;
}

static cudaError_t use_device(int device)
{
    int current = -1;
    cudaError_t err = cudaGetDevice(&current);
    if (err == cudaSuccess && current != device) err = cudaSetDevice(device);
    return err;
}

// ------------------------------------------------------------------ forward and route
static fp4moe_status cuda_forward(fp4moe_plan *plan, const forward_call *call, void *workspace,
                                  size_t workspace_bytes, void *stream_ptr)
{
    (void)workspace_bytes;
    cuda_state *st = (cuda_state *)plan->backend_state;
    const cuda_plan_view *v = &st->view;
    cudaStream_t stream = (cudaStream_t)stream_ptr;
    cudaError_t err = use_device(st->device);
    if (err != cudaSuccess) return cuda_fail(plan, err, "cudaSetDevice");
    const int64_t t_total = call->num_tokens;
    const int64_t threshold = st->threshold[call->hidden_dtype == FP4MOE_DTYPE_F32];
    const cuda_workspace ws = carve(v, threshold, t_total, workspace);

    cuda_route_source src;
    memset(&src, 0, sizeof src);
    src.logits = call->router_logits;
    src.logits_dtype = call->router_logits_dtype;
    src.topk_ids = call->topk_ids;
    src.topk_weights = call->topk_weights;
    src.topk_weights_dtype = call->topk_weights_dtype;
    src.ids_out = call->topk_ids_out;
    src.weights_out = call->topk_weights_out;

    const int prefill = t_total > threshold;
    const int fused = !prefill && t_total <= CUDA_FUSED_FRONT_MAX_TOKENS && t_total <= CUDA_TOKEN_CHUNK;
    if (!fused) {
        err = cuda_launch_route(v, t_total, &src, &ws, st->route_warps, st->route_smem, stream);
        if (err != cudaSuccess) return cuda_fail(plan, err, "routing kernel");
    }
    cuda_call_view c;
    memset(&c, 0, sizeof c);
    c.hidden = call->hidden_states;
    c.hidden_dtype = call->hidden_dtype;
    c.output = call->output;
    c.output_dtype = call->output_dtype;
    c.finalize = call->finalize;
    c.per_token_scale = call->per_token_scale;
    c.x_per_slot = x_per_slot(v);
    // B rows: FP32 activations enter the tensor cores as FP16 hi + lo parts; FP16/BF16 ones,
    // and the FC2 inputs made from them (rounded to the hidden dtype or quantised), in one
    c.parts = call->hidden_dtype == FP4MOE_DTYPE_F32 ? 2 : 1;
    // Decode FC2 inputs straight from FC1's epilogue where they are 16-bit values with row scale
    // 1 (16-bit hidden states except W4A4, whose FC2 inputs are quantised per row block): one
    // dependent kernel fewer. One-token chunks only: 1 us faster there (qwen3-30b-a3b 0.028 ->
    // 0.027 ms, nemotron 0.035 -> 0.034), even at 4 tokens and up to 1.7% slower at 16, where
    // the BF16 FC2's longer decode outweighs the saved kernel (docs/PERF.md, decode v12).
    const int direct_ok = !prefill && c.parts == 1 && !v->w4a4;
    const int64_t chunk = prefill ? CUDA_PREFILL_CHUNK : CUDA_TOKEN_CHUNK;
    for (int64_t t0 = 0; t0 < t_total; t0 += chunk) {
        c.t0 = t0;
        c.t1 = t0 + chunk < t_total ? t0 + chunk : t_total;
        c.fc2_direct = direct_ok && (v->fc2_direct == 1 || (v->fc2_direct < 0 && c.t1 - c.t0 == 1));
        if (prefill) {
            const int tile = prefill_tile_tokens(v, c.t1 - c.t0, c.parts);
            err = cuda_launch_prefill(v, &c, &ws, tile, prefill_max_tiles(v, c.t1 - c.t0, tile), stream);
            if (err != cudaSuccess) return cuda_fail(plan, err, "prefill kernels");
            continue;
        }
        // the fused front routes with one warp per token: scratch for that many warps only (a
        // smaller shared-memory need than the plan's bound)
        const int warps = fused && c.t1 - c.t0 < st->route_warps ? (int)(c.t1 - c.t0) : st->route_warps;
        err = cuda_launch_front(v, &c, &ws, &src, fused, warps, cuda_route_smem_bytes(v->num_experts, warps),
                                stream);
        if (err != cudaSuccess) return cuda_fail(plan, err, "front kernel");
        err = cuda_launch_experts(v, &c, &ws, stream);
        if (err != cudaSuccess) return cuda_fail(plan, err, "expert kernels");
    }
    return FP4MOE_SUCCESS;
}

static fp4moe_status cuda_route(fp4moe_plan *plan, int64_t num_tokens, const void *logits,
                                fp4moe_dtype logits_dtype, int32_t *ids_out, float *weights_out,
                                void *workspace, size_t workspace_bytes, void *stream_ptr)
{
    (void)workspace;
    (void)workspace_bytes;
    cuda_state *st = (cuda_state *)plan->backend_state;
    cudaError_t err = use_device(st->device);
    if (err != cudaSuccess) return cuda_fail(plan, err, "cudaSetDevice");
    cuda_route_source src;
    memset(&src, 0, sizeof src);
    src.logits = logits;
    src.logits_dtype = logits_dtype;
    cuda_workspace ws;
    memset(&ws, 0, sizeof ws);
    ws.ids = ids_out;
    ws.weights = weights_out;
    err = cuda_launch_route(&st->view, num_tokens, &src, &ws, st->route_warps, st->route_smem,
                            (cudaStream_t)stream_ptr);
    if (err != cudaSuccess) return cuda_fail(plan, err, "routing kernel");
    return FP4MOE_SUCCESS;
}

static const backend_ops cuda_ops = {"cuda", cuda_prepare, cuda_release, cuda_workspace_size,
                                     cuda_forward, cuda_route, NULL};

extern "C" const backend_ops *cuda_backend_get_ops(void) { return &cuda_ops; }
