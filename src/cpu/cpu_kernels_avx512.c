/* AVX-512 kernels (compiled with -mavx512f/bw/vl/dq; called only when CPUID reports them).
 *
 * One 16-byte load per (pair, row) zero-extended to 16 dword lanes; vpermps, which reads only
 * the low 4 bits of each index, maps the low nibbles to block A's E2M1 values, and after a
 * 4-bit shift the high nibbles to block B's. One multiply by the broadcast block scale gives
 * the exact weights, which then serve every token of the call: per decoded block, ntok FMAs.
 *
 * Register blocking. The loop runs block by block (A, then B): the 4 rows' weights of one
 * block are decoded first, then each token's 16 activations are loaded once and feed one FMA
 * per row: per block 4 decodes (each with one multiply on the FMA pipes), ntok
 * activation loads and 4 * ntok FMAs into 4 * ntok accumulators (24 of the 32 registers at 6
 * tokens, the most this takes). Decoding a tile once into an L1 buffer for more tokens was
 * tried and did not pay here (see docs/PERF.md): the multiply is not what bounds this loop.
 *
 * Batch invariance. One and two tokens used to keep blocks A and B in separate accumulators
 * (shorter FMA chains); that summed a token's products in another order than 3-6 tokens, so
 * a token's bits depended on how many tokens shared its call. Every count now runs the same
 * loop; at one token the 4 rows still give 4 independent FMA chains per block.
 */
#include "cpu_kernels.h"

#if defined(FP4MOE_X86) && defined(__AVX512F__)
#include <immintrin.h>

#define ALWAYS_INLINE inline __attribute__((always_inline))
#define WIDE_MAX_TOKENS 6 /* the most tokens whose accumulators fit the registers */

/* The whole tile with ntok (1..6) tokens, register-blocked as the header says. Every token
 * count runs this one loop, so each token's lanes see the same operations in the same order
 * (decode, scale multiply, FMA of block A then block B of each pair into one accumulator per
 * row, the same final reduction) whatever other tokens share the call: a token's bits do not
 * depend on its batch. */
static ALWAYS_INLINE void dot_tile_n(const uint8_t *codes, const uint8_t *scales, int64_t pairs,
                                     const float *x, int64_t x_stride, const int ntok,
                                     const float *scale_lut, float *out)
{
    const __m512 table = _mm512_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f, -0.0f,
                                        -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f);
    __m512 acc[WIDE_MAX_TOKENS * CPU_TILE_ROWS];
#pragma GCC unroll 24
    for (int i = 0; i < ntok * CPU_TILE_ROWS; i++)
        acc[i] = _mm512_setzero_ps();
    const uint8_t *c = codes, *s = scales;
    for (int64_t p = 0; p < pairs; p++) {
        _mm_prefetch((const char *)(c + CPU_PREFETCH_CODE_BYTES), _MM_HINT_T0);
        if ((p & 7) == 0) _mm_prefetch((const char *)(s + CPU_PREFETCH_SCALE_BYTES), _MM_HINT_T0);
#pragma GCC unroll 2
        for (int b = 0; b < 2; b++) {
            __m512 w[CPU_TILE_ROWS];
#pragma GCC unroll 4
            for (int r = 0; r < CPU_TILE_ROWS; r++) {
                __m512i i = _mm512_cvtepu8_epi32(
                    _mm_loadu_si128((const __m128i *)(c + r * CPU_PAIR_CODE_BYTES)));
                if (b) i = _mm512_srli_epi32(i, 4);
                w[r] = _mm512_mul_ps(_mm512_permutexvar_ps(i, table),
                                     _mm512_set1_ps(scale_lut[s[2 * r + b]]));
            }
            const float *xb = x + 16 * b;
#pragma GCC unroll 6
            for (int t = 0; t < ntok; t++) {
                __m512 xv = _mm512_loadu_ps(xb + t * x_stride);
                /* Pins the activations in a register: GCC otherwise folds the load into every
                 * row's FMA, and the repeated loads saturate the load ports. */
                __asm__("" : "+v"(xv));
#pragma GCC unroll 4
                for (int r = 0; r < CPU_TILE_ROWS; r++)
                    acc[t * CPU_TILE_ROWS + r] =
                        _mm512_fmadd_ps(w[r], xv, acc[t * CPU_TILE_ROWS + r]);
            }
        }
        c += CPU_TILE_ROWS * CPU_PAIR_CODE_BYTES;
        s += CPU_TILE_ROWS * CPU_PAIR_SCALE_BYTES;
        x += CPU_PAIR_VALUES;
    }
#pragma GCC unroll 6
    for (int t = 0; t < ntok; t++) {
#pragma GCC unroll 4
        for (int r = 0; r < CPU_TILE_ROWS; r++)
            out[t * CPU_TILE_ROWS + r] = _mm512_reduce_add_ps(acc[t * CPU_TILE_ROWS + r]);
    }
}

static void dot_tile_avx512(const uint8_t *codes, const uint8_t *scales, int64_t pairs,
                            const float *x, int64_t x_stride, int ntok, const float *scale_lut,
                            float *out)
{
    switch (ntok) {
    case 1:
        dot_tile_n(codes, scales, pairs, x, x_stride, 1, scale_lut, out);
        break;
    case 2:
        dot_tile_n(codes, scales, pairs, x, x_stride, 2, scale_lut, out);
        break;
    case 3:
        dot_tile_n(codes, scales, pairs, x, x_stride, 3, scale_lut, out);
        break;
    case 4:
        dot_tile_n(codes, scales, pairs, x, x_stride, 4, scale_lut, out);
        break;
    case 5:
        dot_tile_n(codes, scales, pairs, x, x_stride, 5, scale_lut, out);
        break;
    default:
        dot_tile_n(codes, scales, pairs, x, x_stride, 6, scale_lut, out);
        break;
    }
}

const cpu_kernels cpu_kernels_avx512 = {"avx512", WIDE_MAX_TOKENS, dot_tile_avx512};

#else
/* Built on a target without AVX-512 flags: nothing here (the dispatcher never asks). */
typedef int cpu_kernels_avx512_unused;
#endif
