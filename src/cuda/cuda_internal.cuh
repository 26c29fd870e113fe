// Shared by the CUDA backend's translation units: the device-side view of a plan, the workspace
// layout of one forward call, number-format helpers, and the host entry points of each kernel
// family. Everything here follows docs/DESIGN.md "The function, exactly".
#ifndef FP4MOE_CUDA_INTERNAL_CUH
#define FP4MOE_CUDA_INTERNAL_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>

// The core headers declare C functions (fp4moe_fail, ...) without their own extern "C".
extern "C" {
#include "../core/context.h"
#include "cuda_backend.h"
}

// Weights are repacked into 16-row tiles of mma.sync m16n8k16 A fragments: per (tile, group of
// 64 K values) 512 bytes of codes (one 16-byte load per lane covers 4 MMAs) and 64 bytes of
// E4M3 scales. K is padded to a multiple of 64 with zero codes and zero scales, so any K that is
// a multiple of 16 works. Gated FC1 tiles hold the gate rows of 8 channels (tile rows 0-7) and
// the up rows of the same channels (8-15), so one thread holds both halves of its channels.
// Left shifts (negative: right) that decode_pair (cuda_device.cuh) applies to register i's
// magnitude and sign bits; the repack places the bits accordingly.
#define CUDA_DECODE_SHIFT_MAG {-3, 4, 7, 0}
#define CUDA_DECODE_SHIFT_SIGN {15, 14, 7, 0}
#define CUDA_KGROUP 64
#define CUDA_TILE_ROWS 16
#define CUDA_SLOTS_PER_PASS 8 /* the N of one MMA */
#ifndef CUDA_GEMV_WARPS
#define CUDA_GEMV_WARPS 4     /* a block splits K of one tile over its warps */
#endif
#define CUDA_WT_WARPS 4       /* warp-per-tile decode kernels: warps (tiles) per block */
#define CUDA_WT_FC1 1         /* decode_warp_tile bits: FC1 a warp per tile */
#define CUDA_WT_FC2 2         /* FC2 a warp per tile */
#define CUDA_MAX_TOP_K 32     /* the API's bound on k */
// Tokens per pass of the expert kernels (bounds the per-slot workspace).
#define CUDA_TOKEN_CHUNK 256
// Routing and planning run in one block when the call has at most this many tokens.
#define CUDA_FUSED_FRONT_MAX_TOKENS 64
#define CUDA_FRONT_THREADS 512
// Dynamic shared memory the routing kernels may use (their per-kernel limit is set to this once).
#define ROUTE_SMEM_LIMIT (96 * 1024)
// Tokens per pass of the prefill path (bounds its workspace: about C*k*(4H + 6I) bytes).
#define CUDA_PREFILL_CHUNK 8192

// The plan as the kernels see it: device pointers and sizes, passed by value.
typedef struct cuda_plan_view {
    // repacked weights: [E_loc][tiles][kp/64] x (512 code bytes | 64 scale bytes)
    const uint8_t *w1_codes, *w1_scales; // tiles = n1 / 16
    const uint8_t *w2_codes, *w2_scales; // tiles = h / 16
    const float *w1_global, *w1_global_half2, *w2_global; // [E_loc]
    const float *b1, *b2;                                 // optional [E_loc][n1], [E_loc][h]
    const float *routing_bias;                            // optional [E]
    const float *a1_global, *a2_global, *fp8_scale;       // [E_loc] when their mode is on
    const float *swiglu_alpha, *swiglu_beta, *swiglu_limit; // [E_loc]
    int64_t num_experts, e_loc, e0;
    int32_t top_k;
    int64_t h, inter, n1;
    int64_t k1p, k2p; // K of FC1 (h) and FC2 (inter) padded to 64
    int gated, gate_first, activation;
    int routing, n_group, topk_group, norm_topk_prob;
    float routed_scaling_factor;
    int on_input, w4a4, fp8_down;
    int wgmma;       // host side: the prefill GEMMs use the sm_90a warpgroup kernels
    int gemm_rows;   // host side: weight rows per wgmma GEMM block (128 or 256; 0: per call)
    int tile_tokens; // host side: tokens per prefill GEMM tile, 0 = chosen per call
    int decode_warp_tile; // decode GEMVs one warp per tile: CUDA_WT_* bits, -1 by T and H (launch_experts)
    int token_finalize;   // one-token chunks: FC2 and finalize in one kernel, 1 / 0, -1 automatic (launch_experts)
    int stop_after;       // measurement only (FP4MOE_CUDA_STOP_AFTER): decode kernels launched, 0 = all (4 = through FC2, with the finalize when one kernel does both)
    int fc2_direct;       // decode FC2 inputs straight from FC1's epilogue: 1 every chunk, 0 never, -1 one-token chunks
} cuda_plan_view;

// Workspace of one call. Routing results cover every token; the rest is per token chunk.
typedef struct cuda_workspace {
    int32_t *ids;        // [T*k] global ids
    float *weights;      // [T*k]
    int32_t *slot_local; // [C*k] local expert of a chunk slot, -1 when not local
    int32_t *counts;     // [E_loc] slots per local expert, then fill cursors (prefill: [blocks][E_loc])
    int32_t *touched;    // [1 + C*k]: count, then touched local experts in ascending order
    int32_t *touched_begin; // [C*k + 1] first entry of each touched expert
    int32_t *entries;    // [C*k] chunk slots grouped by expert
    // GEMM inputs: FP32 rows, then as FP16 hi + lo parts of (row * 2^-s) in B-fragment order
    // (per 16 values and lane quad index q: hi(2q,2q+1), hi(2q+8,2q+9), lo(..), lo(..)), with
    // the row's power-of-two scale 2^s, chosen so the row's amax fits FP16 with room to spare.
    float *x;            // [C*k or C][k1p] FC1 inputs (FP32)
    void *xh;            // [C*k or C][k1p/4 units][8 * parts bytes]: FC1 B rows (store_b_unit)
    int32_t *x_amax;     // [C*k or C] (float bits, atomicMax)
    float *x_scale;      // [C*k or C]
    float *u;            // FC2 inputs: decode [C*k][k2p] FP32 (not written in fc2_direct chunks);
                         // prefill [tile rows][k2p] in the hidden dtype (cuda_u_row_bytes; the
                         // region is sized for FP32)
    void *uh;            // [C*k][k2p/4 units][8 * parts bytes]: FC2 B rows (fc2_direct chunks:
                         // one part in the hidden dtype, FP16 or BF16, row scale 1)
    float *u_scale;      // [C*k]
    float *y;            // [C*k][h] FC2 outputs
    // Prefill path (tokens grouped by expert into tiles of tile_tokens rows, padded):
    int32_t *perm;       // [P] chunk slot of each padded row, -1 for padding
    int2 *tile_list;     // [max_tiles] (local expert, first row)
    int32_t *num_tiles;  // [1]
    __half *xb;          // [x rows][parts][k1p] FC1 inputs as FP16 (row scale in x_scale)
    __half *ub;          // [P][parts][k2p] FC2 inputs as FP16 (row scale in u_scale); u, u_scale
                         // are indexed by padded row in this path
} cuda_workspace;

// One chunk of a forward call as the kernels see it.
typedef struct cuda_call_view {
    int64_t t0, t1;        // token range of this chunk
    const void *hidden;    // [T][h]
    int hidden_dtype;
    void *output;
    int output_dtype;
    int finalize;
    const float *per_token_scale;
    int x_per_slot;        // FC1 inputs per (token, slot) rather than per token
    int parts;             // B rows: 2 = FP16 hi + lo (FP32 hidden states), 1 = hi only (FP16/BF16:
                           // lo is 0 for every FP16, BF16, E4M3 or NVFP4 value at any row scale,
                           // so one part carries all that two did; the prefill path does the same)
    int fc2_direct;        // decode: FC1's epilogue writes the FC2 B rows (ws.uh) in the hidden
                           // dtype with row scale 1, no FC2-input kernel; FC2 multiplies in that
                           // dtype (BF16 MMAs for BF16). 16-bit hidden states without W4A4 only.
} cuda_call_view;

// Bytes of one prefill FC2 input row (ws.u): FC1's epilogue stores it in the hidden dtype, exactly
// (the values are rounded to it, or are E4M3 values, which FP16 and BF16 hold).
static __device__ __forceinline__ int64_t cuda_u_row_bytes(const cuda_plan_view &p,
                                                           const cuda_call_view &c)
{
    return p.k2p * (c.hidden_dtype == FP4MOE_DTYPE_F32 ? 4 : 2);
}

// ------------------------------------------------------------------ number formats (device)
static __device__ __forceinline__ float load_as_f32(const void *p, int dtype, int64_t i)
{
    if (dtype == FP4MOE_DTYPE_F16) return __half2float(((const __half *)p)[i]);
    if (dtype == FP4MOE_DTYPE_BF16) return __bfloat162float(((const __nv_bfloat16 *)p)[i]);
    return ((const float *)p)[i];
}

static __device__ __forceinline__ float round_to_dtype_dev(float v, int dtype)
{
    if (dtype == FP4MOE_DTYPE_F16) return __half2float(__float2half_rn(v));
    if (dtype == FP4MOE_DTYPE_BF16) return __bfloat162float(__float2bfloat16_rn(v));
    return v;
}

static __device__ __forceinline__ void store_from_f32(void *p, int dtype, int64_t i, float v)
{
    if (dtype == FP4MOE_DTYPE_F16) ((__half *)p)[i] = __float2half_rn(v);
    else if (dtype == FP4MOE_DTYPE_BF16) ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v);
    else ((float *)p)[i] = v;
}

static __device__ __forceinline__ float e4m3_value(uint32_t code)
{
    __half_raw raw = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)code, __NV_E4M3);
    return __half2float(__half(raw));
}

static __device__ __forceinline__ uint32_t e4m3_encode_satfinite(float v)
{
    return (uint32_t)__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
}

// E2M1 round to nearest even with saturation, as a value (NaN gives 6, the CPU's choice).
static __device__ __forceinline__ float e2m1_round_value(float v)
{
    const float a = fabsf(v);
    float q;
    if (a <= 0.25f) q = 0.0f;
    else if (a < 0.75f) q = 0.5f;
    else if (a <= 1.25f) q = 1.0f;
    else if (a < 1.75f) q = 1.5f;
    else if (a <= 2.5f) q = 2.0f;
    else if (a < 3.5f) q = 3.0f;
    else if (a <= 5.0f) q = 4.0f;
    else q = 6.0f;
    if (v != v) return 6.0f;
    return copysignf(q, v);
}

static __device__ __forceinline__ float rcp_approx_ftz(float x)
{
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// The spec's NVFP4 quantiser (section 2) on 16 values in place: x <- e2m1(q) * e4m3(s), without
// the 1/g factor, with the GPU's rcp.approx.ftz as the spec asks.
static __device__ __forceinline__ void nvfp4_fake_quantize16(float *x, float g)
{
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 16; i++) amax = fmaxf(amax, fabsf(x[i]));
    const float sf = __fmul_rn(g, __fmul_rn(amax, rcp_approx_ftz(6.0f)));
    const float s = e4m3_value(e4m3_encode_satfinite(sf));
    const float out_scale =
        (amax != 0.0f && s != 0.0f) ? rcp_approx_ftz(__fmul_rn(s, rcp_approx_ftz(g))) : 0.0f;
#pragma unroll
    for (int i = 0; i < 16; i++) x[i] = __fmul_rn(e2m1_round_value(__fmul_rn(x[i], out_scale)), s);
}

// Row -> FP16 hi/lo B-fragment layout (see cuda_workspace). Threads [first, .., step) of the
// caller each convert 4-value units; scale is 2^-s of the row.
static __device__ __forceinline__ float row_scale_from_amax(float amax, float *inverse)
{
    int e = 0;
    if (amax > 0.0f && isfinite(amax)) e = ilogbf(amax) - 14; // amax * 2^-e in [2^14, 2^15)
    e = max(-126, min(127, e));
    *inverse = ldexpf(1.0f, -e);
    return ldexpf(1.0f, e);
}

static __device__ __forceinline__ uint32_t pack_half2(__half lo, __half hi)
{
    return (uint32_t)__half_as_ushort(lo) | ((uint32_t)__half_as_ushort(hi) << 16);
}

// Unit i of a row (i = kstep * 4 + q): the 16 bytes lane quad q reads for that k step.
static __device__ __forceinline__ uint4 hilo_unit(const float *row, int64_t i, float inverse)
{
    const int64_t base = (i / 4) * 16 + (i % 4) * 2;
    const float v[4] = {row[base] * inverse, row[base + 1] * inverse, row[base + 8] * inverse,
                        row[base + 9] * inverse};
    __half hi[4], lo[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        hi[j] = __float2half_rn(v[j]);
        lo[j] = __float2half_rn(v[j] - __half2float(hi[j]));
    }
    return make_uint4(pack_half2(hi[0], hi[1]), pack_half2(hi[2], hi[3]), pack_half2(lo[0], lo[1]),
                      pack_half2(lo[2], lo[3]));
}

// Byte offset of value `col` in a one-part B row (store_b_unit's layout: per 16 values, unit q
// holds values 2q, 2q+1, 2q+8, 2q+9).
static __device__ __forceinline__ int64_t b_row_hi_offset(int64_t col)
{
    const int64_t r = col % 16;
    return (col / 16) * 32 + ((r % 8) / 2) * 8 + (r / 8) * 4 + (r % 2) * 2;
}

// Bytes of one B row of k values (k a multiple of 16: k / 4 units of 8 bytes a part), the stride
// of ws.xh and ws.uh rows wherever they are addressed in bytes (store_b_unit indexes the same
// rows in units, k / 4 to a row; the workspace layout sizes them at 4 bytes a value, enough for
// two parts).
static __device__ __forceinline__ int64_t b_row_bytes(int64_t k, int parts) { return (k / 4) * 8 * parts; }

// Stores B-row unit i (hilo_unit's 16 bytes) of row `row` in `parts` parts: all 16 bytes, or the
// hi half (8 bytes per unit).
static __device__ __forceinline__ void store_b_unit(void *rows, int64_t row, int64_t units, int64_t i, uint4 v,
                                                    int parts)
{
    if (parts == 2) reinterpret_cast<uint4 *>(rows)[row * units + i] = v;
    else reinterpret_cast<uint2 *>(rows)[row * units + i] = make_uint2(v.x, v.y);
}

// ------------------------------------------------------------------ host entry points
#ifdef __cplusplus
extern "C" {
#endif
// cuda_front.cu: routing, per-expert slot lists, FC1 inputs.
// Where a call's routing comes from: router logits (routed on the GPU, optionally echoed into
// the replay outputs), or the caller's ids and weights (copied, weights converted to FP32).
typedef struct cuda_route_source {
    const void *logits;
    int logits_dtype;
    const int32_t *topk_ids;
    const void *topk_weights;
    int topk_weights_dtype;
    int32_t *ids_out;
    float *weights_out;
} cuda_route_source;

// Routes (or copies) tokens [0, num_tokens) into ws->ids / ws->weights.
cudaError_t cuda_launch_route(const cuda_plan_view *p, int64_t num_tokens,
                              const cuda_route_source *src, const cuda_workspace *ws,
                              int route_warps, size_t route_smem, cudaStream_t stream);
// One block: (routing of the chunk's tokens when route_in_block) + slot lists + FC1 inputs.
cudaError_t cuda_launch_front(const cuda_plan_view *p, const cuda_call_view *c,
                              const cuda_workspace *ws, const cuda_route_source *src,
                              int route_in_block, int route_warps, size_t route_smem,
                              cudaStream_t stream);
size_t cuda_route_smem_bytes(int64_t num_experts, int warps);
cudaError_t cuda_front_set_smem(size_t bytes);
// cuda_experts.cu: FC1 + activation, W4A4 FC2-input quantisation, FC2, finalize.
cudaError_t cuda_launch_experts(const cuda_plan_view *p, const cuda_call_view *c,
                                const cuda_workspace *ws, cudaStream_t stream);
// The weighted sum over each token's slots of ws->y in slot order (or the per-slot rows when
// finalize is off), for the tokens of chunk c.
cudaError_t cuda_launch_finalize(const cuda_plan_view *p, const cuda_call_view *c,
                                 const cuda_workspace *ws, cudaStream_t stream);
// cuda_prefill.cu: the prefill path of one token chunk (routing already in ws->ids/weights):
// permutation, FC1 inputs, grouped FC1 GEMM + activation, FC2 inputs, grouped FC2 GEMM, finalize.
// tile_tokens: tokens per GEMM tile (64, 128; 256 with wgmma); the activations enter as c->parts FP16 parts
// (2: hi + lo of FP32 hidden states, 1 when one FP16 part holds them exactly).
// Blocks of the prefill permutation kernels for a chunk of `slots` (token, slot) pairs; ws.counts
// holds e_loc ints per block.
int64_t cuda_prefill_perm_blocks(int64_t slots);
cudaError_t cuda_launch_prefill(const cuda_plan_view *p, const cuda_call_view *c,
                                const cuda_workspace *ws, int tile_tokens, int64_t max_tiles,
                                cudaStream_t stream);
// cuda_grouped_gemm.cu: FC1 (fc2 = 0) or FC2 over every tile of ws->tile_list.
// warpgroups: 2 or 4 for the sm_90a warpgroup kernels (128 or 256 weight rows per block, when
// cuda_gemm_has_wgmma said so), 0 for mma.sync; B rows of c->parts FP16 parts.
cudaError_t cuda_launch_grouped_gemm(const cuda_plan_view *p, const cuda_call_view *c,
                                     const cuda_workspace *ws, int fc2, int tile_tokens,
                                     int64_t max_tiles, int warpgroups, cudaStream_t stream);
cudaError_t cuda_gemm_has_wgmma(int *has);
// cuda_repack.cu: one expert's canonical codes + linear scales (device) -> tile layout.
cudaError_t cuda_launch_repack(const uint8_t *codes, const uint8_t *scales, int64_t rows,
                               int64_t k, int64_t kp, int gated_fc1, int gate_first,
                               int64_t inter, uint8_t *tile_codes, uint8_t *tile_scales);
#ifdef __cplusplus
}
#endif

#endif
