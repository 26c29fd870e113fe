// The experts of a token chunk on the GPU, as W4A16-style GEMVs: every warp owns a few weight
// rows of one touched expert and runs them against every (token, slot) that chose the expert,
// so each touched expert's weights are read from memory once per chunk. Warps of all touched
// experts are spread over the whole grid (a grid-stride loop over (expert, row group) items).
//
// Decoding: an E2M1 nibble pair (values j and j+4 of a 32-bit word) is placed in a half2 with
// the magnitude bits at 11..9 and the sign at 15, which is the value times 2^-14 exactly (0.5
// lands on the FP16 subnormal 2^-15); the 2^14 goes into the block scale. Products and sums
// are FP32 (the CPU backend's semantics); the block partial sums are scaled by their E4M3 scale.
#include <math.h>

#include "cuda_internal.cuh"

#define FULL_MASK 0xffffffffu

// 16-byte weight load that skips L1: the weights are streamed once, L1 keeps the activations.
static __device__ __forceinline__ uint4 load_weights16(const void *ptr)
{
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr));
    return v;
}

// sum_j x[j] * e2m1(nibble j of w) * 2^-14 over the 8 nibbles of w.
static __device__ __forceinline__ float dot8(uint32_t w, const float *x)
{
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const uint32_t t = w >> (4 * j);
        const uint32_t bits = ((t & 0x00070007u) << 9) | ((t & 0x00080008u) << 12);
        const float2 q = __half22float2(*reinterpret_cast<const __half2 *>(&bits));
        sum = fmaf(x[j], q.x, sum);
        sum = fmaf(x[j + 4], q.y, sum);
    }
    return sum;
}

// acc[r][s] += sum over K of in_s[col] * W[row_r][col] (block scales applied, global not),
// this lane's chunks only (the caller reduces over the warp).
static __device__ __forceinline__ void gemv_rows(const uint8_t *codes, const uint8_t *scales,
                                                 int64_t kp, const int64_t *rows,
                                                 const float *const *in, int nslots,
                                                 float acc[CUDA_ROWS_PER_WARP][CUDA_SLOTS_PER_PASS],
                                                 int lane)
{
    const int64_t chunks = kp / CUDA_CHUNK_VALUES, code_stride = kp / 2, scale_stride = kp / 16;
    for (int64_t c = lane; c < chunks; c += 32) {
        uint4 q[CUDA_ROWS_PER_WARP];
        float s_lo[CUDA_ROWS_PER_WARP], s_hi[CUDA_ROWS_PER_WARP];
#pragma unroll
        for (int r = 0; r < CUDA_ROWS_PER_WARP; r++)
            q[r] = load_weights16(codes + rows[r] * code_stride + c * 16);
#pragma unroll
        for (int r = 0; r < CUDA_ROWS_PER_WARP; r++) {
            const uint16_t sc = *(const uint16_t *)(scales + rows[r] * scale_stride + c * 2);
            s_lo[r] = e4m3_value(sc & 0xffu) * 16384.0f;
            s_hi[r] = e4m3_value(sc >> 8) * 16384.0f;
        }
        // One 32-bit word (8 values) at a time, so few activations are live at once.
#pragma unroll
        for (int word = 0; word < 4; word++) {
#pragma unroll
            for (int s = 0; s < CUDA_SLOTS_PER_PASS; s++) {
                if (s >= nslots) break;
                const float4 *xp =
                    reinterpret_cast<const float4 *>(in[s] + c * CUDA_CHUNK_VALUES + word * 8);
                const float4 v0 = __ldg(xp), v1 = __ldg(xp + 1);
                const float x[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
#pragma unroll
                for (int r = 0; r < CUDA_ROWS_PER_WARP; r++) {
                    const uint32_t w = word == 0 ? q[r].x : word == 1 ? q[r].y : word == 2 ? q[r].z : q[r].w;
                    acc[r][s] = fmaf(dot8(w, x), word < 2 ? s_lo[r] : s_hi[r], acc[r][s]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < CUDA_ROWS_PER_WARP; r++)
#pragma unroll
        for (int s = 0; s < CUDA_SLOTS_PER_PASS; s++)
#pragma unroll
            for (int off = 16; off > 0; off >>= 1)
                acc[r][s] += __shfl_xor_sync(FULL_MASK, acc[r][s], off);
}

// ------------------------------------------------------------------ activations (as cpu_activation.c)
static __device__ __forceinline__ float sigmoid_dev(float z) { return 1.0f / (1.0f + expf(-z)); }
static __device__ __forceinline__ float gelu_erf(float x)
{
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
}
static __device__ __forceinline__ float gelu_tanh(float x)
{
    return 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
}

static __device__ float activation_gated(const cuda_plan_view &p, int64_t e, float gate, float up)
{
    if (p.activation == FP4MOE_ACT_SWIGLU) {
        const float limit = p.swiglu_limit[e];
        const float g = gate > limit ? limit : gate;
        const float u = up > limit ? limit : (up < -limit ? -limit : up);
        return g * sigmoid_dev(p.swiglu_alpha[e] * g) * (u + p.swiglu_beta[e]);
    }
    if (p.activation == FP4MOE_ACT_GEGLU) return gelu_erf(gate) * up;
    return gelu_tanh(gate) * up;
}

static __device__ float activation_plain(const cuda_plan_view &p, float x)
{
    switch (p.activation) {
    case FP4MOE_ACT_RELU2: return x > 0.0f ? x * x : (x != x ? x : 0.0f);
    case FP4MOE_ACT_SILU: return x * sigmoid_dev(x);
    case FP4MOE_ACT_GELU: return gelu_erf(x);
    default: return x;
    }
}

// ------------------------------------------------------------------ FC1 + activation
__global__ void __launch_bounds__(CUDA_GEMV_THREADS, CUDA_GEMV_MIN_BLOCKS)
fc1_kernel(cuda_plan_view p, cuda_call_view c, cuda_workspace ws)
{
    const int lane = threadIdx.x % 32;
    const int64_t warp = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int64_t warps = (int64_t)gridDim.x * blockDim.x / 32;
    const int64_t inter = p.inter, k = p.top_k;
    // channels per warp: gated FC1 reads the gate and up rows of 2 channels, plain FC1 4 rows
    const int64_t per_warp = p.gated ? CUDA_ROWS_PER_WARP / 2 : CUDA_ROWS_PER_WARP;
    const int64_t groups = inter / per_warp;
    const int64_t items = (int64_t)ws.touched[0] * groups;
    const int64_t code_bytes = p.n1 * (p.k1p / 2), scale_bytes = p.n1 * (p.k1p / 16);
    const int w4a4 = p.w4a4;
    for (int64_t item = warp; item < items; item += warps) {
        const int64_t u = item / groups, g = item % groups;
        const int64_t e = ws.touched[1 + u];
        const int begin = ws.touched_begin[u], end = ws.touched_begin[u + 1];
        int64_t rows[CUDA_ROWS_PER_WARP];
        if (p.gated) {
            for (int i = 0; i < 2; i++) {
                const int64_t ch = g * 2 + i;
                rows[2 * i] = p.gate_first ? ch : ch + inter;
                rows[2 * i + 1] = p.gate_first ? ch + inter : ch;
            }
        } else {
            for (int i = 0; i < 4; i++) rows[i] = g * 4 + i;
        }
        const float sa = w4a4 ? 1.0f / p.a1_global[e] : 1.0f;
        const float scale_low = __fmul_rn(sa, p.w1_global[e]);
        const float scale_high = __fmul_rn(sa, p.w1_global_half2[e]);
        for (int pos = begin; pos < end; pos += CUDA_SLOTS_PER_PASS) {
            const int nslots = min(CUDA_SLOTS_PER_PASS, end - pos);
            int64_t slot[CUDA_SLOTS_PER_PASS];
            const float *in[CUDA_SLOTS_PER_PASS];
#pragma unroll
            for (int s = 0; s < CUDA_SLOTS_PER_PASS; s++) {
                slot[s] = ws.entries[pos + min(s, nslots - 1)];
                in[s] = ws.x + (c.x_per_slot ? slot[s] : slot[s] / k) * p.k1p;
            }
            float acc[CUDA_ROWS_PER_WARP][CUDA_SLOTS_PER_PASS] = {};
            gemv_rows(p.w1_codes + e * code_bytes, p.w1_scales + e * scale_bytes, p.k1p, rows,
                      in, nslots, acc, lane);
            // lane (i, s): channel i of the warp for slot s
            const int s_lane = lane % CUDA_SLOTS_PER_PASS, i_lane = lane / CUDA_SLOTS_PER_PASS;
            if (s_lane >= nslots || i_lane >= per_warp) continue;
            float h_row[CUDA_ROWS_PER_WARP];
#pragma unroll
            for (int r = 0; r < CUDA_ROWS_PER_WARP; r++) {
                float v = 0.0f;
#pragma unroll
                for (int s = 0; s < CUDA_SLOTS_PER_PASS; s++)
                    if (s == s_lane) v = acc[r][s];
                const int64_t n = rows[r];
                v = __fmul_rn(v, n < inter ? scale_low : scale_high);
                if (p.b1) v = __fadd_rn(v, p.b1[e * p.n1 + n]);
                h_row[r] = v;
            }
            float a;
            int64_t ch;
            if (p.gated) {
                const float gate = i_lane == 0 ? h_row[0] : h_row[2];
                const float up = i_lane == 0 ? h_row[1] : h_row[3];
                a = activation_gated(p, e, gate, up);
                ch = g * 2 + i_lane;
            } else {
                float x = h_row[0];
#pragma unroll
                for (int r = 1; r < CUDA_ROWS_PER_WARP; r++)
                    if (r == i_lane) x = h_row[r];
                a = activation_plain(p, x);
                ch = g * 4 + i_lane;
            }
            a = round_to_dtype_dev(a, c.hidden_dtype);
            if (p.fp8_down) {
                const float s8 = p.fp8_scale[e];
                a = e4m3_value(e4m3_encode_satfinite(__fmul_rn(a, s8)));
            }
            ws.u[slot[s_lane] * p.k2p + ch] = a;
        }
    }
}

// W4A4: the FC2 input quantised per 16-value block with the expert's a2 scale, in place.
__global__ void fc2_input_quantize_kernel(cuda_plan_view p, cuda_call_view c, cuda_workspace ws)
{
    const int64_t blocks = p.inter / 16, slots = (c.t1 - c.t0) * p.top_k;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < slots * blocks;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t s = i / blocks, b = i % blocks;
        const int local = ws.slot_local[s];
        if (local < 0) continue;
        float *row = ws.u + s * p.k2p + b * 16;
        float v[16];
#pragma unroll
        for (int j = 0; j < 16; j++) v[j] = row[j];
        nvfp4_fake_quantize16(v, p.a2_global[local]);
#pragma unroll
        for (int j = 0; j < 16; j++) row[j] = v[j];
    }
}

// ------------------------------------------------------------------ FC2
__global__ void __launch_bounds__(CUDA_GEMV_THREADS, CUDA_GEMV_MIN_BLOCKS)
fc2_kernel(cuda_plan_view p, cuda_call_view c, cuda_workspace ws)
{
    const int lane = threadIdx.x % 32;
    const int64_t warp = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int64_t warps = (int64_t)gridDim.x * blockDim.x / 32;
    const int64_t h = p.h;
    const int64_t groups = h / CUDA_ROWS_PER_WARP;
    const int64_t items = (int64_t)ws.touched[0] * groups;
    const int64_t code_bytes = h * (p.k2p / 2), scale_bytes = h * (p.k2p / 16);
    for (int64_t item = warp; item < items; item += warps) {
        const int64_t u = item / groups, g = item % groups;
        const int64_t e = ws.touched[1 + u];
        const int begin = ws.touched_begin[u], end = ws.touched_begin[u + 1];
        int64_t rows[CUDA_ROWS_PER_WARP];
        for (int r = 0; r < CUDA_ROWS_PER_WARP; r++) rows[r] = g * CUDA_ROWS_PER_WARP + r;
        float sc = 1.0f;
        if (p.w4a4) sc = 1.0f / p.a2_global[e];
        else if (p.fp8_down) sc = 1.0f / p.fp8_scale[e];
        const float scale = __fmul_rn(sc, p.w2_global[e]);
        for (int pos = begin; pos < end; pos += CUDA_SLOTS_PER_PASS) {
            const int nslots = min(CUDA_SLOTS_PER_PASS, end - pos);
            int64_t slot[CUDA_SLOTS_PER_PASS];
            const float *in[CUDA_SLOTS_PER_PASS];
#pragma unroll
            for (int s = 0; s < CUDA_SLOTS_PER_PASS; s++) {
                slot[s] = ws.entries[pos + min(s, nslots - 1)];
                in[s] = ws.u + slot[s] * p.k2p;
            }
            float acc[CUDA_ROWS_PER_WARP][CUDA_SLOTS_PER_PASS] = {};
            gemv_rows(p.w2_codes + e * code_bytes, p.w2_scales + e * scale_bytes, p.k2p, rows,
                      in, nslots, acc, lane);
            const int s_lane = lane % CUDA_SLOTS_PER_PASS, r_lane = lane / CUDA_SLOTS_PER_PASS;
            if (s_lane >= nslots || r_lane >= CUDA_ROWS_PER_WARP) continue;
            float v = 0.0f;
#pragma unroll
            for (int r = 0; r < CUDA_ROWS_PER_WARP; r++)
#pragma unroll
                for (int s = 0; s < CUDA_SLOTS_PER_PASS; s++)
                    if (r == r_lane && s == s_lane) v = acc[r][s];
            const int64_t n = rows[r_lane];
            v = __fmul_rn(v, scale);
            if (p.b2) v = __fadd_rn(v, p.b2[e * h + n]);
            ws.y[slot[s_lane] * h + n] = v;
        }
    }
}

// ------------------------------------------------------------------ finalize
// One thread per (token, column): the weighted sum over the token's local slots in slot order,
// as cpu_experts.c's finalize_token (no contraction into FMAs), or the per-slot rows.
__global__ void finalize_kernel(cuda_plan_view p, cuda_call_view c, cuda_workspace ws)
{
    const int64_t h = p.h, k = p.top_k;
    const int64_t col = (int64_t)blockIdx.y * blockDim.x + threadIdx.x;
    const int64_t t = c.t0 + blockIdx.x;
    if (col >= h) return;
    const int64_t s0 = (t - c.t0) * k;
    if (!c.finalize) {
        for (int64_t j = 0; j < k; j++) {
            const float v = ws.slot_local[s0 + j] >= 0 ? ws.y[(s0 + j) * h + col] : 0.0f;
            store_from_f32(c.output, c.output_dtype, (t * k + j) * h + col, v);
        }
        return;
    }
    float sum = 0.0f;
    bool any = false;
    for (int64_t j = 0; j < k; j++) {
        if (ws.slot_local[s0 + j] < 0) continue;
        const float w = p.on_input ? 1.0f : ws.weights[t * k + j];
        const float term = __fmul_rn(w, ws.y[(s0 + j) * h + col]);
        sum = any ? __fadd_rn(sum, term) : term;
        any = true;
    }
    if (c.per_token_scale) sum = __fmul_rn(c.per_token_scale[t], sum);
    store_from_f32(c.output, c.output_dtype, t * h + col, sum);
}

// ------------------------------------------------------------------ host side
static unsigned gemv_grid(int64_t items, int gemv_blocks)
{
    const int64_t warps_per_block = CUDA_GEMV_THREADS / 32;
    int64_t blocks = (items + warps_per_block - 1) / warps_per_block;
    if (blocks > gemv_blocks) blocks = gemv_blocks;
    return (unsigned)(blocks > 0 ? blocks : 1);
}

extern "C" cudaError_t cuda_launch_experts(const cuda_plan_view *p, const cuda_call_view *c,
                                           const cuda_workspace *ws, int gemv_blocks,
                                           cudaStream_t stream)
{
    const int64_t slots = (c->t1 - c->t0) * p->top_k;
    const int64_t most_touched = slots < p->e_loc ? slots : p->e_loc;
    const int64_t fc1_groups = p->inter / (p->gated ? CUDA_ROWS_PER_WARP / 2 : CUDA_ROWS_PER_WARP);
    fc1_kernel<<<gemv_grid(most_touched * fc1_groups, gemv_blocks), CUDA_GEMV_THREADS, 0, stream>>>(
        *p, *c, *ws);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    if (p->w4a4) {
        const int64_t work = slots * (p->inter / 16);
        const int64_t blocks = (work + 255) / 256;
        fc2_input_quantize_kernel<<<(unsigned)(blocks < gemv_blocks ? blocks : gemv_blocks), 256, 0,
                                    stream>>>(*p, *c, *ws);
        err = cudaGetLastError();
        if (err != cudaSuccess) return err;
    }
    fc2_kernel<<<gemv_grid(most_touched * (p->h / CUDA_ROWS_PER_WARP), gemv_blocks),
                 CUDA_GEMV_THREADS, 0, stream>>>(*p, *c, *ws);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    const dim3 grid((unsigned)(c->t1 - c->t0), (unsigned)((p->h + 255) / 256));
    finalize_kernel<<<grid, 256, 0, stream>>>(*p, *c, *ws);
    return cudaGetLastError();
}
