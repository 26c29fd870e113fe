// Device helpers shared by the decode (cuda_experts.cu) and prefill (cuda_prefill*.cu) kernels:
// programmatic dependent launch, the NVFP4 register decode (into FP16, or BF16 for the decode
// path's direct BF16 FC2 rows), the tensor-core MMAs, and the activations (bit for bit those of
// src/cpu/cpu_activation.c).
#ifndef FP4MOE_CUDA_DEVICE_CUH
#define FP4MOE_CUDA_DEVICE_CUH

#include "cuda_internal.cuh"

#define FULL_MASK 0xffffffffu

// Programmatic dependent launch: each expert kernel is launched while the previous kernel of
// the call finishes (hiding the launch gap) and waits here until that kernel's results are
// visible; each lets the next one launch once its own main work is issued.
// (sm_90+; older GPUs serialise the launches anyway, and the calls compile to nothing.)
static __device__ __forceinline__ void wait_for_previous_kernel()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
static __device__ __forceinline__ void allow_next_kernel()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}

// Register i (0..3) of a repacked word as a half2 of e2m1 * 2^-14: an e2m1 value's magnitude bits
// go to FP16 bits 9-11 and its sign to bit 15 (lower half: even k, upper: odd k). The repack
// (cuda_repack.cu, CUDA_DECODE_SHIFT_*) stores each register's bits where one shift lines up
// its magnitudes and one its signs; registers 2 and 3 need one shift for both: 11 integer
// instructions for the four registers.
static __device__ __forceinline__ uint32_t decode_pair(uint32_t w, int i)
{
    const uint32_t mag = 0x0e000e00u, sign = 0x80008000u;
    switch (i) {
    case 0: return ((w >> 3) & mag) | ((w << 15) & sign);
    case 1: return ((w << 4) & mag) | ((w << 14) & sign);
    case 2: return (w << 7) & (mag | sign);
    default: return w & (mag | sign);
    }
}

static __device__ __forceinline__ uint32_t hmul2_bits(uint32_t a, __half2 s)
{
    __half2 h = __hmul2(*reinterpret_cast<__half2 *>(&a), s);
    return *reinterpret_cast<uint32_t *>(&h);
}

// The E4M3 block scales of rows g (low half) and g + 8 of k step s as a half2 (exact): sc holds
// the lane's 8 scale bytes, 4 k steps of each row.
static __device__ __forceinline__ __half2 block_scales(uint2 sc, int s)
{
    const uint32_t pair = __byte_perm(sc.x, sc.y, s | ((s + 4) << 4));
    return __half2(__nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(pair & 0xffffu), __NV_E4M3));
}

// The lane's A fragment of a 16-row tile for k step s of a stage, block scales applied: words
// are the lane's 16 code bytes, sc its 8 scale bytes.
static __device__ __forceinline__ void decode_a(const uint32_t words[4], uint2 sc, int s, uint32_t a[4])
{
    // each row's scale broadcast to a half2
    const __half2 both = block_scales(sc, s);
    const __half2 s_g = __low2half2(both), s_g8 = __high2half2(both);
    a[0] = hmul2_bits(decode_pair(words[s], 0), s_g);
    a[1] = hmul2_bits(decode_pair(words[s], 1), s_g8);
    a[2] = hmul2_bits(decode_pair(words[s], 2), s_g);
    a[3] = hmul2_bits(decode_pair(words[s], 3), s_g8);
}

// BF16 operands (decode FC2 with BF16 hidden states: its inputs are BF16 values, which FP16
// holds only under a row scale found by a pass over the row). Register i of a repacked word as a
// bf16x2 of e2m1 * 2^-126: decode_pair's bits, the magnitudes at BF16 bits 6-8 (0.5 lands on the
// BF16 subnormal 2^-127).
static __device__ __forceinline__ uint32_t decode_pair_bf16(uint32_t w, int i)
{
    const uint32_t mag = 0x01c001c0u, sign = 0x80008000u;
    switch (i) {
    case 0: return ((w >> 6) & mag) | ((w << 15) & sign);
    case 1: return ((w << 1) & mag) | ((w << 14) & sign);
    case 2: return ((w << 4) & mag) | ((w << 7) & sign);
    default: return ((w >> 3) & mag) | (w & sign);
    }
}

static __device__ __forceinline__ uint32_t hmul2_bf16_bits(uint32_t a, __nv_bfloat162 s)
{
    __nv_bfloat162 h = __hmul2(*reinterpret_cast<__nv_bfloat162 *>(&a), s);
    return *reinterpret_cast<uint32_t *>(&h);
}

// decode_a in BF16 (the decode path's direct BF16 FC2 rows): the weights times their block
// scales times 2^-7, exact (an e2m1 times an E4M3 value has at most 6 significant bits; the
// scale enters as E4M3 * 2^119, at most 1.75 * 2^127, and the products lie in [2^-17, 2^5],
// normal numbers).
#define BF16_WEIGHT_UNSCALE 128.0f /* 2^7: what the MMA sums are multiplied by */
static __device__ __forceinline__ void decode_a_bf16(const uint32_t words[4], uint2 sc, int s, uint32_t a[4])
{
    const float2 f = __half22float2(block_scales(sc, s));
    const float two_119 = __int_as_float((119 + 127) << 23);
    const __nv_bfloat162 both = __floats2bfloat162_rn(f.x * two_119, f.y * two_119);
    const __nv_bfloat162 s_g = __low2bfloat162(both), s_g8 = __high2bfloat162(both);
    a[0] = hmul2_bf16_bits(decode_pair_bf16(words[s], 0), s_g);
    a[1] = hmul2_bf16_bits(decode_pair_bf16(words[s], 1), s_g8);
    a[2] = hmul2_bf16_bits(decode_pair_bf16(words[s], 2), s_g);
    a[3] = hmul2_bf16_bits(decode_pair_bf16(words[s], 3), s_g8);
}

static __device__ __forceinline__ void mma_16816_bf16(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

static __device__ __forceinline__ void mma_16816(float d[4], const uint32_t a[4], uint32_t b0,
                                                 uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Activations (as cpu_activation.c).
static __device__ __forceinline__ float sigmoid_dev(float z) { return 1.0f / (1.0f + expf(-z)); }
static __device__ __forceinline__ float gelu_erf(float x)
{
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
}
static __device__ __forceinline__ float gelu_tanh(float x)
{
    return 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
}

// SwiGLU's per-expert shape (activation SWIGLU only).
typedef struct swiglu_shape {
    float limit, alpha, beta;
} swiglu_shape;

// ACT: the activation when known at compile time (a loop specialised for it), else -1 and
// `activation` is read.
template <int ACT>
static __device__ __forceinline__ float activation_gated(int activation, const swiglu_shape &k, float gate, float up)
{
    const int act = ACT >= 0 ? ACT : activation;
    if (act == FP4MOE_ACT_SWIGLU) {
        const float g = gate > k.limit ? k.limit : gate;
        const float u = up > k.limit ? k.limit : (up < -k.limit ? -k.limit : up);
        return g * sigmoid_dev(k.alpha * g) * (u + k.beta);
    }
    if (act == FP4MOE_ACT_GEGLU) return gelu_erf(gate) * up;
    return gelu_tanh(gate) * up;
}

template <int ACT> static __device__ __forceinline__ float activation_plain(int activation, float x)
{
    switch (ACT >= 0 ? ACT : activation) {
    case FP4MOE_ACT_RELU2: return x > 0.0f ? x * x : (x != x ? x : 0.0f);
    case FP4MOE_ACT_SILU: return x * sigmoid_dev(x);
    case FP4MOE_ACT_GELU: return gelu_erf(x);
    default: return x;
    }
}

// FC1's epilogue works on a (row g, row g + 8) pair of a 16-row tile: gate row g and up row g+8
// of channel tile*8+g when gated, rows g, g+8 as two channels otherwise. A thread keeps its pair
// over all the columns (slots) it visits, so everything that does not depend on the column is
// read once (the loads of a loop that also stores through u could not be hoisted by the compiler).
typedef struct fc1_pair {
    float scale[2];     // each row's global scale (times the W4A4 input scale)
    float bias[2];      // each row's FC1 bias (has_bias only)
    int64_t ch[2];      // the output channel(s) in u: ch[0] gated, ch[0] and ch[1] plain
    swiglu_shape shape; // SwiGLU's clamp and shape
    float fp8_scale;    // FP8 down-input scale (fp8_down only)
    bool has_bias;
} fc1_pair;

// FC2's output scale of expert e: the weights' global scale over the scale its inputs were
// quantised with (W4A4's a2, FP8 down's static scale), as the CPU applies them.
static __device__ __forceinline__ float fc2_expert_scale(const cuda_plan_view &p, int64_t e)
{
    float sc = 1.0f;
    if (p.w4a4) sc = 1.0f / p.a2_global[e];
    else if (p.fp8_down) sc = 1.0f / p.fp8_scale[e];
    return __fmul_rn(sc, p.w2_global[e]);
}

// FC1's output scales of expert e: the weights' global scales of the rows below / from `inter`
// (the gate and up halves) times W4A4's input scale, each product formed in FP32 as the CPU does.
static __device__ __forceinline__ void fc1_expert_scales(const cuda_plan_view &p, int64_t e, float *low, float *high)
{
    const float sa = p.w4a4 ? 1.0f / p.a1_global[e] : 1.0f;
    *low = __fmul_rn(sa, p.w1_global[e]);
    *high = __fmul_rn(sa, p.w1_global_half2[e]);
}

// Expert e's pair (g, g + 8) of 16-row tile `tile`. scale_low / scale_high: the global scale
// (times the W4A4 input scale) of the rows below / from `inter` (the gate and up halves).
static __device__ __forceinline__ fc1_pair fc1_pair_of(const cuda_plan_view &p, int64_t e, int64_t tile, int g,
                                                       float scale_low, float scale_high)
{
    fc1_pair k;
    const int64_t inter = p.inter;
    int64_t n[2];
    if (p.gated) {
        const int64_t ch = tile * 8 + g;
        n[0] = p.gate_first ? ch : ch + inter; // gate row
        n[1] = p.gate_first ? ch + inter : ch; // up row
        k.ch[0] = k.ch[1] = ch;
    } else {
        n[0] = tile * CUDA_TILE_ROWS + g;
        n[1] = n[0] + 8;
        k.ch[0] = n[0], k.ch[1] = n[1];
    }
    k.has_bias = p.b1 != NULL;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        k.scale[r] = n[r] < inter ? scale_low : scale_high;
        k.bias[r] = k.has_bias ? p.b1[e * p.n1 + n[r]] : 0.0f;
    }
    const bool swiglu = p.activation == FP4MOE_ACT_SWIGLU;
    k.shape.limit = swiglu ? p.swiglu_limit[e] : 0.0f;
    k.shape.alpha = swiglu ? p.swiglu_alpha[e] : 0.0f;
    k.shape.beta = swiglu ? p.swiglu_beta[e] : 0.0f;
    k.fp8_scale = p.fp8_down ? p.fp8_scale[e] : 1.0f;
    return k;
}

// FC1's epilogue for one column of the pair: acc_g, acc_g8 are the sums of rows g and g+8
// (weights decoded as value * 2^-14 already undone). Applies the input row scale xs, each row's
// global scale, the bias, the activation, the rounding to the hidden dtype and the FP8 down-input
// quantisation, and stores into the slot's FC2 input row u, of dtype u_dtype (FP32, or the
// hidden dtype: exact, as the values are rounded to it already, or are E4M3 values with FP8
// down inputs, which FP16 and BF16 hold). fc1_pair_apply hands each value and its column to
// `store` instead.
template <int ACT, typename STORE>
static __device__ __forceinline__ void fc1_pair_apply(const cuda_plan_view &p, const fc1_pair &k, float acc_g,
                                                      float acc_g8, float xs, int hidden_dtype, STORE store)
{
    const float acc[2] = {acc_g, acc_g8};
    float h[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float v = __fmul_rn(__fmul_rn(acc[r], xs), k.scale[r]);
        if (k.has_bias) v = __fadd_rn(v, k.bias[r]);
        h[r] = v;
    }
    float a[2];
    int outputs;
    if (p.gated) {
        a[0] = activation_gated<ACT>(p.activation, k.shape, h[0], h[1]);
        outputs = 1;
    } else {
        a[0] = activation_plain<ACT>(p.activation, h[0]);
        a[1] = activation_plain<ACT>(p.activation, h[1]);
        outputs = 2;
    }
#pragma unroll
    for (int o = 0; o < 2; o++) {
        if (o >= outputs) break;
        float v = round_to_dtype_dev(a[o], hidden_dtype);
        if (p.fp8_down) v = e4m3_value(e4m3_encode_satfinite(__fmul_rn(v, k.fp8_scale)));
        store(k.ch[o], v);
    }
}

template <int ACT>
static __device__ __forceinline__ void fc1_pair_store(const cuda_plan_view &p, const fc1_pair &k, float acc_g,
                                                      float acc_g8, float xs, int hidden_dtype, void *u, int u_dtype)
{
    fc1_pair_apply<ACT>(p, k, acc_g, acc_g8, xs, hidden_dtype,
                        [&](int64_t ch, float v) { store_from_f32(u, u_dtype, ch, v); });
}

// Exclusive block-wide scan of one int per thread; returns the thread's prefix, *total the sum.
static __device__ int block_exclusive_scan(int value, int *total)
{
    __shared__ int warp_sums[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    int inclusive = value;
    for (int off = 1; off < 32; off <<= 1) {
        const int o = __shfl_up_sync(FULL_MASK, inclusive, off);
        if (lane >= off) inclusive += o;
    }
    if (lane == 31) warp_sums[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        int s = lane < warps ? warp_sums[lane] : 0;
        for (int off = 1; off < 32; off <<= 1) {
            const int o = __shfl_up_sync(FULL_MASK, s, off);
            if (lane >= off) s += o;
        }
        if (lane < warps) warp_sums[lane] = s; // inclusive over warps
    }
    __syncthreads();
    const int warp_prefix = warp > 0 ? warp_sums[warp - 1] : 0;
    *total = warp_sums[warps - 1];
    __syncthreads();
    return warp_prefix + inclusive - value;
}

// Launches a kernel as a programmatic dependent of the previous one on the stream (it must call
// wait_for_previous_kernel before reading that kernel's results).
template <typename... Params, typename... Args>
static cudaError_t launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                    cudaStream_t stream, Args... args)
{
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
    cudaError_t err = cudaLaunchKernelEx(&config, kernel, args...);
    return err != cudaSuccess ? err : cudaGetLastError();
}

#endif
