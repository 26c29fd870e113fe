// The front of a forward call on the GPU: routing (every method of src/route/route.c, one warp
// per token, same ranking rules), the per-expert slot lists of a token chunk, and the FC1 inputs
// (FP32, router weight on the input, W4A4 fake quantisation). For decode-sized calls all of it
// runs in ONE block, so the call costs one launch before the expert kernels.
#include <math.h>

#include "cuda_device.cuh"
#include "cuda_rank_key.h"


// A loop of the routing warp kept rolled: this code runs once per call, and such code is
// fetched into the SM's instruction cache as it goes (~20 cycles per instruction, 3-4x its
// warm time: docs/PERF.md, decode v9), so a loop body fetched once and run n/32 times beats
// the compiler's default unrolling by 4 (same operations in the same order: same results).
#define RUN_ONCE_LOOP _Pragma("unroll 1")

// ------------------------------------------------------------------ ranking (as route.c)
// The warp's largest key. sm_80+: two 32-bit warp reductions (the high words, then the low
// words of the keys whose high word is the largest) instead of five 64-bit shuffle steps; exact
// for any keys.
static __device__ __forceinline__ uint64_t warp_max_key(uint64_t key)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned hi = (unsigned)(key >> 32), lo = (unsigned)key;
    const unsigned max_hi = __reduce_max_sync(FULL_MASK, hi);
    const unsigned max_lo = __reduce_max_sync(FULL_MASK, hi == max_hi ? lo : 0u);
    return (uint64_t)max_hi << 32 | max_lo;
#else
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const uint64_t other = __shfl_xor_sync(FULL_MASK, key, offset);
        key = other > key ? other : key;
    }
    return key;
#endif
}

// Top `count` of key[0, n) by a scan of shared memory per pick (any n): lane j < count gets
// the j-th id. taken[0, n) is scratch.
static __device__ int warp_select_scan(const float *key, const float *tiers, int n, int count,
                                       float *taken, int lane)
{
    RUN_ONCE_LOOP
    for (int i = lane; i < n; i += 32) taken[i] = 0.0f;
    __syncwarp();
    int mine = -1;
    RUN_ONCE_LOOP
    for (int j = 0; j < count; j++) {
        uint64_t best = 0;
        RUN_ONCE_LOOP
        for (int i = lane; i < n; i += 32) {
            const uint64_t c = taken[i] != 0.0f ? 0 : rank_key(key[i], i, tiers ? (int)tiers[i] : 0);
            best = c > best ? c : best;
        }
        const int index = rank_key_index(warp_max_key(best));
        if (lane == j) mine = index;
        if (lane == 0 && index >= 0) taken[index] = 1.0f;
        __syncwarp();
    }
    return mine;
}

// The same selection with each lane's keys (experts lane + 32 i) in registers: per pick one
// local maximum and one warp maximum; ~4x fewer instructions than the comparison scan of
// session 4, which ran ~10k serial instructions per DeepSeek-V3 token (docs/PERF.md, decode v4).
template <int NPL>
static __device__ int warp_select_regs(const float *key, const float *tiers, int n, int count, int lane)
{
    uint64_t keys[NPL];
#pragma unroll
    for (int i = 0; i < NPL; i++) {
        const int e = lane + 32 * i;
        keys[i] = e < n ? rank_key(key[e], e, tiers ? (int)tiers[e] : 0) : 0;
    }
    int mine = -1;
    RUN_ONCE_LOOP
    for (int j = 0; j < count; j++) {
        uint64_t best = keys[0];
#pragma unroll
        for (int i = 1; i < NPL; i++) best = keys[i] > best ? keys[i] : best;
        best = warp_max_key(best);
        if (lane == j) mine = rank_key_index(best);
#pragma unroll
        for (int i = 0; i < NPL; i++) keys[i] = keys[i] == best ? 0 : keys[i]; // keys are unique
    }
    return mine;
}

// Top `count` of key[0, n) (tier[i] from tiers or 0), best first: lane j < count gets the j-th
// id in its return value. taken[0, n) is scratch (n > 512 only).
static __device__ int warp_select(const float *key, const float *tiers, int n, int count,
                                  float *taken, int lane)
{
    if (n <= 32) return warp_select_regs<1>(key, tiers, n, count, lane);
    if (n <= 128) return warp_select_regs<4>(key, tiers, n, count, lane);
    if (n <= 256) return warp_select_regs<8>(key, tiers, n, count, lane);
    if (n <= 512) return warp_select_regs<16>(key, tiers, n, count, lane);
    return warp_select_scan(key, tiers, n, count, taken, lane);
}

// DeepSeek-V3 group score of group g (its experts' keys b[0, size)): the sum of its two best
// (its best when it has one expert), the top two found by the whole warp.
static __device__ float group_score(const float *b, int base, int size, int lane)
{
    uint64_t first = 0, second = 0;
    RUN_ONCE_LOOP
    for (int i = lane; i < size; i += 32) {
        const uint64_t c = rank_key(b[i], base + i, 0);
        if (c > first) second = first, first = c;
        else if (c > second) second = c;
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    // the warp's best, then the best of the rest (each lane offers its second where its first
    // is the warp's best: keys are unique)
    const uint64_t best = warp_max_key(first);
    second = warp_max_key(first == best ? second : first);
    first = best;
#else
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const uint64_t f = __shfl_xor_sync(FULL_MASK, first, offset);
        const uint64_t s = __shfl_xor_sync(FULL_MASK, second, offset);
        const uint64_t lo = f > first ? first : f, hi_second = s > second ? s : second;
        first = f > first ? f : first;
        second = lo > hi_second ? lo : hi_second;
    }
#endif
    const float top = b[rank_key_index(first) - base];
    return size == 1 ? top : top + b[rank_key_index(second) - base];
}

// ------------------------------------------------------------------ sums (as route.c)
struct compensated {
    float sum, comp;
};

static __device__ __forceinline__ void comp_add(compensated &acc, float value)
{
    const float t = acc.sum + value;
    if (fabsf(acc.sum) >= fabsf(value)) acc.comp += (acc.sum - t) + value;
    else acc.comp += (value - t) + acc.sum;
    acc.sum = t;
}

static __device__ __forceinline__ float comp_result(const compensated &acc)
{
    return isfinite(acc.sum) ? acc.sum + acc.comp : acc.sum;
}

// The sequential compensated sum of the k values held by lanes 0..k-1 (every lane computes it,
// in slot order, exactly as route.c's sum_of).
static __device__ float warp_sum_of_k(float mine, int k)
{
    compensated acc = {0.0f, 0.0f};
    RUN_ONCE_LOOP
    for (int j = 0; j < k; j++) comp_add(acc, __shfl_sync(FULL_MASK, mine, j));
    return comp_result(acc);
}


// Floats of per-warp scratch: logits, keys, taken flags (then kept-group flags), group scores
// (then experts' tiers), the routing bias copy.
static __host__ __device__ __forceinline__ int64_t route_warp_floats(int64_t e) { return 5 * e; }

// The token's logits (and the routing bias) into the warp's scratch, every lane's loads issued
// before its first store: a store through a generic pointer may alias a later load, and the
// compiler would then wait out each ~1 us round trip in turn.
static __device__ void load_router_row(const cuda_plan_view &p, const cuda_route_source &src,
                                       int64_t t, float *logit, float *bias, int lane)
{
    const int n = (int)p.num_experts;
    for (int e0 = 0; e0 < n; e0 += 32 * 8) {
        float v[8], b[8];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const int e = e0 + lane + 32 * j;
            v[j] = e < n ? load_as_f32(src.logits, src.logits_dtype, t * n + e) : 0.0f;
            b[j] = e < n && p.routing_bias ? p.routing_bias[e] : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const int e = e0 + lane + 32 * j;
            if (e < n) logit[e] = v[j];
            if (e < n && p.routing_bias) bias[e] = b[j];
        }
    }
    __syncwarp();
}

// Routes token t into ids[t*k..], weights[t*k..] (and the replay outputs when given).
// chunk_ids (nullable): the block's shared copy of the ids, token t at (t - t0) * k.
static __device__ void route_token_warp(const cuda_plan_view &p, const cuda_route_source &src,
                                        int64_t t, float *scratch, int32_t *ids, float *weights,
                                        int32_t *chunk_ids, int64_t t0, int lane)
{
    const int k = p.top_k;
    const int n = (int)p.num_experts;
    float *logit = scratch, *key = scratch + n, *taken = scratch + 2 * n, *grp = scratch + 3 * n;
    const float *bias = p.routing_bias ? scratch + 4 * n : NULL; // a copy of p.routing_bias
    const int method = p.routing;
    load_router_row(p, src, t, logit, scratch + 4 * n, lane);

    int id = -1;
    float w = 0.0f;
    if (method == FP4MOE_ROUTING_SOFTMAX_TOPK || method == FP4MOE_ROUTING_RENORMALIZE_NAIVE) {
        float max_value = -INFINITY;
        bool nan_here = false;
        RUN_ONCE_LOOP
        for (int e = lane; e < n; e += 32) {
            const float v = bias ? logit[e] + bias[e] : logit[e];
            key[e] = v;
            if (isnan(v)) nan_here = true;
            else max_value = fmaxf(max_value, v);
        }
        const bool any_nan = __any_sync(FULL_MASK, nan_here);
        for (int off = 16; off > 0; off >>= 1)
            max_value = fmaxf(max_value, __shfl_xor_sync(FULL_MASK, max_value, off));
        // Compensated partial sums per lane, combined pairwise: within an ulp of route.c's
        // sequential compensated sum (documented in docs/DESIGN.md).
        compensated acc = {0.0f, 0.0f};
        RUN_ONCE_LOOP
        for (int e = lane; e < n; e += 32) {
            if (isnan(key[e])) continue;
            key[e] = expf(key[e] - max_value);
            comp_add(acc, key[e]);
        }
        for (int off = 16; off > 0; off >>= 1) {
            const float os = __shfl_xor_sync(FULL_MASK, acc.sum, off);
            const float oc = __shfl_xor_sync(FULL_MASK, acc.comp, off);
            // both lanes of a pair must end with the same value: add in lane order
            compensated a = acc, b = {os, oc};
            if ((lane & off) != 0) { a = b; b = acc; }
            comp_add(a, b.sum);
            a.comp += b.comp;
            acc = a;
        }
        const float denominator = comp_result(acc);
        __syncwarp();
        RUN_ONCE_LOOP
        for (int e = lane; e < n; e += 32) key[e] = key[e] / denominator;
        __syncwarp();
        id = warp_select(key, NULL, n, k, taken, lane);
        if (lane < k) w = any_nan ? NAN : key[id];
        if (method == FP4MOE_ROUTING_RENORMALIZE_NAIVE) {
            const float sum = warp_sum_of_k(w, k);
            w = w / sum;
        }
    } else if (method == FP4MOE_ROUTING_RENORMALIZE) {
        RUN_ONCE_LOOP
        for (int e = lane; e < n; e += 32) key[e] = bias ? logit[e] + bias[e] : logit[e];
        __syncwarp();
        id = warp_select(key, NULL, n, k, taken, lane);
        const float max_value = key[__shfl_sync(FULL_MASK, id, 0)];
        if (lane < k) w = expf(key[id] - max_value);
        const float sum = warp_sum_of_k(w, k);
        w = w / sum;
    } else if (method == FP4MOE_ROUTING_DEEPSEEK_V3 || method == FP4MOE_ROUTING_MINIMAX2) {
        RUN_ONCE_LOOP
        for (int e = lane; e < n; e += 32)
            key[e] = bias ? sigmoid_dev(logit[e]) + bias[e] : sigmoid_dev(logit[e]);
        __syncwarp();
        const float *tiers = NULL;
        if (method == FP4MOE_ROUTING_DEEPSEEK_V3) {
            const int n_group = p.n_group > 0 ? p.n_group : 1;
            const int group_size = n / n_group;
            const int keep = p.topk_group > 0 ? p.topk_group : n_group;
            if (keep < n_group) {
                float *score = grp;
                RUN_ONCE_LOOP
                for (int g = 0; g < n_group; g++) {
                    const float v = group_score(key + g * group_size, g * group_size, group_size, lane);
                    if (lane == 0) score[g] = v;
                }
                __syncwarp();
                const int g_sel = warp_select(score, NULL, n_group, keep, taken, lane);
                // The selection is done with its scratch: kept-group flags go there, then
                // every expert's tier (1 inside a kept group) over the group scores.
                float *kept = taken, *tier = grp;
                for (int g = lane; g < n_group; g += 32) kept[g] = 0.0f;
                __syncwarp();
                if (lane < keep) kept[g_sel] = 1.0f;
                __syncwarp();
                RUN_ONCE_LOOP
                for (int e = lane; e < n; e += 32) tier[e] = kept[e / group_size];
                __syncwarp();
                tiers = tier;
            }
        }
        id = warp_select(key, tiers, n, k, taken, lane);
        if (lane < k) w = sigmoid_dev(logit[id]);
        const float scale = p.routed_scaling_factor;
        const float sum = warp_sum_of_k(w, k);
        if (method == FP4MOE_ROUTING_MINIMAX2) w = w * scale / (sum + 1e-20f);
        else if (p.norm_topk_prob) w = w / (sum + 1e-20f) * scale;
        else w = w * scale;
    } else {
        const bool on_sigmoid =
            method == FP4MOE_ROUTING_SIGMOID || method == FP4MOE_ROUTING_SIGMOID_RENORM;
        RUN_ONCE_LOOP
        for (int e = lane; e < n; e += 32) key[e] = on_sigmoid ? sigmoid_dev(logit[e]) : logit[e];
        __syncwarp();
        id = warp_select(key, NULL, n, k, taken, lane);
        if (lane < k) w = method == FP4MOE_ROUTING_TOPK ? key[id] : sigmoid_dev(logit[id]);
        if (method == FP4MOE_ROUTING_SIGMOID_RENORM && p.norm_topk_prob) {
            const float sum = warp_sum_of_k(w, k);
            const float denominator = (isnan(sum) || sum > 1e-20f) ? sum : 1e-20f;
            w = w / denominator;
        }
    }
    if (lane < k) {
        ids[t * k + lane] = id;
        if (chunk_ids) chunk_ids[(t - t0) * k + lane] = id;
        weights[t * k + lane] = w;
        if (src.ids_out) src.ids_out[t * k + lane] = id;
        if (src.weights_out) src.weights_out[t * k + lane] = w;
    }
    __syncwarp();
}

// The caller's ids and weights for token t (fp4moe_forward_routed).
static __device__ void copy_routed_token(const cuda_plan_view &p, const cuda_route_source &src,
                                         int64_t t, int32_t *ids, float *weights, int32_t *chunk_ids,
                                         int64_t t0, int lane)
{
    const int k = p.top_k;
    for (int j = lane; j < k; j += 32) {
        const int32_t id = src.topk_ids[t * k + j];
        ids[t * k + j] = id;
        if (chunk_ids) chunk_ids[(t - t0) * k + j] = id;
        weights[t * k + j] = load_as_f32(src.topk_weights, src.topk_weights_dtype, t * k + j);
    }
}

static __device__ void route_or_copy(const cuda_plan_view &p, const cuda_route_source &src,
                                     int64_t t, float *scratch, const cuda_workspace &ws,
                                     int32_t *chunk_ids, int64_t t0, int lane)
{
    if (src.logits) route_token_warp(p, src, t, scratch, ws.ids, ws.weights, chunk_ids, t0, lane);
    else copy_routed_token(p, src, t, ws.ids, ws.weights, chunk_ids, t0, lane);
}

__global__ void route_kernel(cuda_plan_view p, int64_t num_tokens, cuda_route_source src,
                             cuda_workspace ws)
{
    extern __shared__ float route_smem[];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t t = (int64_t)blockIdx.x * (blockDim.x / 32) + warp;
    if (t >= num_tokens) return;
    route_or_copy(p, src, t, route_smem + warp * route_warp_floats(p.num_experts), ws, NULL, 0, lane);
}

// ------------------------------------------------------------------ slot lists + FC1 inputs
// A chunk slot's global id and local expert: from the block's shared copies when it has them.
static __device__ __forceinline__ int32_t slot_id(const int32_t *chunk_ids, const cuda_workspace &ws,
                                                  const cuda_call_view &c, int64_t k, int64_t s)
{
    return chunk_ids ? chunk_ids[s] : ws.ids[c.t0 * k + s];
}
static __device__ __forceinline__ int32_t slot_local_of(const int32_t *chunk_slots, const cuda_workspace &ws,
                                                        int64_t s)
{
    return chunk_slots ? chunk_slots[s] : ws.slot_local[s];
}

// Slot s's local expert, or -1 when its expert is not local, recorded in ws.slot_local (and in
// chunk_slots when given). Ids outside [0, E) (fp4moe_forward_routed cannot check them without
// a sync) fall outside the local range too and contribute nothing.
static __device__ __forceinline__ int record_slot_local(const cuda_plan_view &p, const cuda_call_view &c,
                                                        const cuda_workspace &ws, const int32_t *chunk_ids,
                                                        int32_t *chunk_slots, int64_t s)
{
    const int64_t local = (int64_t)slot_id(chunk_ids, ws, c, p.top_k, s) - p.e0;
    const int32_t mine = local >= 0 && local < p.e_loc ? (int32_t)local : -1;
    ws.slot_local[s] = mine;
    if (chunk_slots) chunk_slots[s] = mine;
    return mine;
}

// Groups the chunk's slots by local expert: touched experts in ascending order, each with its
// range of entries (slots in any order: every slot's result is computed independently, so the
// order inside an expert changes nothing). The per-expert counts live in shared memory when
// they fit (each global round trip of the counts cost ~1 us of a T = 1 call).
#define FRONT_SMEM_COUNTS 1024
// chunk_ids / chunk_slots (nullable): shared copies of the chunk's ids (written by this block's
// routing) and of the slots' local experts, read instead of their global rows (each global
// write-then-read cost a round trip of a T = 1 call).
static __device__ void build_slot_lists(const cuda_plan_view &p, const cuda_call_view &c,
                                        const cuda_workspace &ws, const int32_t *chunk_ids,
                                        int32_t *chunk_slots)
{
    __shared__ int32_t smem_counts[FRONT_SMEM_COUNTS];
    const int64_t k = p.top_k, slots = (c.t1 - c.t0) * k;
    const int e_loc = (int)p.e_loc;
    int32_t *counts = e_loc <= FRONT_SMEM_COUNTS ? smem_counts : ws.counts;
    const int tid = threadIdx.x, nthreads = blockDim.x;
    for (int e = tid; e < e_loc; e += nthreads) counts[e] = 0;
    __syncthreads();
    for (int64_t s = tid; s < slots; s += nthreads) {
        const int local = record_slot_local(p, c, ws, chunk_ids, chunk_slots, s);
        if (local >= 0) atomicAdd(&counts[local], 1);
    }
    __syncthreads();
    // Each thread owns a contiguous run of experts.
    const int per = (e_loc + nthreads - 1) / nthreads;
    const int e_begin = min(e_loc, tid * per), e_end = min(e_loc, e_begin + per);
    int my_slots = 0, my_touched = 0;
    for (int e = e_begin; e < e_end; e++) {
        my_slots += counts[e];
        my_touched += counts[e] > 0;
    }
    // one scan for both when slots < 2^15 (a decode chunk has at most CUDA_TOKEN_CHUNK * k)
    int total_slots, total_touched, slot_prefix, touched_prefix;
    if (e_loc < 65536 && slots < 32768) {
        int total;
        const int prefix = block_exclusive_scan(my_slots << 16 | my_touched, &total);
        slot_prefix = prefix >> 16, touched_prefix = prefix & 0xffff;
        total_slots = total >> 16, total_touched = total & 0xffff;
    } else {
        slot_prefix = block_exclusive_scan(my_slots, &total_slots);
        touched_prefix = block_exclusive_scan(my_touched, &total_touched);
    }
    for (int e = e_begin; e < e_end; e++) {
        const int n = counts[e];
        if (n > 0) {
            ws.touched[1 + touched_prefix] = e;
            ws.touched_begin[touched_prefix] = slot_prefix;
            touched_prefix++;
        }
        counts[e] = slot_prefix; // the fill cursor from here on
        slot_prefix += n;
    }
    if (tid == 0) {
        ws.touched[0] = total_touched;
        ws.touched_begin[total_touched] = total_slots;
    }
    __syncthreads();
    for (int64_t s = tid; s < slots; s += nthreads) {
        const int local = slot_local_of(chunk_slots, ws, s);
        if (local >= 0) ws.entries[atomicAdd(&counts[local], 1)] = (int32_t)s;
    }
}

// The same lists for a chunk of at most 32 slots, by one warp without block barriers or atomics:
// lane s holds slot s's expert and counts the slots and touched experts below it over the
// chunk's slots. Inside an expert the slots come in ascending order. Why so: this code runs
// once per call, and code that runs once is fetched from L2 into the SM's instruction cache as
// it goes (~20 cycles per instruction: docs/PERF.md, decode v9), so few distinct instructions
// (a rolled loop) beat build_slot_lists' barriers and atomics (1.8-3.6 us at T = 1: decode v8).
static __device__ void build_slot_lists_warp(const cuda_plan_view &p, const cuda_call_view &c,
                                             const cuda_workspace &ws, const int32_t *chunk_ids,
                                             int32_t *chunk_slots, int lane)
{
    const int64_t k = p.top_k;
    const int slots = (int)((c.t1 - c.t0) * k);
    const int mine = lane < slots ? record_slot_local(p, c, ws, chunk_ids, chunk_slots, lane) : -1;
    const bool valid = mine >= 0;
    const unsigned below_me = (1u << lane) - 1u;
    const unsigned same = __match_any_sync(FULL_MASK, mine);
    const bool first = valid && (same & below_me) == 0;
    const unsigned firsts = __ballot_sync(FULL_MASK, first), valids = __ballot_sync(FULL_MASK, valid);
    int slots_below = 0, touched_below = 0;
    RUN_ONCE_LOOP
    for (int j = 0; j < slots; j++) {
        const int other = __shfl_sync(FULL_MASK, mine, j);
        const bool lower = other >= 0 && other < mine;
        slots_below += lower;
        touched_below += lower && (firsts >> j & 1u);
    }
    if (valid) {
        ws.entries[slots_below + __popc(same & below_me)] = lane;
        if (first) {
            ws.touched[1 + touched_below] = mine;
            ws.touched_begin[touched_below] = slots_below;
        }
    }
    if (lane == 0) {
        ws.touched[0] = __popc(firsts);
        ws.touched_begin[__popc(firsts)] = __popc(valids);
    }
}

// FC1 inputs per slot (the router weight scales the input, or W4A4 quantises it with the
// expert's scale), by the routing block: FP32 rows padded to k1p with zeros, then each row as
// FP16 hi/lo B fragments with its power-of-two scale (cuda_internal.cuh).
static __device__ void prepare_slot_inputs(const cuda_plan_view &p, const cuda_call_view &c,
                                          const cuda_workspace &ws, const int32_t *chunk_slots)
{
    const int64_t k = p.top_k, h = p.h, blocks = p.k1p / 16;
    const int64_t rows = c.x_per_slot ? (c.t1 - c.t0) * k : (c.t1 - c.t0);
    for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) ws.x_amax[r] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < rows * blocks; i += blockDim.x) {
        const int64_t row = i / blocks, b = i % blocks;
        const int64_t t = c.t0 + (c.x_per_slot ? row / k : row);
        int local = -1;
        if (c.x_per_slot) {
            local = slot_local_of(chunk_slots, ws, row);
            if (local < 0) continue; // never read
        }
        float v[16];
#pragma unroll
        for (int j = 0; j < 16; j++) {
            const int64_t col = b * 16 + j;
            v[j] = col < h ? load_as_f32(c.hidden, c.hidden_dtype, t * h + col) : 0.0f;
        }
        if (b * 16 < h) {
            if (p.on_input) {
                const float w = ws.weights[c.t0 * k + row];
#pragma unroll
                for (int j = 0; j < 16; j++)
                    v[j] = round_to_dtype_dev(__fmul_rn(w, v[j]), c.hidden_dtype);
            }
            if (p.w4a4) nvfp4_fake_quantize16(v, p.a1_global[local]);
        }
        float amax = 0.0f;
        float4 *dst = (float4 *)(ws.x + row * p.k1p + b * 16);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            dst[j] = make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
            amax = fmaxf(amax, fmaxf(fmaxf(fabsf(v[4 * j]), fabsf(v[4 * j + 1])),
                                     fmaxf(fabsf(v[4 * j + 2]), fabsf(v[4 * j + 3]))));
        }
        // amax >= 0 (or NaN, which then wins and gives scale 1): int order is float order
        atomicMax(&ws.x_amax[row], __float_as_int(amax));
    }
    __syncthreads();
    const int64_t units = p.k1p / 4;
    for (int64_t i = threadIdx.x; i < rows * units; i += blockDim.x) {
        const int64_t row = i / units, unit = i % units;
        if (c.x_per_slot && slot_local_of(chunk_slots, ws, row) < 0) continue;
        float inverse;
        const float scale = row_scale_from_amax(__int_as_float(ws.x_amax[row]), &inverse);
        if (unit == 0) ws.x_scale[row] = scale;
        store_b_unit(ws.xh, row, units, unit, hilo_unit(ws.x + row * p.k1p, unit, inverse), c.parts);
    }
}

// FC1 input of one token (the plain case): one block per row, straight from hidden_states to
// the FP16 hi/lo B fragments (no FP32 copy), the row's amax reduced in the block.
static __device__ void prepare_token_input(const cuda_plan_view &p, const cuda_call_view &c,
                                           const cuda_workspace &ws, int row)
{
    __shared__ float warp_max[CUDA_FRONT_THREADS / 32];
    const int h = (int)p.h, units = (int)(p.k1p / 4);
    const int64_t t = c.t0 + row;
    const char *x = (const char *)c.hidden;
    float amax = 0.0f;
#pragma unroll 8
    for (int i = threadIdx.x; i < h; i += blockDim.x)
        amax = fmaxf(amax, fabsf(load_as_f32(x, c.hidden_dtype, t * h + i)));
    for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
    __syncthreads();
    amax = 0.0f;
    for (int w = 0; w < (int)(blockDim.x / 32); w++) amax = fmaxf(amax, warp_max[w]);
    float inverse;
    const float scale = row_scale_from_amax(amax, &inverse);
    if (threadIdx.x == 0) ws.x_scale[row] = scale;
    // UNITS units per thread and round, all their loads before the first store (a store through
    // a generic pointer may alias a later load: the compiler would wait out each round trip)
    constexpr int UNITS = 4;
    for (int i0 = threadIdx.x; i0 < units; i0 += UNITS * blockDim.x) {
        float v[UNITS][4];
#pragma unroll
        for (int u = 0; u < UNITS; u++) {
            const int i = i0 + u * blockDim.x, base = (i / 4) * 16 + (i % 4) * 2;
            const int cols[4] = {base, base + 1, base + 8, base + 9};
#pragma unroll
            for (int j = 0; j < 4; j++)
                v[u][j] = i < units && cols[j] < h ? load_as_f32(x, c.hidden_dtype, t * h + cols[j]) * inverse : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < UNITS; u++) {
            const int i = i0 + u * blockDim.x;
            __half hi[4], lo[4];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                hi[j] = __float2half_rn(v[u][j]);
                lo[j] = c.parts == 2 ? __float2half_rn(v[u][j] - __half2float(hi[j])) : hi[j];
            }
            if (i < units)
                store_b_unit(ws.xh, row, units, i,
                             make_uint4(pack_half2(hi[0], hi[1]), pack_half2(hi[2], hi[3]),
                                        pack_half2(lo[0], lo[1]), pack_half2(lo[2], lo[3])),
                             c.parts);
        }
    }
}

__global__ void __launch_bounds__(CUDA_FRONT_THREADS)
front_kernel(cuda_plan_view p, cuda_call_view c, cuda_workspace ws, cuda_route_source src,
             int route_in_block, int route_warps)
{
    extern __shared__ float front_smem[];
    if (blockIdx.x > 0) { // blocks 1..: one token row each (inputs shared by the token's slots)
        prepare_token_input(p, c, ws, blockIdx.x - 1);
        allow_next_kernel();
        return;
    }
    // the chunk's ids and slots' local experts in shared memory when its slots fit (every fused
    // call: at most CUDA_FUSED_FRONT_MAX_TOKENS tokens of top_k <= 32)
    __shared__ int32_t chunk_ids[CUDA_FUSED_FRONT_MAX_TOKENS * 32], chunk_slots[CUDA_FUSED_FRONT_MAX_TOKENS * 32];
    const bool local_copies = (c.t1 - c.t0) * p.top_k <= CUDA_FUSED_FRONT_MAX_TOKENS * 32;
    if (route_in_block) {
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
        if (warp < route_warps) {
            float *scratch = front_smem + warp * route_warp_floats(p.num_experts);
            for (int64_t t = c.t0 + warp; t < c.t1; t += route_warps)
                route_or_copy(p, src, t, scratch, ws, local_copies ? chunk_ids : NULL, c.t0, lane);
        }
        __syncthreads();
    }
    const int32_t *ids_here = route_in_block && local_copies ? chunk_ids : NULL;
    if ((c.t1 - c.t0) * p.top_k <= 32) {
        if (threadIdx.x < 32) build_slot_lists_warp(p, c, ws, ids_here, local_copies ? chunk_slots : NULL, threadIdx.x);
    } else {
        build_slot_lists(p, c, ws, ids_here, local_copies ? chunk_slots : NULL);
    }
    __syncthreads();
    if (c.x_per_slot) prepare_slot_inputs(p, c, ws, local_copies ? chunk_slots : NULL);
    // FC2 reads its inputs' padding columns (against zero weights): they must be numbers. With
    // fc2_direct, FC1's epilogue writes the B rows themselves (row scale 1), so the padding is
    // zeroed in those rows.
    const int64_t pad = p.k2p - p.inter, slots = (c.t1 - c.t0) * p.top_k;
    if (c.fc2_direct) {
        for (int64_t s = threadIdx.x; s < slots; s += blockDim.x) ws.u_scale[s] = 1.0f;
        for (int64_t i = threadIdx.x; i < slots * pad; i += blockDim.x)
            *reinterpret_cast<uint16_t *>(reinterpret_cast<char *>(ws.uh) + (i / pad) * b_row_bytes(p.k2p, 1) +
                                          b_row_hi_offset(p.inter + i % pad)) = 0;
    } else {
        for (int64_t i = threadIdx.x; i < slots * pad; i += blockDim.x)
            ws.u[(i / pad) * p.k2p + p.inter + i % pad] = 0.0f;
    }
    // FC1 (launched as a programmatic dependent) may start its launch now; it waits for all of
    // this kernel's writes before reading them.
    allow_next_kernel();
}

// ------------------------------------------------------------------ host side
extern "C" size_t cuda_route_smem_bytes(int64_t num_experts, int warps)
{
    return (size_t)route_warp_floats(num_experts) * sizeof(float) * (size_t)warps;
}

// The dynamic shared-memory limit is a per-kernel attribute of the whole process, shared by every
// plan: each plan sets the same value (ROUTE_SMEM_LIMIT, which bounds every plan's need), so a
// plan made later with fewer experts can never lower it under an earlier plan's launches.
extern "C" cudaError_t cuda_front_set_smem(size_t bytes)
{
    if (bytes > ROUTE_SMEM_LIMIT) return cudaErrorInvalidValue;
    cudaError_t err = cudaFuncSetAttribute(front_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           (int)ROUTE_SMEM_LIMIT);
    if (err != cudaSuccess) return err;
    return cudaFuncSetAttribute(route_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                (int)ROUTE_SMEM_LIMIT);
}

extern "C" cudaError_t cuda_launch_route(const cuda_plan_view *p, int64_t num_tokens,
                                         const cuda_route_source *src, const cuda_workspace *ws,
                                         int route_warps, size_t route_smem, cudaStream_t stream)
{
    const unsigned blocks = (unsigned)((num_tokens + route_warps - 1) / route_warps);
    route_kernel<<<blocks, route_warps * 32, route_smem, stream>>>(*p, num_tokens, *src, *ws);
    return cudaGetLastError();
}

extern "C" cudaError_t cuda_launch_front(const cuda_plan_view *p, const cuda_call_view *c,
                                         const cuda_workspace *ws, const cuda_route_source *src,
                                         int route_in_block, int route_warps, size_t route_smem,
                                         cudaStream_t stream)
{
    // block 0 routes and groups the slots; blocks 1.. prepare the token rows (plain inputs)
    const unsigned blocks = 1 + (c->x_per_slot ? 0 : (unsigned)(c->t1 - c->t0));
    front_kernel<<<blocks, CUDA_FRONT_THREADS, route_in_block ? route_smem : 0, stream>>>(
        *p, *c, *ws, *src, route_in_block, route_warps);
    return cudaGetLastError();
}
