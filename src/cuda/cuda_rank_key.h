/* The routing ranking of the CUDA routing warp (cuda_front.cu) as one integer per candidate, so
 * that picking the best is an integer maximum: tier first (DeepSeek-V3 experts of kept groups
 * before the others), then the value (larger first, NaN below every number, -0 equal to +0),
 * then the lower index; 0 means "no candidate". route.c's rule, restated for the GPU.
 * Plain C for host and device: tests/test_rank_key.c checks it against the rule on the host. */
#ifndef FP4MOE_CUDA_RANK_KEY_H
#define FP4MOE_CUDA_RANK_KEY_H

#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define RANK_KEY_FN static __host__ __device__ __forceinline__
#else
#define RANK_KEY_FN static inline
#endif

/* index field: fp4moe allows 2^20 experts; one bit more keeps every valid key above 0 */
#define RANK_KEY_INDEX_BITS 21
#define RANK_KEY_INDEX_MASK ((((uint64_t)1) << RANK_KEY_INDEX_BITS) - 1)

RANK_KEY_FN uint64_t rank_key(float v, int index, int tier)
{
    uint32_t u = 0; /* NaN */
    if (v == v) {
        if (v == 0.0f) v = 0.0f;
        memcpy(&u, &v, sizeof u);
        u = (u & 0x80000000u) ? ~u : (u | 0x80000000u); /* monotone in v; -inf maps above 0 */
    }
    return (uint64_t)tier << (32 + RANK_KEY_INDEX_BITS) | (uint64_t)u << RANK_KEY_INDEX_BITS |
           (RANK_KEY_INDEX_MASK - (uint64_t)index);
}

RANK_KEY_FN int rank_key_index(uint64_t key)
{
    return key != 0 ? (int)(RANK_KEY_INDEX_MASK - (key & RANK_KEY_INDEX_MASK)) : -1;
}

#endif
