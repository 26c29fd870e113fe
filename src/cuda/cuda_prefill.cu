// The prefill path of one token chunk, after routing: (1) three launches group the chunk's
// (token, slot) pairs by local expert into tiles of tile_tokens rows (counts, padded offsets, the
// tile list, the permutation; all on the GPU); (2) the FC1 input rows as FP16 with a power-of-two row
// scale; (3) the grouped FC1 GEMM + activation (cuda_grouped_gemm.cu); (4) the FC2 input rows
// (W4A4 quantisation, FP16); (5) the grouped FC2 GEMM; (6) finalize (cuda_experts.cu). Every
// launch is a programmatic dependent of the one before; nothing is decided on the host from
// device data, so a call can be captured in a CUDA graph.
#include "cuda_device.cuh"

#define PERM_THREADS 1024
#define PERM_SLOTS (4 * PERM_THREADS) /* chunk slots per block of the count and place kernels */
#define ROW_THREADS 256

// ------------------------------------------------------------------ permutation
// Warp-aggregated shared-memory atomics: the lanes of a warp with the same expert add once.
static __device__ __forceinline__ int warp_aggregated_add(int *counter, int key, int lane, int *rank)
{
    const unsigned peers = __match_any_sync(FULL_MASK, key);
    const int leader = __ffs(peers) - 1;
    int base = 0;
    if (key >= 0 && lane == leader) base = atomicAdd(counter, __popc(peers));
    base = __shfl_sync(FULL_MASK, base, leader);
    *rank = __popc(peers & ((1u << lane) - 1));
    return base;
}

// The permutation in three launches (one block over a whole chunk took ~0.2 ms at 64K slots):
// (1) each block counts its PERM_SLOTS slots per local expert (shared-memory histogram) into row
// b of ws.counts [blocks][e_loc]; (2) one block sums the rows per expert, lays out the padded
// expert ranges, the tile list and the padding rows, and turns row b into block b's first row in
// each expert; (3) each block places its slots from there.
static __device__ __forceinline__ int slot_key(const cuda_plan_view &p, const cuda_call_view &c,
                                               const cuda_workspace &ws, int64_t s)
{
    // ids outside [0, E) fall outside the local range too and contribute nothing
    const int64_t local = (int64_t)ws.ids[c.t0 * p.top_k + s] - p.e0;
    return local >= 0 && local < p.e_loc ? (int)local : -1;
}

__global__ void __launch_bounds__(PERM_THREADS)
prefill_count_kernel(cuda_plan_view p, cuda_call_view c, cuda_workspace ws)
{
    extern __shared__ int hist[]; // [e_loc]
    wait_for_previous_kernel();
    const int64_t slots = (c.t1 - c.t0) * p.top_k, s0 = (int64_t)blockIdx.x * PERM_SLOTS;
    const int e_loc = (int)p.e_loc, tid = threadIdx.x, lane = tid % 32;
    for (int e = tid; e < e_loc; e += PERM_THREADS) hist[e] = 0;
    __syncthreads();
    // whole warps iterate together (the aggregation needs every lane)
    for (int i = tid - lane; i < PERM_SLOTS; i += PERM_THREADS) {
        const int64_t s = s0 + i + lane;
        const int key = s < slots ? slot_key(p, c, ws, s) : -1;
        if (s < slots) ws.slot_local[s] = key;
        int rank;
        warp_aggregated_add(&hist[key < 0 ? 0 : key], key, lane, &rank);
    }
    __syncthreads();
    allow_next_kernel();
    for (int e = tid; e < e_loc; e += PERM_THREADS) ws.counts[blockIdx.x * e_loc + e] = hist[e];
}

__global__ void __launch_bounds__(PERM_THREADS)
prefill_layout_kernel(cuda_plan_view p, cuda_call_view c, cuda_workspace ws, int tile_tokens, int blocks)
{
    extern __shared__ int total[]; // [e_loc]
    wait_for_previous_kernel();
    const int e_loc = (int)p.e_loc, tid = threadIdx.x;
    for (int e = tid; e < e_loc; e += PERM_THREADS) {
        int sum = 0;
        for (int b = 0; b < blocks; b++) sum += ws.counts[b * e_loc + e];
        total[e] = sum;
    }
    __syncthreads();
    // Each thread owns a contiguous run of experts: its rows (padded to whole tiles) and tiles.
    const int per = (e_loc + PERM_THREADS - 1) / PERM_THREADS;
    const int e_begin = min(e_loc, tid * per), e_end = min(e_loc, e_begin + per);
    int my_rows = 0;
    for (int e = e_begin; e < e_end; e++) my_rows += (total[e] + tile_tokens - 1) / tile_tokens * tile_tokens;
    int total_rows;
    int row = block_exclusive_scan(my_rows, &total_rows);
    for (int e = e_begin; e < e_end; e++) {
        const int n = total[e], padded = (n + tile_tokens - 1) / tile_tokens * tile_tokens;
        for (int r = row; r < row + padded; r += tile_tokens) ws.tile_list[r / tile_tokens] = make_int2(e, r);
        // (the padding ends the expert's last tile: the GEMMs multiply a tile's filled quarters)
        for (int r = row + n; r < row + padded; r++) ws.perm[r] = -1;
        // block b's slots of expert e start after those of blocks 0..b-1
        int first = row;
        for (int b = 0; b < blocks; b++) {
            const int n_b = ws.counts[b * e_loc + e];
            ws.counts[b * e_loc + e] = first;
            first += n_b;
        }
        row += padded;
    }
    if (tid == 0) *ws.num_tiles = total_rows / tile_tokens;
    allow_next_kernel();
}

// Rows of an expert in any order within a block: each column of a GEMM is computed on its own,
// so the order changes no bit of any result.
__global__ void __launch_bounds__(PERM_THREADS)
prefill_place_kernel(cuda_plan_view p, cuda_call_view c, cuda_workspace ws)
{
    extern __shared__ int cursor[]; // [e_loc]
    wait_for_previous_kernel();
    const int64_t slots = (c.t1 - c.t0) * p.top_k, s0 = (int64_t)blockIdx.x * PERM_SLOTS;
    const int e_loc = (int)p.e_loc, tid = threadIdx.x, lane = tid % 32;
    for (int e = tid; e < e_loc; e += PERM_THREADS) cursor[e] = ws.counts[blockIdx.x * e_loc + e];
    __syncthreads();
    for (int i = tid - lane; i < PERM_SLOTS; i += PERM_THREADS) {
        const int64_t s = s0 + i + lane;
        const int key = s < slots ? ws.slot_local[s] : -1;
        int rank;
        const int first = warp_aggregated_add(&cursor[key < 0 ? 0 : key], key, lane, &rank);
        if (key >= 0) ws.perm[first + rank] = (int32_t)s;
    }
    allow_next_kernel();
}

// ------------------------------------------------------------------ FP16 rows
static __device__ float block_max(float v)
{
    __shared__ float warp_max[ROW_THREADS / 32];
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, off));
    if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = v;
    __syncthreads();
    v = 0.0f;
    for (int w = 0; w < ROW_THREADS / 32; w++) v = fmaxf(v, warp_max[w]);
    return v;
}

// The row's power-of-two scale from the block's values (amax: this thread's share), stored by
// thread 0 at *scale; returns its inverse.
static __device__ __forceinline__ float block_row_scale(float amax, float *scale)
{
    float inverse;
    const float s = row_scale_from_amax(block_max(amax), &inverse);
    if (threadIdx.x == 0) *scale = s;
    return inverse;
}

// 16 values times inverse as FP16 parts (hi, and lo = the rest when parts == 2) at dst[0..15],
// dst[kp..kp+15].
static __device__ __forceinline__ void store_parts16(const float v[16], float inverse, int parts,
                                                     int64_t kp, __half *dst)
{
    __half hi[16], lo[16];
#pragma unroll
    for (int j = 0; j < 16; j++) {
        const float x = v[j] * inverse;
        hi[j] = __float2half_rn(x);
        lo[j] = __float2half_rn(x - __half2float(hi[j]));
    }
    uint4 *d = reinterpret_cast<uint4 *>(dst);
    d[0] = *reinterpret_cast<const uint4 *>(hi);
    d[1] = *reinterpret_cast<const uint4 *>(hi + 8);
    if (parts == 2) {
        uint4 *dl = reinterpret_cast<uint4 *>(dst + kp);
        dl[0] = *reinterpret_cast<const uint4 *>(lo);
        dl[1] = *reinterpret_cast<const uint4 *>(lo + 8);
    }
}

// Block b (16 values) of FC1 input row `row`, as prepare_slot_inputs (cuda_front.cu) makes it:
// the hidden state, times the router weight (on input), W4A4-quantised; zero past h.
static __device__ __forceinline__ void fc1_input_block(const cuda_plan_view &p, const cuda_call_view &c,
                                                       const cuda_workspace &ws, int64_t row,
                                                       int64_t t, int local, int64_t b, float v[16])
{
#pragma unroll
    for (int j = 0; j < 16; j++) {
        const int64_t col = b * 16 + j;
        v[j] = col < p.h ? load_as_f32(c.hidden, c.hidden_dtype, t * p.h + col) : 0.0f;
    }
    if (b * 16 >= p.h) return;
    if (p.on_input) {
        const float w = ws.weights[c.t0 * p.top_k + row];
#pragma unroll
        for (int j = 0; j < 16; j++) v[j] = round_to_dtype_dev(__fmul_rn(w, v[j]), c.hidden_dtype);
    }
    if (p.w4a4) nvfp4_fake_quantize16(v, p.a1_global[local]);
}

// One block per FC1 input row (a token, or a slot when the input depends on the slot).
__global__ void __launch_bounds__(ROW_THREADS)
prefill_fc1_input_kernel(cuda_plan_view p, cuda_call_view c, cuda_workspace ws)
{
    wait_for_previous_kernel();
    const int64_t row = blockIdx.x;
    const int64_t t = c.t0 + (c.x_per_slot ? row / p.top_k : row);
    const int local = c.x_per_slot ? ws.slot_local[row] : 0;
    if (local < 0) return; // never read
    const int64_t blocks = p.k1p / 16;
    float amax = 0.0f, v[16];
    for (int64_t b = threadIdx.x; b < blocks; b += ROW_THREADS) {
        fc1_input_block(p, c, ws, row, t, local, b, v);
#pragma unroll
        for (int j = 0; j < 16; j++) amax = fmaxf(amax, fabsf(v[j]));
    }
    const float inverse = block_row_scale(amax, ws.x_scale + row);
    for (int64_t b = threadIdx.x; b < blocks; b += ROW_THREADS) {
        fc1_input_block(p, c, ws, row, t, local, b, v); // again: cheaper than keeping the row
        store_parts16(v, inverse, c.parts, p.k1p, ws.xb + row * c.parts * p.k1p + b * 16);
    }
    allow_next_kernel();
}

// Eight 16-bit values (FP16 or BF16 bits) as floats.
static __device__ __forceinline__ void unpack8(uint4 w, bool bf16, float v[8])
{
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const uint32_t lo = words[j] & 0xffffu, hi = words[j] >> 16;
        v[2 * j] = bf16 ? __uint_as_float(lo << 16) : __half2float(__ushort_as_half((uint16_t)lo));
        v[2 * j + 1] = bf16 ? __uint_as_float(hi << 16) : __half2float(__ushort_as_half((uint16_t)hi));
    }
}

// The FC1 input rows of 16-bit hidden states when every slot of a token reads the same row (no
// router weight on the input, no W4A4): 16-byte loads, the row kept in registers from its amax
// to its stores (the general kernel above reads 2-byte values, twice). Same values.
#define FC1_INPUT16_CHUNKS 4 /* 8-value chunks per thread: rows up to 8192 values */
__global__ void __launch_bounds__(ROW_THREADS)
prefill_fc1_input16_kernel(cuda_plan_view p, cuda_call_view c, cuda_workspace ws)
{
    wait_for_previous_kernel();
    const int64_t row = blockIdx.x;
    const uint16_t *hidden = static_cast<const uint16_t *>(c.hidden) + (c.t0 + row) * p.h;
    const uint4 *src = reinterpret_cast<const uint4 *>(hidden);
    const int chunks = (int)(p.h / 8), out_chunks = (int)(p.k1p / 8);
    const bool bf16 = c.hidden_dtype == FP4MOE_DTYPE_BF16;
    uint4 w[FC1_INPUT16_CHUNKS];
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < FC1_INPUT16_CHUNKS; j++) {
        const int i = threadIdx.x + j * ROW_THREADS;
        w[j] = i < chunks ? src[i] : make_uint4(0, 0, 0, 0); // zero past h
        float v[8];
        unpack8(w[j], bf16, v);
#pragma unroll
        for (int k = 0; k < 8; k++) amax = fmaxf(amax, fabsf(v[k]));
    }
    const float inverse = block_row_scale(amax, ws.x_scale + row);
    uint4 *dst = reinterpret_cast<uint4 *>(ws.xb + row * p.k1p);
#pragma unroll
    for (int j = 0; j < FC1_INPUT16_CHUNKS; j++) {
        const int i = threadIdx.x + j * ROW_THREADS;
        if (i >= out_chunks) break;
        float v[8];
        unpack8(w[j], bf16, v);
        uint32_t o[4];
#pragma unroll
        for (int k = 0; k < 4; k++)
            o[k] = pack_half2(__float2half_rn(v[2 * k] * inverse), __float2half_rn(v[2 * k + 1] * inverse));
        dst[i] = make_uint4(o[0], o[1], o[2], o[3]);
    }
    allow_next_kernel();
}

// Block b (16 values) of an FC2 input row as FC1's epilogue stored it (FP32, or the 16-bit
// hidden dtype), W4A4-quantised with scale a2 when w4a4; zero from block `live` on (padding).
static __device__ __forceinline__ void fc2_input_block(const void *row, int dtype, int64_t b, int64_t live,
                                                       bool w4a4, float a2, float v[16])
{
    if (b >= live) {
#pragma unroll
        for (int j = 0; j < 16; j++) v[j] = 0.0f;
        return;
    }
    if (dtype == FP4MOE_DTYPE_F32) {
        const float4 *src = reinterpret_cast<const float4 *>(row) + b * 4;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const float4 f = src[j];
            v[4 * j] = f.x, v[4 * j + 1] = f.y, v[4 * j + 2] = f.z, v[4 * j + 3] = f.w;
        }
    } else {
        const uint4 *src = reinterpret_cast<const uint4 *>(row) + b * 2;
        unpack8(src[0], dtype == FP4MOE_DTYPE_BF16, v);
        unpack8(src[1], dtype == FP4MOE_DTYPE_BF16, v + 8);
    }
    if (w4a4) nvfp4_fake_quantize16(v, a2);
}

// One warp per padded row: the FC2 input W4A4-quantised with the expert's a2 scale (again in the
// second pass: cheaper than writing it back), then as FP16 parts with its row scale. Padding
// columns are zero.
__global__ void __launch_bounds__(ROW_THREADS)
prefill_fc2_input_kernel(cuda_plan_view p, cuda_call_view c, cuda_workspace ws, int tile_tokens)
{
    wait_for_previous_kernel();
    const int lane = threadIdx.x % 32;
    const int64_t row = (int64_t)blockIdx.x * (ROW_THREADS / 32) + threadIdx.x / 32;
    if (row >= (int64_t)*ws.num_tiles * tile_tokens) return;
    const int32_t slot = ws.perm[row];
    if (slot < 0) return; // padding: never stored, so never read
    const int dtype = c.hidden_dtype; // of u (fc1_columns, cuda_grouped_gemm.cu)
    const void *u = reinterpret_cast<const uint8_t *>(ws.u) + row * cuda_u_row_bytes(p, c);
    const int64_t blocks = p.k2p / 16, live = p.inter / 16;
    const float a2 = p.w4a4 ? p.a2_global[ws.slot_local[slot]] : 1.0f;
    float amax = 0.0f, v[16];
    for (int64_t b = lane; b < blocks; b += 32) {
        fc2_input_block(u, dtype, b, live, p.w4a4, a2, v);
#pragma unroll
        for (int j = 0; j < 16; j++) amax = fmaxf(amax, fabsf(v[j]));
    }
    for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(FULL_MASK, amax, off));
    float inverse;
    const float scale = row_scale_from_amax(amax, &inverse);
    if (lane == 0) ws.u_scale[row] = scale;
    for (int64_t b = lane; b < blocks; b += 32) {
        fc2_input_block(u, dtype, b, live, p.w4a4, a2, v);
        store_parts16(v, inverse, c.parts, p.k2p, ws.ub + row * c.parts * p.k2p + b * 16);
    }
    allow_next_kernel();
}

// ------------------------------------------------------------------ host side
extern "C" cudaError_t cuda_launch_prefill(const cuda_plan_view *p, const cuda_call_view *c,
                                           const cuda_workspace *ws, int tile_tokens, int64_t max_tiles,
                                           cudaStream_t stream)
{
    const int64_t tokens = c->t1 - c->t0, slots = tokens * p->top_k;
    // 256-row blocks (four warpgroups, one block per SM, half the activation bytes per MMA) where
    // they measured faster: 16-bit inputs in 128-token tiles, at least 128 rows per expert on
    // average (over all num_experts, as the tile rule counts), H >= 4096 (deepseek-v3 T = 4096 /
    // 8192 -1.8 / -0.8%; qwen3, H = 2048, +1-3%; docs/PERF.md prefill v11)
    const int rows = p->gemm_rows ? p->gemm_rows
                     : c->parts == 1 && tile_tokens == 128 && p->h >= 4096 && slots >= 128 * p->num_experts ? 256
                                                                                                           : 128;
    const int warpgroups = p->wgmma ? rows / 64 : 0;
    const int64_t x_rows = c->x_per_slot ? slots : tokens;
    const int perm_blocks = (int)cuda_prefill_perm_blocks(slots);
    const size_t hist_bytes = (size_t)p->e_loc * sizeof(int);
    cudaError_t err = launch_dependent(prefill_count_kernel, dim3((unsigned)perm_blocks), dim3(PERM_THREADS),
                                       hist_bytes, stream, *p, *c, *ws);
    if (err == cudaSuccess)
        err = launch_dependent(prefill_layout_kernel, dim3(1), dim3(PERM_THREADS), hist_bytes, stream, *p, *c,
                               *ws, tile_tokens, perm_blocks);
    if (err == cudaSuccess)
        err = launch_dependent(prefill_place_kernel, dim3((unsigned)perm_blocks), dim3(PERM_THREADS),
                               hist_bytes, stream, *p, *c, *ws);
    // (the 16-byte kernel: 16-byte aligned rows of at most 8 * ROW_THREADS * FC1_INPUT16_CHUNKS values)
    const bool input16 = !c->x_per_slot && c->parts == 1 && p->h % 8 == 0 &&
                         p->k1p <= 8 * ROW_THREADS * FC1_INPUT16_CHUNKS && (uintptr_t)c->hidden % 16 == 0;
    if (err == cudaSuccess)
        err = launch_dependent(input16 ? prefill_fc1_input16_kernel : prefill_fc1_input_kernel,
                               dim3((unsigned)x_rows), dim3(ROW_THREADS), 0, stream, *p, *c, *ws);
    if (err == cudaSuccess)
        err = cuda_launch_grouped_gemm(p, c, ws, 0, tile_tokens, max_tiles, warpgroups, stream);
    if (err == cudaSuccess)
        err = launch_dependent(prefill_fc2_input_kernel,
                               dim3((unsigned)((max_tiles * tile_tokens + ROW_THREADS / 32 - 1) / (ROW_THREADS / 32))),
                               dim3(ROW_THREADS), 0, stream, *p, *c, *ws, tile_tokens);
    if (err == cudaSuccess)
        err = cuda_launch_grouped_gemm(p, c, ws, 1, tile_tokens, max_tiles, warpgroups, stream);
    if (err == cudaSuccess) err = cuda_launch_finalize(p, c, ws, stream);
    return err;
}

extern "C" int64_t cuda_prefill_perm_blocks(int64_t slots) { return (slots + PERM_SLOTS - 1) / PERM_SLOTS; }
