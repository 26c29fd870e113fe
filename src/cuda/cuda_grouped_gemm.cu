// The prefill path's grouped GEMMs on tensor cores (FP16 in, FP32 sums): one launch covers every
// (weight row block, token tile) of every local expert. Weights are the M operand ("swap A/B":
// out^T = W * X^T), read in the repacked A-fragment layout of cuda_repack.cu and decoded in
// registers: nibbles placed into FP16 as value * 2^-14, then multiplied by the E4M3 block scale
// (HMUL2; exact: the product has at most 6 significant bits and is a multiple of 2^-24, so even
// FP16 subnormals hold it), so an MMA sums a whole K step. Activations are the N operand: rows of
// the gathered FP16 inputs, copied into shared memory with cp.async (a 3-8 stage pipeline,
// 128-byte-swizzled rows).
//
// Two kernels share loads and epilogues: on sm_90a two warpgroups of wgmma (each 64 weight rows
// x BN tokens, the decoded A fragment of a warp feeding BN tokens at once); elsewhere 4 warps of
// mma.sync m16n8k16 (each 64 rows x BN/2 tokens). With FP32 hidden states the activations come
// as FP16 hi + lo parts (PARTS = 2, two MMAs per fragment, 22 significant bits as in the decode
// path); with FP16/BF16 ones one part is exact. The tensor cores' FP32 accumulation over the
// whole K differs from the decode path's per-16 sums by ~1e-6 relative (docs/PERF.md).
// Epilogues go through shared memory (coalesced stores, one small loop instead of unrolled
// copies): FC1 applies scales, bias and the activation (gate and up rows of a channel sit in one
// 16-row tile) and stores the FC2 input row; FC2 applies scales and bias and stores the (token,
// slot) row that finalize sums in slot order (deterministic: no atomics on results).
#include "cuda_device.cuh"
#include "cuda_wgmma.cuh"

// WG: warpgroups per block for wgmma (2: 128 weight rows, 4: 256), 0: 4 warps of mma.sync (128
// rows). 256 rows halve the activation bytes each MMA needs from L2, but measured 1-8% slower
// than two blocks of 128 per SM (docs/PERF.md); kept selectable for tuning.
template <int BN, int PARTS, int WG> struct gemm_shape {
    static constexpr int rows = WG ? WG * 64 : 128;
    static constexpr int mt = rows / CUDA_TILE_ROWS; // 16-row A tiles per block
    static constexpr int threads = WG ? WG * 128 : 128;
    static constexpr int b_bytes = BN * PARTS * 128;
    static constexpr int a_bytes = mt * (512 + 64);
    static constexpr int epi_stride = rows + 4; // floats per tile column in the epilogue (no bank conflicts)
    // B first (1024-byte aligned, as the swizzled wgmma layout needs), then A
    static constexpr int stage_bytes = (b_bytes + a_bytes + 1023) / 1024 * 1024;
    static constexpr int stages = WG == 4 ? (208 * 1024 / stage_bytes < 8 ? 208 * 1024 / stage_bytes : 8)
                                  : WG ? (PARTS == 1 ? 5 : BN == 64 ? 4 : 3) : (PARTS == 1 ? 4 : 3);
    // stages loaded ahead of the one computed: wgmma keeps one stage's MMAs in flight while the
    // next is issued, so the stage refilled is the one before the previous
    static constexpr int ahead = WG ? stages - 2 : stages - 1;
    static constexpr int pipe_bytes = stages * stage_bytes;
    static constexpr int epi_bytes = BN * epi_stride * 4;
    static constexpr int main_bytes = pipe_bytes > epi_bytes ? pipe_bytes : epi_bytes;
    // + alignment, then the tile's B row offsets, slots and input row scales (FC1: x_scale,
    // FC2: u_scale)
    static constexpr int smem_bytes = 1024 + main_bytes + BN * 12;
    static constexpr int min_blocks = WG == 4 || BN == 256 ? 1 : 2;
};

// cp.async of the 16 bytes at base + off16 * 16 (the address formed by one mad.wide: from C, ptxas
// re-associated it into three instructions), reading `bytes` of them (16, or 0: 16 zero bytes
// written, nothing read).
static __device__ __forceinline__ void cp_async16(uint32_t smem, const void *base, uint32_t off16,
                                                  uint32_t bytes = 16)
{
    asm volatile("{\n.reg .u64 a;\nmad.wide.u32 a, %2, 16, %1;\ncp.async.cg.shared.global [%0], [a], 16, %3;\n}"
                 ::"r"(smem), "l"(base), "r"(off16), "r"(bytes));
}
// ... only where p holds (p: nonzero)
static __device__ __forceinline__ void cp_async16_if(uint32_t smem, const void *base, uint32_t off16, uint32_t p)
{
    asm volatile("{\n.reg .u64 a;\n.reg .pred p;\nsetp.ne.u32 p, %3, 0;\nmad.wide.u32 a, %2, 16, %1;\n"
                 "@p cp.async.cg.shared.global [%0], [a], 16;\n}"
                 ::"r"(smem), "l"(base), "r"(off16), "r"(p));
}
static __device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> static __device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

static __device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], unsigned addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// What one block works on.
typedef struct gemm_tile {
    const uint8_t *codes, *scales; // the expert's repacked matrix
    int64_t mtiles, kp, mt0;
    int groups;                    // K groups (of CUDA_KGROUP values)
    const uint8_t *b;              // the B rows (FP16 inputs)
    const uint32_t *b_row;         // smem [BN]: each tile column's row in 16-byte units from b, ~0: padding
} gemm_tile;

#define B_PAD 0xffffffffu

// The 16-byte chunks a thread copies each stage, planned once per tile as offsets (in 16-byte
// units, 32 bits: one expert's matrix and the workspace's B rows stay below 64 GiB, which
// cuda_backend.cu checks) from the stage's K group in each source (B rows, A codes, A scales), so
// that a chunk's address costs two instructions and no condition is evaluated per stage (these
// kernels are bound by their per-stage instruction count, docs/PERF.md).
// B: chunk i = threadIdx.x + j * THREADS is chunk i % 8 of staged row i / 8 (part i / 8 / BN,
// column i / 8 % BN), stored at chunk ch ^ (row & 7) (128-byte swizzle); a padding column's
// chunks have a planned source size of 0 (zero fill, no read: copying any real row instead cost
// up to 1.5x at 8 rows per expert). A: the block's MT tiles' codes (32 chunks each, na per
// thread), then their scales (4 chunks each, one for each of the first MT * 4 threads: whole
// warps, a loop-invariant branch); a tile past the matrix's end (the last row block) copies the
// last tile (its rows are never stored).
template <int BN, int PARTS, int MT, int THREADS> struct stage_copies {
    static constexpr int nb = BN * PARTS * 8 / THREADS, na = MT * 32 / THREADS;
    static_assert(nb * THREADS == BN * PARTS * 8 && THREADS % 64 == 0 && BN % (THREADS / 8) == 0,
                  "B chunks per thread, each part's in the same columns");
    static_assert(na * THREADS == MT * 32 && MT * 4 % 32 == 0 && MT * 4 <= THREADS,
                  "A code chunks per thread, scale chunks to whole warps");
    uint32_t b[nb / PARTS], codes[na], scales; // (part 1's B rows follow part 0's by kp values)
    uint32_t b_size[nb / PARTS]; // bytes read: 16, or 0 for a padding column's chunk
    uint32_t b_dst;     // of chunk 0 in the stage (chunk j: + j * THREADS * 16)
    uint32_t scales_on; // whether this thread copies a scale chunk
};

template <int BN, int PARTS, int MT, int THREADS>
static __device__ __forceinline__ void plan_copies(const gemm_tile &t, stage_copies<BN, PARTS, MT, THREADS> &copies)
{
    typedef stage_copies<BN, PARTS, MT, THREADS> C;
    const int ch = threadIdx.x & 7, r0 = threadIdx.x >> 3;
    copies.b_dst = (uint32_t)((r0 * 8 + (ch ^ (r0 & 7))) << 4);
#pragma unroll
    for (int j = 0; j < C::nb / PARTS; j++) {
        const uint32_t row = t.b_row[r0 + j * (THREADS / 8)];
        copies.b[j] = (row == B_PAD ? 0u : row) + (uint32_t)ch;
        copies.b_size[j] = row == B_PAD ? 0u : 16u;
    }
    const int64_t last = t.mtiles - 1;
#pragma unroll
    for (int j = 0; j < C::na; j++) {
        const int i = threadIdx.x + j * THREADS;
        const int64_t mt = min(t.mt0 + i / 32, last);
        copies.codes[j] = (uint32_t)(mt * t.groups * 32 + i % 32);
    }
    const int64_t mt = min(t.mt0 + (int)threadIdx.x / 4, last); // (threads past MT * 4 copy none)
    copies.scales = (uint32_t)(mt * t.groups * 4 + threadIdx.x % 4);
    copies.scales_on = threadIdx.x < MT * 4;
}

// One pipeline stage at shared address `stage`: PARTS x BN activation rows of 64 values, then
// the block's MT A tiles (codes + scales) of K group kg.
template <int BN, int PARTS, int MT, int THREADS>
static __device__ __forceinline__ void load_stage(uint32_t stage, const gemm_tile &t,
                                                  const stage_copies<BN, PARTS, MT, THREADS> &copies, int kg)
{
    typedef stage_copies<BN, PARTS, MT, THREADS> C;
    const uint8_t *b = t.b + (uint32_t)kg * 128u, *codes = t.codes + (uint32_t)kg * 512u;
#pragma unroll
    for (int j = 0; j < C::nb; j++)
        cp_async16(stage + copies.b_dst + j * THREADS * 16, j < C::nb / PARTS ? b : b + t.kp * 2,
                   copies.b[j % (C::nb / PARTS)], copies.b_size[j % (C::nb / PARTS)]);
    const uint32_t sa = stage + BN * PARTS * 128 + threadIdx.x * 16;
#pragma unroll
    for (int j = 0; j < C::na; j++) cp_async16(sa + j * THREADS * 16, codes, copies.codes[j]);
    cp_async16_if(sa + MT * 512, t.scales + (uint32_t)kg * 64u, copies.scales, copies.scales_on);
}

// The lane's code words and scales of A tile mt (of the block's MT) from a stage's A part (shared
// address: the main loop keeps no generic pointer to the pipeline). `volatile` is what keeps
// these loads after the block barrier and the cp.async wait before them (no memory operand).
template <int MT>
static __device__ __forceinline__ void load_a(uint32_t stage_a, int mt, int lane, uint32_t words[4], uint2 *sc)
{
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(words[0]), "=r"(words[1]), "=r"(words[2]), "=r"(words[3])
                 : "r"(stage_a + (mt * 32 + lane) * 16));
    asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];"
                 : "=r"(sc->x), "=r"(sc->y)
                 : "r"(stage_a + MT * 512 + (mt * 8 + lane / 4) * 8));
}

// mma.sync: the warp's 64 x BN/2 product over one stage (4 k steps of 16).
template <int BN, int PARTS>
static __device__ __forceinline__ void compute_stage_mma(uint32_t sb, int wm, int wn, int lane,
                                                         float (*acc)[BN / 16][4])
{
    constexpr int NT = BN / 16; // n8 tiles per warp
    uint32_t words[4][4];
    uint2 sc[4];
#pragma unroll
    for (int mt = 0; mt < 4; mt++) load_a<8>(sb + BN * PARTS * 128, wm * 4 + mt, lane, words[mt], &sc[mt]);
#pragma unroll
    for (int s = 0; s < 4; s++) {
        uint32_t a[4][4];
#pragma unroll
        for (int mt = 0; mt < 4; mt++) decode_a(words[mt], sc[mt], s, a[mt]);
#pragma unroll
        for (int part = 0; part < PARTS; part++) {
#pragma unroll
            for (int np = 0; np < NT / 2; np++) {
                // matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
                const int mi = lane / 8;
                const int r = part * BN + wn * (BN / 2) + np * 16 + (mi / 2) * 8 + lane % 8;
                const int ch = 2 * s + (mi % 2);
                uint32_t b[4];
                ldmatrix_x4(b, sb + (unsigned)((r * 8 + (ch ^ (r & 7))) * 16));
#pragma unroll
                for (int mt = 0; mt < 4; mt++) {
                    mma_16816(acc[mt][2 * np], a[mt], b[0], b[1]);
                    mma_16816(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
                }
            }
        }
    }
}

template <int N> static __device__ __forceinline__ void wgmma_n(float *d, const uint32_t a[4], uint64_t desc)
{
    if constexpr (N == 16) wgmma_m64n16k16(d, a, desc);
    else if constexpr (N == 32) wgmma_m64n32k16(d, a, desc);
    else if constexpr (N == 48) wgmma_m64n48k16(d, a, desc);
    else if constexpr (N == 64) wgmma_m64n64k16(d, a, desc);
    else if constexpr (N == 96) wgmma_m64n96k16(d, a, desc);
    else if constexpr (N == 128) wgmma_m64n128k16(d, a, desc);
    else if constexpr (N == 192) wgmma_m64n192k16(d, a, desc);
    else {
        static_assert(N == 256, "a wgmma width without a wrapper (cuda_wgmma.cuh)");
        wgmma_m64n256k16(d, a, desc);
    }
}

// wgmma: the warpgroup's 64 x BN product over one stage, of which the MMAs cover the first N
// columns (see mma_loop); warp w of the block owns 16-row tile w (of MT) and decodes only that one
// into a[] (untouched until these MMAs complete).
template <int N, int BN, int PARTS, int MT>
static __device__ __forceinline__ void issue_stage_wgmma(uint32_t sb, int mt, int lane, float *acc,
                                                         uint32_t (&a)[4][4])
{
    uint32_t words[4];
    uint2 sc;
    load_a<MT>(sb + BN * PARTS * 128, mt, lane, words, &sc);
#pragma unroll
    for (int s = 0; s < 4; s++) decode_a(words, sc, s, a[s]);
    const uint32_t lo = sb >> 4; // the MMAs' operands at fixed offsets from the stage's descriptor
    wgmma_fence_operands<BN / 2>(acc);
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 4; s++)
#pragma unroll
        for (int part = 0; part < PARTS; part++)
            wgmma_n<N>(acc, a[s], wgmma_desc_sw128(lo + (part * BN * 128 + s * 32) / 16));
    wgmma_commit();
    wgmma_fence_operands<BN / 2>(acc);
}

// Where the main loop stands: the shared-memory offsets (within the pipeline) of the stage
// computed next and of the stage refilled next, advanced without a division.
typedef struct pipe_pos {
    uint32_t comp, load;
} pipe_pos;
template <int BN, int PARTS, int WG> static __device__ __forceinline__ uint32_t next_slot(uint32_t off)
{
    typedef gemm_shape<BN, PARTS, WG> S;
    off += S::stage_bytes;
    return off == (uint32_t)S::pipe_bytes ? 0u : off;
}

// Stage kg of the main loop: wait for its copies, refill the slot ahead, multiply.
template <int N, int BN, int PARTS, int WG, int THREADS>
static __device__ __forceinline__ void run_stage(uint32_t sbase, const gemm_tile &t,
                                                 const stage_copies<BN, PARTS, gemm_shape<BN, PARTS, WG>::mt, THREADS> &copies,
                                                 int kg, pipe_pos &pos, int warp, int lane,
                                                 float *acc, uint32_t (&a)[4][4])
{
    typedef gemm_shape<BN, PARTS, WG> S;
    cp_async_wait<S::ahead - 1>();
    if (WG) fence_proxy_async_shared(); // for wgmma's reads
    // Stage kg landed for all. The slot refilled next was last read by the MMAs of stage
    // kg + ahead - stages: kg - 1 for mma.sync (done in every warp), kg - 2 for wgmma (every
    // warpgroup waited for it after issuing kg - 1, before this barrier).
    __syncthreads();
    const int next = kg + S::ahead;
    if (next < t.groups) load_stage<BN, PARTS, S::mt, THREADS>(sbase + pos.load, t, copies, next);
    cp_async_commit();
    const uint32_t comp = pos.comp;
    pos.load = next_slot<BN, PARTS, WG>(pos.load);
    pos.comp = next_slot<BN, PARTS, WG>(pos.comp);
    if constexpr (WG != 0) {
        // a was last read by stage kg - 2's MMAs: complete
        issue_stage_wgmma<N, BN, PARTS, S::mt>(sbase + comp, warp, lane, acc, a);
        wgmma_wait<1>(); // stage kg - 1's MMAs are done, kg's may run on
    } else {
        compute_stage_mma<BN, PARTS>(sbase + comp, warp / 2, warp % 2, lane,
                                     reinterpret_cast<float (*)[BN / 16][4]>(acc));
    }
}

// The main loop over the K groups. With wgmma, the MMAs cover the tile's first N columns: the
// others are the padding of an expert's last tile (their accumulators stay 0 and are never
// stored). The warp's A fragments come in two sets: stage kg's MMAs read one while stage kg + 1
// is decoded into the other. Each call names its set at compile time and the loop has no exit
// between the two: otherwise ptxas serialises every MMA (warning C7513).
template <int N, int BN, int PARTS, int WG, int THREADS>
static __device__ __forceinline__ void mma_loop(uint32_t sbase, const gemm_tile &t,
                                                const stage_copies<BN, PARTS, gemm_shape<BN, PARTS, WG>::mt, THREADS> &copies,
                                                int warp, int lane, float *acc)
{
    typedef gemm_shape<BN, PARTS, WG> S;
    uint32_t a_even[4][4], a_odd[4][4];
    pipe_pos pos = {0u, (uint32_t)(S::ahead * S::stage_bytes)};
    int kg = 0;
    for (; kg + 1 < t.groups; kg += 2) {
        run_stage<N, BN, PARTS, WG, THREADS>(sbase, t, copies, kg, pos, warp, lane, acc, a_even);
        run_stage<N, BN, PARTS, WG, THREADS>(sbase, t, copies, kg + 1, pos, warp, lane, acc, a_odd);
    }
    if (kg < t.groups) run_stage<N, BN, PARTS, WG, THREADS>(sbase, t, copies, kg, pos, warp, lane, acc, a_even);
    if (WG) wgmma_wait_all();
}

// FC1's epilogue over the columns a thread visits, for activation ACT: one (row g, row g + 8)
// pair `k` of the tile's rows (v: its first row in the tile's results), stored by fc1_pair_store.
// The FC2 input rows u hold the hidden dtype (half the bytes of FP32 with 16-bit hidden states).
template <int BN, int ROWS, int THREADS, int PAIRS, int ACT>
static __device__ __forceinline__ void fc1_columns(const cuda_plan_view &p, const cuda_call_view &c,
                                                   const fc1_pair &k, const float *v, uint8_t *u, int64_t u_row_bytes,
                                                   const int32_t *slot_of, const float *xs_of)
{
#pragma unroll 2
    for (int col = threadIdx.x / PAIRS; col < BN; col += THREADS / PAIRS) {
        if (slot_of[col] < 0) continue;
        // the weights were decoded as value * 2^-14: undo it (exact)
        fc1_pair_store<ACT>(p, k, v[col * (ROWS + 4)] * 16384.0f, v[col * (ROWS + 4) + 8] * 16384.0f, xs_of[col],
                            c.hidden_dtype, u + col * u_row_bytes, c.hidden_dtype);
    }
}

// The tile's results: epi[col * (ROWS + 4) + row]
// holds the FP32 sum of tile row `row` (block-local, 0..ROWS-1) for column `col`. xs_of holds
// each column's input row scale (FC1: hidden row, FC2: u row).
template <int BN, int FC2, int ROWS, int THREADS>
static __device__ __forceinline__ void epilogue(const cuda_plan_view &p, const cuda_call_view &c,
                                                const cuda_workspace &ws, const gemm_tile &t,
                                                int64_t e, int64_t row0, const float *epi,
                                                const int32_t *slot_of, const float *xs_of)
{
    if (FC2) {
        const float scale = fc2_expert_scale(p, e);
        // four consecutive output rows n per column (H is a multiple of 16): one 16-byte store
        // of the (token, slot) row. A thread keeps its four rows (and their bias) in every column.
        constexpr int QUADS = ROWS / 4;
        static_assert(THREADS % QUADS == 0, "a thread's rows are the same in every column");
        const int j = (threadIdx.x % QUADS) * 4;
        const int64_t mtile = t.mt0 + j / 16;
        if (mtile >= t.mtiles) return;
        const int64_t n = mtile * CUDA_TILE_ROWS + j % 16;
        const float4 bias = p.b2 ? *reinterpret_cast<const float4 *>(p.b2 + e * p.h + n)
                                 : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        float *y = ws.y + n;
#pragma unroll 4
        for (int col = threadIdx.x / QUADS; col < BN; col += THREADS / QUADS) {
            const int32_t slot = slot_of[col];
            if (slot < 0) continue;
            const float4 v = *reinterpret_cast<const float4 *>(epi + col * (ROWS + 4) + j);
            // the weights were decoded as value * 2^-14: undo it (exact)
            const float us = xs_of[col];
            float4 o;
            o.x = __fmul_rn(__fmul_rn(v.x * 16384.0f, us), scale);
            o.y = __fmul_rn(__fmul_rn(v.y * 16384.0f, us), scale);
            o.z = __fmul_rn(__fmul_rn(v.z * 16384.0f, us), scale);
            o.w = __fmul_rn(__fmul_rn(v.w * 16384.0f, us), scale);
            if (p.b2) {
                o.x = __fadd_rn(o.x, bias.x), o.y = __fadd_rn(o.y, bias.y);
                o.z = __fadd_rn(o.z, bias.z), o.w = __fadd_rn(o.w, bias.w);
            }
            *reinterpret_cast<float4 *>(y + (int64_t)slot * p.h) = o;
        }
        return;
    }
    // FC1: a thread keeps one pair of rows for every column it visits; the loop is specialised
    // for the activation (one loop over every activation's path was 362 SASS instructions a column)
    constexpr int PAIRS = ROWS / 2;
    static_assert(THREADS % PAIRS == 0, "a thread's pair is the same in every column");
    const int pair = threadIdx.x % PAIRS, mt = pair / 8, g = pair % 8;
    const int64_t mtile = t.mt0 + mt;
    if (mtile >= t.mtiles) return;
    float scale_low, scale_high;
    fc1_expert_scales(p, e, &scale_low, &scale_high);
    const fc1_pair k = fc1_pair_of(p, e, mtile, g, scale_low, scale_high);
    const float *v = epi + mt * 16 + g;
    const int64_t u_row_bytes = cuda_u_row_bytes(p, c);
    uint8_t *u = reinterpret_cast<uint8_t *>(ws.u) + row0 * u_row_bytes;
#define FC1_COLUMNS(ACT) fc1_columns<BN, ROWS, THREADS, PAIRS, ACT>(p, c, k, v, u, u_row_bytes, slot_of, xs_of)
    switch (p.activation) {
    case FP4MOE_ACT_SWIGLU: FC1_COLUMNS(FP4MOE_ACT_SWIGLU); break;
    case FP4MOE_ACT_GEGLU: FC1_COLUMNS(FP4MOE_ACT_GEGLU); break;
    case FP4MOE_ACT_GEGLU_TANH: FC1_COLUMNS(FP4MOE_ACT_GEGLU_TANH); break;
    case FP4MOE_ACT_RELU2: FC1_COLUMNS(FP4MOE_ACT_RELU2); break;
    case FP4MOE_ACT_SILU: FC1_COLUMNS(FP4MOE_ACT_SILU); break;
    case FP4MOE_ACT_GELU: FC1_COLUMNS(FP4MOE_ACT_GELU); break;
    default: FC1_COLUMNS(FP4MOE_ACT_IDENTITY); break;
    }
#undef FC1_COLUMNS
}

template <int BN, int PARTS, int FC2, int WG>
__global__ void __launch_bounds__(gemm_shape<BN, PARTS, WG>::threads, gemm_shape<BN, PARTS, WG>::min_blocks)
grouped_gemm_kernel(cuda_plan_view p, cuda_call_view c, cuda_workspace ws)
{
    typedef gemm_shape<BN, PARTS, WG> S;
    constexpr int THREADS = S::threads;
    extern __shared__ uint8_t smem_raw[];
    uint8_t *smem = smem_raw + ((1024 - ((uintptr_t)smem_raw & 1023)) & 1023);
    wait_for_previous_kernel();
    if ((int)blockIdx.y >= *ws.num_tiles) return;
    const int2 te = ws.tile_list[blockIdx.y];
    const int64_t e = te.x, row0 = te.y;
    uint32_t *b_row = reinterpret_cast<uint32_t *>(smem + S::main_bytes);
    int32_t *slot_of = reinterpret_cast<int32_t *>(b_row + BN);
    float *xs_of = reinterpret_cast<float *>(slot_of + BN);
    const int tid = threadIdx.x;
    const int64_t kp = FC2 ? p.k2p : p.k1p;
    static_assert(BN <= THREADS, "one tile column per thread");
    int32_t slot = -1;
    if (tid < BN) {
        const int r = tid;
        slot = ws.perm[row0 + r];
        slot_of[r] = slot;
        xs_of[r] = slot < 0 ? 0.0f
                   : FC2    ? ws.u_scale[row0 + r]
                            : ws.x_scale[c.x_per_slot ? slot : slot / p.top_k];
        const int64_t row = FC2 ? row0 + r : c.x_per_slot ? slot : slot / p.top_k;
        // (in 16-byte units: the workspace's B rows stay far below 64 GB)
        b_row[r] = slot < 0 ? B_PAD : (uint32_t)(row * PARTS * kp / 8);
    }
    // the tile's columns that hold tokens (the padding is at its end), in quarters of BN
    const int filled = __syncthreads_count(slot >= 0);
    const int nq = (filled * 4 + BN - 1) / BN;

    gemm_tile t;
    t.mtiles = (FC2 ? p.h : p.n1) / CUDA_TILE_ROWS;
    t.kp = kp;
    t.groups = (int)(kp / CUDA_KGROUP);
    t.codes = (FC2 ? p.w2_codes : p.w1_codes) + e * t.mtiles * t.groups * 512;
    t.scales = (FC2 ? p.w2_scales : p.w1_scales) + e * t.mtiles * t.groups * 64;
    t.mt0 = (int64_t)blockIdx.x * S::mt;
    t.b = reinterpret_cast<const uint8_t *>(FC2 ? ws.ub : ws.xb);
    t.b_row = b_row;
    stage_copies<BN, PARTS, S::mt, THREADS> copies;
    plan_copies<BN, PARTS, S::mt, THREADS>(t, copies);
    const uint32_t sbase = (uint32_t)__cvta_generic_to_shared(smem);

    // accumulators: mma.sync [4 tiles][BN/16 n8 tiles][4]; wgmma [BN/8 n8 tiles][4]
    constexpr int ACC = WG ? BN / 2 : BN;
    float acc[ACC];
#pragma unroll
    for (int i = 0; i < ACC; i++) acc[i] = 0.0f;
    wgmma_fence_operands<ACC>(acc);

    for (int s = 0; s < S::ahead; s++) {
        if (s < t.groups) load_stage<BN, PARTS, S::mt, THREADS>(sbase + s * S::stage_bytes, t, copies, s);
        cp_async_commit();
    }
    const int warp = tid / 32, lane = tid % 32;
    if constexpr (WG != 0 && PARTS == 1) {
        // one whole loop per width (a branch between the MMAs of a stage made ptxas serialise
        // them); not with FP32 hidden states (PARTS = 2), whose loops then spilled registers
        switch (nq) {
        case 1: mma_loop<BN / 4, BN, PARTS, WG, THREADS>(sbase, t, copies, warp, lane, acc); break;
        case 2: mma_loop<BN / 2, BN, PARTS, WG, THREADS>(sbase, t, copies, warp, lane, acc); break;
        case 3: mma_loop<3 * BN / 4, BN, PARTS, WG, THREADS>(sbase, t, copies, warp, lane, acc); break;
        default: mma_loop<BN, BN, PARTS, WG, THREADS>(sbase, t, copies, warp, lane, acc); break;
        }
    } else {
        mma_loop<BN, BN, PARTS, WG, THREADS>(sbase, t, copies, warp, lane, acc);
    }
    wgmma_fence_operands<ACC>(acc);
    cp_async_wait<0>();
    __syncthreads(); // every warp is done with the pipeline: its memory holds the epilogue tile
    allow_next_kernel();

    // lane: rows g, g+8 of its 16-row tiles, columns 2q, 2q+1 of each n8 tile
    float *epi = reinterpret_cast<float *>(smem);
    const int g = lane / 4, q = lane % 4;
    constexpr int MT = WG ? 1 : 4, NT = WG ? BN / 8 : BN / 16;
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int row = (WG ? warp : (warp / 2) * 4 + mt) * 16 + g + 8 * (i / 2);
                const int col = (WG ? 0 : (warp % 2) * (BN / 2)) + nt * 8 + 2 * q + (i % 2);
                epi[col * S::epi_stride + row] = acc[(mt * NT + nt) * 4 + i];
            }
    __syncthreads();
    epilogue<BN, FC2, S::rows, THREADS>(p, c, ws, t, e, row0, epi, slot_of, xs_of);
}

template <int BN, int PARTS, int FC2, int WG>
static cudaError_t launch(const cuda_plan_view *p, const cuda_call_view *c, const cuda_workspace *ws,
                          int64_t max_tiles, cudaStream_t stream)
{
    typedef gemm_shape<BN, PARTS, WG> S;
    cudaError_t err = cudaFuncSetAttribute(grouped_gemm_kernel<BN, PARTS, FC2, WG>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, S::smem_bytes);
    if (err != cudaSuccess) return err;
    const int64_t rows = FC2 ? p->h : p->n1;
    const dim3 grid((unsigned)((rows + S::rows - 1) / S::rows), (unsigned)max_tiles);
    return launch_dependent(grouped_gemm_kernel<BN, PARTS, FC2, WG>, grid, dim3(S::threads),
                            (size_t)S::smem_bytes, stream, *p, *c, *ws);
}

template <int BN, int WG>
static cudaError_t launch_tile(const cuda_plan_view *p, const cuda_call_view *c,
                               const cuda_workspace *ws, int fc2, int64_t max_tiles, cudaStream_t stream)
{
    const int parts = c->parts;
    if (fc2) return parts == 2 ? launch<BN, 2, 1, WG>(p, c, ws, max_tiles, stream)
                               : launch<BN, 1, 1, WG>(p, c, ws, max_tiles, stream);
    return parts == 2 ? launch<BN, 2, 0, WG>(p, c, ws, max_tiles, stream)
                      : launch<BN, 1, 0, WG>(p, c, ws, max_tiles, stream);
}

extern "C" cudaError_t cuda_launch_grouped_gemm(const cuda_plan_view *p, const cuda_call_view *c,
                                                const cuda_workspace *ws, int fc2, int tile_tokens,
                                                int64_t max_tiles, int warpgroups, cudaStream_t stream)
{
    if (max_tiles > 65535) return cudaErrorInvalidConfiguration;
    if (warpgroups == 4) {
        if (tile_tokens == 128) return launch_tile<128, 4>(p, c, ws, fc2, max_tiles, stream);
        if (tile_tokens == 64) return launch_tile<64, 4>(p, c, ws, fc2, max_tiles, stream);
        return cudaErrorInvalidValue; // 256 x 256 tiles: too many accumulators
    }
    if (warpgroups == 2) {
        if (tile_tokens == 256) return launch_tile<256, 2>(p, c, ws, fc2, max_tiles, stream);
        if (tile_tokens == 128) return launch_tile<128, 2>(p, c, ws, fc2, max_tiles, stream);
        return launch_tile<64, 2>(p, c, ws, fc2, max_tiles, stream);
    }
    if (tile_tokens == 128) return launch_tile<128, 0>(p, c, ws, fc2, max_tiles, stream);
    if (tile_tokens == 64) return launch_tile<64, 0>(p, c, ws, fc2, max_tiles, stream);
    return cudaErrorInvalidValue; // 256-token tiles need wgmma's registers
}

// Whether this build carries the wgmma kernels for the current device (sm_90a code).
__global__ void wgmma_probe_kernel(int *out)
{
#if defined(FP4MOE_WGMMA)
    *out = 1;
#else
    *out = 0;
#endif
}

extern "C" cudaError_t cuda_gemm_has_wgmma(int *has)
{
    int *d = NULL;
    *has = 0;
    cudaError_t err = cudaMalloc(&d, sizeof(int));
    if (err != cudaSuccess) return err;
    wgmma_probe_kernel<<<1, 1>>>(d);
    err = cudaGetLastError();
    if (err == cudaSuccess) err = cudaMemcpy(has, d, sizeof(int), cudaMemcpyDeviceToHost);
    cudaFree(d);
    return err;
}
