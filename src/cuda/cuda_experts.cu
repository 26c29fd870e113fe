// The experts of a token chunk on the GPU, as tensor-core GEMVs: a block owns one 16-row tile
// of one touched expert and runs it against up to 8 (token, slot) pairs of that expert per
// mma.sync.m16n8k16 (weights as the M operand, "swap A/B"), its 4 warps splitting K; so each
// touched expert's weights are read from memory once per pass of 8 slots. Or a warp owns a whole
// tile over all of K ("warp-per-tile"), chosen per GEMV by the token count and H (launch_experts).
//
// Decoding: an E2M1 nibble pair is placed in a half2 with the magnitude bits at 11..9 and the
// sign at 15, which is the value times 2^-14 exactly (0.5 lands on the FP16 subnormal 2^-15):
// one shift and two masks per 2 values, no conversion instruction. The block scale (times
// 2^14) multiplies the FP32 partial sum of each 16-value k step. FP32 activations enter as FP16
// hi + lo parts of the row scaled by a power of two (22 significant bits, FP32 range), so the
// products are as exact as FP32 ones and the sums are FP32; FP16/BF16 ones (and the FC2 inputs
// made from them) as the hi part alone, whose lo would be 0 (PARTS = 1: half the B bytes and
// MMAs). One-token chunks with BF16 hidden states take FC2's inputs from FC1 as BF16 rows and
// multiply them on BF16 MMAs (OP 1: the weights decoded into BF16 with their block scales
// applied, group_product): docs/DESIGN.md "CUDA backend".
#include <math.h>

#include <type_traits>

#include "cuda_device.cuh"

// The weights reach each warp through a ring of D stages in shared memory, one K group (512 B
// of codes, 64 B of scales) per stage, filled by cp.async: D - 1 groups per warp are in flight
// without holding registers. (The register ring it replaced held two groups per warp at 64
// registers and spilled; deeper register rings cost occupancy: docs/PERF.md, decode v3/v4.)
#define GEMV_STAGE_BYTES 576
#define GEMV_STAGE_UNITS (GEMV_STAGE_BYTES / 16)

// Stages of a warp's ring (D - 1 K groups in flight) and blocks per SM the registers allow
// (overridable for measurements: -DFC1_DEPTH=4 -DFC1_MIN_BLOCKS=3, FC2_* alike, and
// -DCUDA_GEMV_WARPS). H100: 3 stages beat 2, 4 and 6 (the ring's shared memory is taken from the
// L1 that serves the B fragments; decode v4), and 8 blocks of 4 warps beat 4 of 8 (4-11% faster
// at T = 1: a T = 1 call's 768-1024 tiles of qwen3 fit one wave of 1056 blocks instead of two of
// 528; 2 warps x 16 blocks and 4 stages were no faster; docs/PERF.md, decode v8).
#ifndef FC1_DEPTH
#define FC1_DEPTH 3
#endif
#ifndef FC1_MIN_BLOCKS
#define FC1_MIN_BLOCKS 8
#endif
#ifndef FC2_DEPTH
#define FC2_DEPTH 3
#endif
#ifndef FC2_MIN_BLOCKS
#define FC2_MIN_BLOCKS 8
#endif
// The warp-per-tile kernels (chosen per GEMV by the chunk's tokens and H: launch_experts): a
// warp streams a whole tile's K through its own ring (its groups' copies no longer split over the
// warps, the per-block setup, cross-warp sum and barrier gone); 4-warp blocks spread over the
// SMs; 6 per SM (80 registers: at 8 the FP32 FC1 spilled 28 bytes). 4 stages (3 groups in
// flight per warp, ~41 KB per SM): fewer bytes in flight stream faster here, 8 stages were 2-8%
// slower, 13 up to 10% slower, 2 up to 8% slower at T = 2 (docs/PERF.md, decode v7).
#ifndef WT_DEPTH
#define WT_DEPTH 4
#endif
#ifndef WT_MIN_BLOCKS
#define WT_MIN_BLOCKS 6
#endif

// Copies 16 bytes to shared memory (address `to`) when `on`, with no branch: every lane runs the
// same instruction stream.
static __device__ __forceinline__ void cp_async16_if(uint32_t to, const void *from, bool on)
{
    asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n"
                 " @p cp.async.cg.shared.global.L2::128B [%0], [%1], 16;\n}" ::"r"(to),
                 "l"(from), "r"((int)on)
                 : "memory");
}

// (With "memory" clobbers, unlike the grouped GEMM's twins: the ring is read through C++ pointers
// here, so the compiler must not move those loads across a wait; the GEMM reads its stages with
// asm loads ordered by volatile alone.)
static __device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
static __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// A warp's copy cursor over its K groups kg = first, first + STRIDE, ... of one tile (STRIDE:
// CUDA_GEMV_WARPS when the block's warps share a tile's K, 1 when a warp has a tile of its
// own): this lane's 16 bytes of codes and (lanes 0-3) of scales of the next group to request.
struct ring_cursor {
    const uint8_t *codes, *scales;
    int left; // groups still to request
};

template <int STRIDE>
static __device__ __forceinline__ ring_cursor ring_cursor_at(const uint8_t *codes, const uint8_t *scales,
                                                             int groups, int first, int lane)
{
    ring_cursor r;
    r.codes = codes + (int64_t)first * 512 + lane * 16;
    r.scales = scales + (int64_t)first * 64 + (lane % 4) * 16;
    r.left = groups > first ? (groups - first + STRIDE - 1) / STRIDE : 0;
    return r;
}

// Requests the cursor's next group into the stage at shared address `stage` (this lane's part)
// and advances; one commit group either way, so the waits count stages.
template <int STRIDE>
static __device__ __forceinline__ void ring_request(ring_cursor &r, uint32_t stage, int lane)
{
    const bool on = r.left > 0;
    cp_async16_if(stage + lane * 16, r.codes, on);
    cp_async16_if(stage + 512 + (lane % 4) * 16, r.scales, on && lane < 4);
    cp_async_commit();
    r.codes += STRIDE * 512;
    r.scales += STRIDE * 64;
    r.left--;
}

// The first D - 1 stages of a warp's share of a tile.
template <int D, int STRIDE>
static __device__ __forceinline__ void ring_start(ring_cursor &r, uint4 *ring, int lane)
{
    const uint32_t base = (uint32_t)__cvta_generic_to_shared(ring);
#pragma unroll
    for (int d = 0; d + 1 < D; d++) ring_request<STRIDE>(r, base + d * GEMV_STAGE_BYTES, lane);
}

// The cursor past the stages ring_start requested (when they were requested earlier).
template <int D, int STRIDE>
static __device__ __forceinline__ void ring_skip(ring_cursor &r)
{
    r.codes += (D - 1) * STRIDE * 512;
    r.scales += (D - 1) * STRIDE * 64;
    r.left -= D - 1;
}

// Two E4M3 codes (low 16 bits) as floats.
static __device__ __forceinline__ float2 e4m3x2_values(uint32_t codes)
{
    const __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(codes & 0xffffu), __NV_E4M3);
    return __half22float2(__half2(raw));
}

// One lane's B fragment parts of a k16 step: hi and lo (two parts), or hi with lo 0 (one part).
static __device__ __forceinline__ uint4 load_b_unit(const uint4 *p) { return __ldg(p); }
static __device__ __forceinline__ uint4 load_b_unit(const uint2 *p)
{
    const uint2 hi = __ldg(p);
    return make_uint4(hi.x, hi.y, 0u, 0u);
}

// One K group of a lane's tile partial: words are its 16 code bytes, scd its 8 scale bytes, bc
// its B fragments of the group's 4 k steps. OP 0: FP16 weights of value * 2^-14, each k step's
// MMA sum (hi and lo parts) times its block scales in FP32; OP 1: BF16 B rows (one part), the
// block scales multiplied into the BF16 weights (decode_a_bf16) and the MMAs summing into acc.
template <int PARTS, int OP>
static __device__ __forceinline__ void group_product(const uint32_t words[4], uint2 scd, const uint4 bc[4],
                                                     float acc[4])
{
    if (OP) {
#pragma unroll
        for (int s = 0; s < 4; s++) {
            uint32_t a[4];
            decode_a_bf16(words, scd, s, a);
            mma_16816_bf16(acc, a, bc[s].x, bc[s].y);
        }
    } else {
        // the 8 block scales of this group, two E4M3 codes per conversion
        float s_g[4], s_g8[4];
#pragma unroll
        for (int pair = 0; pair < 2; pair++) {
            const float2 a = e4m3x2_values(scd.x >> (16 * pair)), c = e4m3x2_values(scd.y >> (16 * pair));
            s_g[2 * pair] = a.x, s_g[2 * pair + 1] = a.y;
            s_g8[2 * pair] = c.x, s_g8[2 * pair + 1] = c.y;
        }
#pragma unroll
        for (int s = 0; s < 4; s++) {
            uint32_t a[4];
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] = decode_pair(words[s], i);
            float dd[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            mma_16816(dd, a, bc[s].x, bc[s].y);                 // hi parts
            if (PARTS == 2) mma_16816(dd, a, bc[s].z, bc[s].w); // lo parts
            acc[0] = fmaf(dd[0], s_g[s], acc[0]);
            acc[1] = fmaf(dd[1], s_g[s], acc[1]);
            acc[2] = fmaf(dd[2], s_g8[s], acc[2]);
            acc[3] = fmaf(dd[3], s_g8[s], acc[3]);
        }
    }
}

// One warp's share of a tile (K groups first, first + STRIDE, ...) against the B rows of 8
// columns (b_row: this lane's column; lanes of columns without a slot read another column's
// row, their results are not stored), its ring started (ring_start with cursor r). acc: this
// lane's C fragment (rows g, g+8; columns 2q, 2q+1), block scales applied, row scales not. The
// B fragments come from L1/L2.
// OP: as group_product.
template <int D, int PARTS, int STRIDE, int OP>
static __device__ __forceinline__ void tile_partial(ring_cursor &r, uint4 *ring, int groups,
                                                    const uint8_t *b_row, int first, int lane, float acc[4])
{
    const int g = lane / 4, q = lane % 4;
    const uint32_t base = (uint32_t)__cvta_generic_to_shared(ring);
    // (one pointer of the unit's type: the same walk for one part and for two)
    typedef typename std::conditional<PARTS == 2, uint4, uint2>::type unit;
    const unit *b_next = reinterpret_cast<const unit *>(b_row) + first * 16 + q;
    int stage = 0;
    for (int kg = first; kg < groups; kg += STRIDE) {
        uint4 bc[4];
#pragma unroll
        for (int s = 0; s < 4; s++) bc[s] = load_b_unit(b_next + s * 4);
        b_next += STRIDE * 16;
        cp_async_wait<D - 2>(); // this lane's copies of group kg have landed
        __syncwarp();           // so have the other lanes' (the scales); the previous stage is read
        ring_request<STRIDE>(r, base + (stage == 0 ? D - 1 : stage - 1) * GEMV_STAGE_BYTES, lane);
        const uint4 w = ring[stage * GEMV_STAGE_UNITS + lane];
        const uint2 scd = reinterpret_cast<const uint2 *>(ring + stage * GEMV_STAGE_UNITS + 32)[g];
        stage = stage + 1 == D ? 0 : stage + 1;
        const uint32_t words[4] = {w.x, w.y, w.z, w.w};
        group_product<PARTS, OP>(words, scd, bc, acc);
    }
    cp_async_wait<0>(); // only empty groups can be left; after a warp or block barrier the ring may restart
}

// The whole tile for one pass: every warp's partial, summed in warp order by warp 0 (fixed
// order: deterministic). Returns in warp 0's acc; red: CUDA_GEMV_WARPS * 32 * 4 floats of
// shared memory; ring: the warp's D stages, already started (ring_start) when `started`.
template <int D, int PARTS, int OP>
static __device__ __forceinline__ void tile_product(uint4 *ring, bool started, const uint8_t *codes,
                                                    const uint8_t *scales, int groups,
                                                    const uint8_t *b_row, float acc[4], float *red)
{
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    acc[0] = acc[1] = acc[2] = acc[3] = 0.0f;
    ring_cursor r = ring_cursor_at<CUDA_GEMV_WARPS>(codes, scales, groups, warp, lane);
    if (started) ring_skip<D, CUDA_GEMV_WARPS>(r);
    else ring_start<D, CUDA_GEMV_WARPS>(r, ring, lane);
    tile_partial<D, PARTS, CUDA_GEMV_WARPS, OP>(r, ring, groups, b_row, warp, lane, acc);
    __syncthreads(); // red is free (the previous pass's epilogue is done)
    if (warp > 0) {
#pragma unroll
        for (int i = 0; i < 4; i++) red[(warp * 32 + lane) * 4 + i] = acc[i];
    }
    __syncthreads();
    if (warp == 0) {
        for (int w = 1; w < CUDA_GEMV_WARPS; w++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[i] += red[(w * 32 + lane) * 4 + i];
        // the weights were decoded as value * 2^-14 (BF16: 2^-7): undo it (exact)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[i] *= OP ? BF16_WEIGHT_UNSCALE : 16384.0f;
    }
}

// The whole tile for one pass by one warp over every K group (the warp-per-tile kernels):
// returns in acc; ring: the warp's D stages, already started when `started`.
template <int D, int PARTS, int OP>
static __device__ __forceinline__ void warp_tile_product(uint4 *ring, bool started, const uint8_t *codes,
                                                         const uint8_t *scales, int groups, const uint8_t *b_row,
                                                         float acc[4])
{
    const int lane = threadIdx.x % 32;
    acc[0] = acc[1] = acc[2] = acc[3] = 0.0f;
    ring_cursor r = ring_cursor_at<1>(codes, scales, groups, 0, lane);
    if (started) {
        ring_skip<D, 1>(r);
    } else {
        __syncwarp(); // every lane has read the previous pass's stages (lanes 0-3 wrote the scales)
        ring_start<D, 1>(r, ring, lane);
    }
    tile_partial<D, PARTS, 1, OP>(r, ring, groups, b_row, 0, lane, acc);
    // the weights were decoded as value * 2^-14 (BF16: 2^-7): undo it (exact)
#pragma unroll
    for (int i = 0; i < 4; i++) acc[i] *= OP ? BF16_WEIGHT_UNSCALE : 16384.0f;
}

// ------------------------------------------------------------------ FC1 + activation
// The results of one pass (slots pos .. pos + nslots - 1 of expert e, 16-row tile `tile`, acc as
// tile_product returns it): lane rows g, g+8 of the tile, columns (slots) 2q, 2q+1.
template <int PARTS>
static __device__ __forceinline__ void fc1_pass_store(const cuda_plan_view &p, const cuda_call_view &c,
                                                      const cuda_workspace &ws, const fc1_pair &pair, int pos,
                                                      int nslots, const float acc[4], int lane)
{
    const int q = lane % 4;
    for (int j = 0; j < 2; j++) {
        const int col = 2 * q + j;
        if (col >= nslots) continue;
        const int64_t slot = ws.entries[pos + col];
        const float xs = ws.x_scale[c.x_per_slot ? slot : slot / p.top_k];
        char *direct_row = reinterpret_cast<char *>(ws.uh) + slot * b_row_bytes(p.k2p, 1);
        float *u_row = ws.u + slot * p.k2p;
        fc1_pair_apply<-1>(p, pair, acc[j], acc[2 + j], xs, c.hidden_dtype, [&](int64_t ch, float v) {
            if (PARTS == 1 && c.fc2_direct) // the slot's FC2 B row in the hidden dtype (v is rounded to it)
                store_from_f32(direct_row + b_row_hi_offset(ch), c.hidden_dtype, 0, v);
            else
                u_row[ch] = v;
        });
    }
}

// One block per (touched expert, 16-row tile), its warps sharing the K groups; or (WT) one warp
// per (touched expert, tile) over the whole K, CUDA_WT_WARPS warps per block. Blocks (warps)
// past the touched experts exit at once.
template <int PARTS, int WT>
__global__ void __launch_bounds__(WT ? CUDA_WT_WARPS * 32 : CUDA_GEMV_WARPS * 32, WT ? WT_MIN_BLOCKS : FC1_MIN_BLOCKS)
fc1_kernel(cuda_plan_view p, cuda_call_view c, cuda_workspace ws)
{
    constexpr int WARPS = WT ? CUDA_WT_WARPS : CUDA_GEMV_WARPS, D = WT ? WT_DEPTH : FC1_DEPTH;
    __shared__ float red[WT ? 4 : CUDA_GEMV_WARPS * 32 * 4];
    __shared__ uint4 rings[WARPS][D * GEMV_STAGE_UNITS];
    wait_for_previous_kernel();
    const int64_t tiles = p.n1 / CUDA_TILE_ROWS;
    const int groups = (int)(p.k1p / CUDA_KGROUP);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4;
    const int64_t item = WT ? (int64_t)blockIdx.x * CUDA_WT_WARPS + warp : (int64_t)blockIdx.x;
    const int64_t u = item / tiles, tile = item % tiles;
    if (u >= ws.touched[0]) return;
    const int64_t e = ws.touched[1 + u];
    const int begin = ws.touched_begin[u], end = ws.touched_begin[u + 1];
    const int64_t k = p.top_k;
    const uint8_t *codes = p.w1_codes + (e * tiles + tile) * groups * 512;
    const uint8_t *scales = p.w1_scales + (e * tiles + tile) * groups * 64;
    float scale_low, scale_high;
    fc1_expert_scales(p, e, &scale_low, &scale_high);
    for (int pos = begin; pos < end; pos += CUDA_SLOTS_PER_PASS) {
        const int nslots = min(CUDA_SLOTS_PER_PASS, end - pos);
        const int64_t slot = ws.entries[pos + min(g, nslots - 1)];
        const uint8_t *b_row = reinterpret_cast<const uint8_t *>(ws.xh) +
                               (c.x_per_slot ? slot : slot / k) * b_row_bytes(p.k1p, PARTS);
        float acc[4];
        if (WT) warp_tile_product<D, PARTS, 0>(rings[warp], false, codes, scales, groups, b_row, acc);
        else tile_product<D, PARTS, 0>(rings[warp], false, codes, scales, groups, b_row, acc, red);
        if (pos + CUDA_SLOTS_PER_PASS >= end) allow_next_kernel(); // last pass: epilogue left
        // (the epilogue's constants read after the product: not held in registers through it)
        if (WT || warp == 0)
            fc1_pass_store<PARTS>(p, c, ws, fc1_pair_of(p, e, tile, g, scale_low, scale_high), pos, nslots, acc, lane);
    }
}

// FC2 inputs: W4A4 quantisation (in place, per 16-value block with the expert's a2 scale), then
// the FP16 B-fragment rows (PARTS parts, as the FC2 kernel that reads them) with their
// power-of-two scales. One block per slot.
template <int PARTS>
__global__ void fc2_input_kernel(cuda_plan_view p, cuda_call_view c, cuda_workspace ws)
{
    __shared__ float warp_max[32];
    wait_for_previous_kernel();
    allow_next_kernel();
    const int64_t s = blockIdx.x;
    const int local = ws.slot_local[s];
    if (local < 0) return;
    float *row = ws.u + s * p.k2p;
    if (p.w4a4) {
        for (int64_t b = threadIdx.x; b < p.inter / 16; b += blockDim.x) {
            float v[16];
#pragma unroll
            for (int j = 0; j < 16; j++) v[j] = row[b * 16 + j];
            nvfp4_fake_quantize16(v, p.a2_global[local]);
#pragma unroll
            for (int j = 0; j < 16; j++) row[b * 16 + j] = v[j];
        }
        __syncthreads();
    }
    float amax = 0.0f;
    for (int64_t i = threadIdx.x; i < p.k2p; i += blockDim.x) amax = fmaxf(amax, fabsf(row[i]));
    for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(FULL_MASK, amax, off));
    if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
    __syncthreads();
    amax = 0.0f;
    for (int w = 0; w < (int)(blockDim.x / 32); w++) amax = fmaxf(amax, warp_max[w]);
    float inverse;
    const float scale = row_scale_from_amax(amax, &inverse);
    if (threadIdx.x == 0) ws.u_scale[s] = scale;
    for (int64_t i = threadIdx.x; i < p.k2p / 4; i += blockDim.x)
        store_b_unit(ws.uh, s, p.k2p / 4, i, hilo_unit(row, i, inverse), PARTS);
}

// ------------------------------------------------------------------ FC2
// FC2's output (slot, row n) of expert e from the tile product acc (block scales applied): the
// input row's scale us, the expert's scale (fc2_expert_scale), the bias; no FMA contraction.
static __device__ __forceinline__ float fc2_value(const cuda_plan_view &p, int64_t e, int64_t n, float acc, float us,
                                                  float scale)
{
    const float v = __fmul_rn(__fmul_rn(acc, us), scale);
    return p.b2 ? __fadd_rn(v, p.b2[e * p.h + n]) : v;
}

// The results of one pass (as fc1_pass_store): the (slot, row) outputs, row scale, global scale
// and bias applied.
static __device__ __forceinline__ void fc2_pass_store(const cuda_plan_view &p, const cuda_workspace &ws,
                                                      int64_t e, int64_t tile, int pos, int nslots, float scale,
                                                      const float acc[4], int lane)
{
    const int g = lane / 4, q = lane % 4;
    const int64_t h = p.h;
    for (int j = 0; j < 2; j++) {
        const int col = 2 * q + j;
        if (col >= nslots) continue;
        const int64_t slot = ws.entries[pos + col];
        const float us = ws.u_scale[slot];
        for (int r = 0; r < 2; r++) {
            const int64_t n = tile * CUDA_TILE_ROWS + g + 8 * r;
            ws.y[slot * h + n] = fc2_value(p, e, n, acc[2 * r + j], us, scale);
        }
    }
}

// Blocks or (WT) warps per (touched expert, tile) as fc1_kernel; OP as tile_partial.
template <int PARTS, int WT, int OP>
__global__ void __launch_bounds__(WT ? CUDA_WT_WARPS * 32 : CUDA_GEMV_WARPS * 32, WT ? WT_MIN_BLOCKS : FC2_MIN_BLOCKS)
fc2_kernel(cuda_plan_view p, cuda_call_view c, cuda_workspace ws)
{
    constexpr int WARPS = WT ? CUDA_WT_WARPS : CUDA_GEMV_WARPS, D = WT ? WT_DEPTH : FC2_DEPTH;
    __shared__ float red[WT ? 4 : CUDA_GEMV_WARPS * 32 * 4];
    __shared__ uint4 rings[WARPS][D * GEMV_STAGE_UNITS];
    // The touched experts and their slot ranges come from the front kernel, which finished
    // before FC1 passed its wait (and so before this grid could start): the first weights are
    // requested before waiting for FC1 and the FC2 inputs. (L2 loads: not through L1.)
    const int64_t tiles = p.h / CUDA_TILE_ROWS;
    const int groups = (int)(p.k2p / CUDA_KGROUP);
    const int64_t item = WT ? (int64_t)blockIdx.x * CUDA_WT_WARPS + threadIdx.x / 32 : (int64_t)blockIdx.x;
    const int64_t u = item / tiles, tile = item % tiles;
    if (u >= __ldcg(ws.touched)) return;
    const int64_t e = __ldcg(ws.touched + 1 + u);
    const int begin = __ldcg(ws.touched_begin + u), end = __ldcg(ws.touched_begin + u + 1);
    // (lane and warp after the early exit, as before WT: computed earlier, they cost the default
    // kernel's K loop four register copies per group)
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4;
    const uint8_t *codes = p.w2_codes + (e * tiles + tile) * groups * 512;
    const uint8_t *scales = p.w2_scales + (e * tiles + tile) * groups * 64;
    if (WT) {
        ring_cursor first = ring_cursor_at<1>(codes, scales, (int)groups, 0, lane);
        ring_start<D, 1>(first, rings[warp], lane);
    } else {
        ring_cursor first = ring_cursor_at<CUDA_GEMV_WARPS>(codes, scales, (int)groups, warp, lane);
        ring_start<D, CUDA_GEMV_WARPS>(first, rings[warp], lane);
    }
    wait_for_previous_kernel();
    const float scale = fc2_expert_scale(p, e);
    for (int pos = begin; pos < end; pos += CUDA_SLOTS_PER_PASS) {
        const int nslots = min(CUDA_SLOTS_PER_PASS, end - pos);
        const uint8_t *b_row = reinterpret_cast<const uint8_t *>(ws.uh) +
                               (int64_t)ws.entries[pos + min(g, nslots - 1)] * b_row_bytes(p.k2p, PARTS);
        float acc[4];
        if (WT) warp_tile_product<D, PARTS, OP>(rings[warp], pos == begin, codes, scales, groups, b_row, acc);
        else tile_product<D, PARTS, OP>(rings[warp], pos == begin, codes, scales, groups, b_row, acc, red);
        if (pos + CUDA_SLOTS_PER_PASS >= end) allow_next_kernel(); // last pass: epilogue left
        if (WT || warp == 0) fc2_pass_store(p, ws, e, tile, pos, nslots, scale, acc, lane);
    }
    cp_async_wait<0>(); // (a touched expert has a slot, so the ring was run; this keeps it so)
}

// ------------------------------------------------------------------ FC2 + finalize, one token
// A one-token chunk with finalize on: a block per 16-row output tile, a warp per slot of the
// token (warp w takes slots w, w + warps, ...), each the warp-per-tile product of its expert's
// tile with the FC2 epilogue of fc2_pass_store; the block then sums the slots in slot order as
// finalize_kernel does. The same operations in the same order as fc2_kernel<PARTS, 1, OP> followed
// by finalize_kernel, one dependent kernel fewer (each costs 2-4 us in the chain at T = 1:
// docs/PERF.md decode v10), and no FP32 (slot, row) round trip through memory.
#define FC2_TOKEN_MAX_WARPS 8
// (as many warps per SM as the warp-per-tile kernels, at least one block)
#define FC2_TOKEN_MIN_BLOCKS (WT_MIN_BLOCKS * CUDA_WT_WARPS >= 2 * FC2_TOKEN_MAX_WARPS ? WT_MIN_BLOCKS * CUDA_WT_WARPS / FC2_TOKEN_MAX_WARPS : 1)
template <int PARTS, int OP>
__global__ void __launch_bounds__(FC2_TOKEN_MAX_WARPS * 32, FC2_TOKEN_MIN_BLOCKS)
fc2_token_kernel(cuda_plan_view p, cuda_call_view c, cuda_workspace ws)
{
    constexpr int D = WT_DEPTH;
    __shared__ uint4 rings[FC2_TOKEN_MAX_WARPS][D * GEMV_STAGE_UNITS];
    __shared__ float vals[CUDA_MAX_TOP_K][CUDA_TILE_ROWS];
    const int64_t tile = blockIdx.x, k = p.top_k, h = p.h;
    const int groups = (int)(p.k2p / CUDA_KGROUP);
    const int warps = (int)(blockDim.x / 32), warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4;
    // The slots' local experts come from the front kernel, which finished before FC1 passed its
    // wait: the first slot's weights are requested before waiting for FC1 and the FC2 inputs.
    int local = warp < k ? __ldcg(ws.slot_local + warp) : -1;
    if (local >= 0) {
        ring_cursor first = ring_cursor_at<1>(p.w2_codes + (local * (h / CUDA_TILE_ROWS) + tile) * groups * 512,
                                              p.w2_scales + (local * (h / CUDA_TILE_ROWS) + tile) * groups * 64,
                                              groups, 0, lane);
        ring_start<D, 1>(first, rings[warp], lane);
    }
    wait_for_previous_kernel();
    for (int j = warp; j < k; j += warps) {
        if (j != warp) local = ws.slot_local[j];
        if (local < 0) continue;
        const int64_t e = local;
        const uint8_t *codes = p.w2_codes + (e * (h / CUDA_TILE_ROWS) + tile) * groups * 512;
        const uint8_t *scales = p.w2_scales + (e * (h / CUDA_TILE_ROWS) + tile) * groups * 64;
        const uint8_t *b_row = reinterpret_cast<const uint8_t *>(ws.uh) + (int64_t)j * b_row_bytes(p.k2p, PARTS);
        float acc[4];
        warp_tile_product<D, PARTS, OP>(rings[warp], j == warp, codes, scales, groups, b_row, acc);
        const float scale = fc2_expert_scale(p, e);
        if (lane % 4 == 0) { // column 0: the token's slot (fc2_pass_store with one slot)
            const float us = ws.u_scale[j];
            for (int r = 0; r < 2; r++)
                vals[j][g + 8 * r] = fc2_value(p, e, tile * CUDA_TILE_ROWS + g + 8 * r, acc[2 * r], us, scale);
        }
    }
    allow_next_kernel();
    __syncthreads();
    if (threadIdx.x >= CUDA_TILE_ROWS) return;
    // finalize_kernel's sum for this tile's rows: slot order, no FMA contraction
    const int64_t t = c.t0, n = tile * CUDA_TILE_ROWS + threadIdx.x;
    float sum = 0.0f;
    bool any = false;
    for (int64_t j = 0; j < k; j++) {
        if (ws.slot_local[j] < 0) continue;
        const float w = p.on_input ? 1.0f : ws.weights[t * k + j];
        const float term = __fmul_rn(w, vals[j][threadIdx.x]);
        sum = any ? __fadd_rn(sum, term) : term;
        any = true;
    }
    if (c.per_token_scale) sum = __fmul_rn(c.per_token_scale[t], sum);
    store_from_f32(c.output, c.output_dtype, t * h + n, sum);
}

// ------------------------------------------------------------------ finalize
// One thread per (token, 4 columns; H is a multiple of 16): the weighted sum over the token's
// local slots in slot order, as cpu_experts.c's finalize_token (no contraction into FMAs), or the
// per-slot rows. 16-byte loads of the FC2 rows: this pass is bound by reading them.
static __device__ __forceinline__ void store4(const cuda_call_view &c, int64_t at, float4 v)
{
    store_from_f32(c.output, c.output_dtype, at, v.x);
    store_from_f32(c.output, c.output_dtype, at + 1, v.y);
    store_from_f32(c.output, c.output_dtype, at + 2, v.z);
    store_from_f32(c.output, c.output_dtype, at + 3, v.w);
}

static __device__ __forceinline__ float4 load_y4(const cuda_workspace &ws, int64_t slot, int64_t h, int64_t col)
{
    return *reinterpret_cast<const float4 *>(ws.y + slot * h + col);
}

__global__ void finalize_kernel(cuda_plan_view p, cuda_call_view c, cuda_workspace ws)
{
    wait_for_previous_kernel();
    const int64_t h = p.h, k = p.top_k;
    const int64_t col = ((int64_t)blockIdx.y * blockDim.x + threadIdx.x) * 4;
    const int64_t t = c.t0 + blockIdx.x;
    if (col >= h) return;
    const int64_t s0 = (t - c.t0) * k;
    if (!c.finalize) {
        for (int64_t j = 0; j < k; j++) {
            const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            store4(c, (t * k + j) * h + col, ws.slot_local[s0 + j] >= 0 ? load_y4(ws, s0 + j, h, col) : zero);
        }
        return;
    }
    // All slots' loads first (independent), then the sum in slot order.
    float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    bool any = false;
    for (int64_t j0 = 0; j0 < k; j0 += 8) {
        float4 yv[8];
        float wv[8];
        int lv[8];
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int64_t j = j0 + i;
            lv[i] = j < k ? ws.slot_local[s0 + j] : -1;
            wv[i] = j < k ? (p.on_input ? 1.0f : ws.weights[t * k + j]) : 0.0f;
            yv[i] = lv[i] >= 0 ? load_y4(ws, s0 + j, h, col) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
#pragma unroll
        for (int i = 0; i < 8; i++) {
            if (lv[i] < 0) continue;
            const float4 term = make_float4(__fmul_rn(wv[i], yv[i].x), __fmul_rn(wv[i], yv[i].y),
                                            __fmul_rn(wv[i], yv[i].z), __fmul_rn(wv[i], yv[i].w));
            if (any)
                sum = make_float4(__fadd_rn(sum.x, term.x), __fadd_rn(sum.y, term.y), __fadd_rn(sum.z, term.z),
                                  __fadd_rn(sum.w, term.w));
            else
                sum = term;
            any = true;
        }
    }
    if (c.per_token_scale) {
        const float ts = c.per_token_scale[t];
        sum = make_float4(__fmul_rn(ts, sum.x), __fmul_rn(ts, sum.y), __fmul_rn(ts, sum.z), __fmul_rn(ts, sum.w));
    }
    store4(c, t * h + col, sum);
}

// ------------------------------------------------------------------ host side
// The expert kernels of one chunk for B rows of PARTS FP16 parts.
template <int PARTS>
static cudaError_t launch_experts(const cuda_plan_view *p, const cuda_call_view *c, const cuda_workspace *ws,
                                  cudaStream_t stream)
{
    const int64_t slots = (c->t1 - c->t0) * p->top_k;
    const int64_t most_touched = slots < p->e_loc ? slots : p->e_loc;
    const int64_t fc1_items = most_touched * (p->n1 / CUDA_TILE_ROWS), fc2_items = most_touched * (p->h / CUDA_TILE_ROWS);
    // FC1 a warp per tile at 2-4 tokens when H <= 4096 and from 32 tokens, a block per tile
    // otherwise (deepseek-v3's 448-group rows ran 6-11% faster by blocks at 2-4 tokens, every
    // model 3.5-7% at 8 tokens and 2% at 16; from 32 the two are within 1%); FC2 a warp per
    // tile from 2 tokens up, and at 1 token when H > 4096 (deepseek-v3's 3584 FC2 tiles fill the
    // GPU by warps). Measured at 1, 2, 4, 8, 16, 32, 64 and 128 tokens (docs/PERF.md, decode
    // v10); the tokens between take the rule of the measured points around them.
    const int64_t tokens = c->t1 - c->t0;
    const bool fc1_by_warps = (p->h <= 4096 && tokens >= 2 && tokens <= 4) || tokens >= 32;
    const int wt = p->decode_warp_tile >= 0 ? p->decode_warp_tile
                   : (fc1_by_warps ? CUDA_WT_FC1 : 0) | (tokens >= 2 || p->h > 4096 ? CUDA_WT_FC2 : 0);
    const int wt1 = (wt & CUDA_WT_FC1) != 0, wt2 = (wt & CUDA_WT_FC2) != 0;
    // a block per tile, or CUDA_WT_WARPS tiles (warps) per block
    const dim3 threads1(wt1 ? CUDA_WT_WARPS * 32 : CUDA_GEMV_WARPS * 32);
    const dim3 threads2(wt2 ? CUDA_WT_WARPS * 32 : CUDA_GEMV_WARPS * 32);
    const int64_t per_block1 = wt1 ? CUDA_WT_WARPS : 1, per_block2 = wt2 ? CUDA_WT_WARPS : 1;
    void (*fc1)(cuda_plan_view, cuda_call_view, cuda_workspace) = wt1 ? fc1_kernel<PARTS, 1> : fc1_kernel<PARTS, 0>;
    // BF16 FC2 inputs written by FC1 (fc2_direct) multiply as BF16 (OP 1); FP16 ones as before
    const bool bf16_fc2 = PARTS == 1 && c->fc2_direct && c->hidden_dtype == FP4MOE_DTYPE_BF16;
    void (*fc2)(cuda_plan_view, cuda_call_view, cuda_workspace) =
        bf16_fc2 ? (wt2 ? fc2_kernel<1, 1, 1> : fc2_kernel<1, 0, 1>)
                 : (wt2 ? fc2_kernel<PARTS, 1, 0> : fc2_kernel<PARTS, 0, 0>);
    // (p->stop_after: a measurement knob that leaves the later kernels out; outputs undefined)
    const int stop = p->stop_after > 0 ? p->stop_after : 5;
    cudaError_t err = cudaSuccess;
    if (stop >= 2)
        err = launch_dependent(fc1, dim3((unsigned)((fc1_items + per_block1 - 1) / per_block1)), threads1, 0,
                               stream, *p, *c, *ws);
    // (fc2_direct: FC1's epilogue wrote the B rows, row scales 1 from the front)
    if (err == cudaSuccess && stop >= 3 && !c->fc2_direct)
        err = launch_dependent(fc2_input_kernel<PARTS>, dim3((unsigned)slots), dim3(256), 0, stream, *p, *c, *ws);
    // One token with finalize on: FC2 and the finalize in one kernel (fc2_token_kernel, a warp
    // per slot over the whole K) when FC2 runs a warp per tile at T = 1 anyway (H > 4096) or a
    // warp's K is short (at most 16 groups): deepseek-v3 0.102 -> 0.098 ms, qwen3 0.029 ->
    // 0.028; nemotron's 29 groups per warp were slower by warps (0.035 -> 0.036 ms; docs/PERF.md
    // decode v11)
    // (automatic: not when FP4MOE_CUDA_DECODE_WARP_TILE asks FC2 for a block per tile). With
    // p->stop_after = 4 the one kernel includes the finalize.
    const bool token_finalize =
        tokens == 1 && c->finalize &&
        (p->token_finalize >= 0 ? p->token_finalize == 1
                                : (p->decode_warp_tile < 0 || (p->decode_warp_tile & CUDA_WT_FC2)) &&
                                      (p->h > 4096 || p->k2p / CUDA_KGROUP <= 16));
    if (token_finalize) {
        const int warps = p->top_k < FC2_TOKEN_MAX_WARPS ? p->top_k : FC2_TOKEN_MAX_WARPS;
        if (err == cudaSuccess && stop >= 4)
            err = launch_dependent(bf16_fc2 ? fc2_token_kernel<1, 1> : fc2_token_kernel<PARTS, 0>,
                                   dim3((unsigned)(p->h / CUDA_TILE_ROWS)), dim3(warps * 32), 0, stream, *p, *c,
                                   *ws);
        return err;
    }
    if (err == cudaSuccess && stop >= 4)
        err = launch_dependent(fc2, dim3((unsigned)((fc2_items + per_block2 - 1) / per_block2)), threads2, 0,
                               stream, *p, *c, *ws);
    if (err == cudaSuccess && stop >= 5) err = cuda_launch_finalize(p, c, ws, stream);
    return err;
}

extern "C" cudaError_t cuda_launch_experts(const cuda_plan_view *p, const cuda_call_view *c,
                                           const cuda_workspace *ws, cudaStream_t stream)
{
    if (c->parts == 2) return launch_experts<2>(p, c, ws, stream);
    if (c->parts == 1) return launch_experts<1>(p, c, ws, stream);
    return cudaErrorInvalidValue;
}

extern "C" cudaError_t cuda_launch_finalize(const cuda_plan_view *p, const cuda_call_view *c,
                                            const cuda_workspace *ws, cudaStream_t stream)
{
    return launch_dependent(finalize_kernel, dim3((unsigned)(c->t1 - c->t0), (unsigned)((p->h + 1023) / 1024)),
                            dim3(256), 0, stream, *p, *c, *ws);
}
