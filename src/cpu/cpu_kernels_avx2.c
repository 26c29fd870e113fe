/* AVX2 + FMA kernels (compiled with -mavx2 -mfma -mf16c; called only when CPUID reports them).
 *
 * vpshufb on the 16 nibbles of a block gives 2*E2M1 as signed bytes (a 16-entry byte table
 * holds every code, sign included); sign extension and int->float conversion make two 8-lane
 * vectors, and one multiply by half the block scale gives the exact weights. */
#include "cpu_kernels.h"

#if defined(FP4MOE_X86) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#define ALWAYS_INLINE inline __attribute__((always_inline))

static ALWAYS_INLINE void dot_tile_n(const uint8_t *codes, const uint8_t *scales, int64_t pairs,
                                     const float *x, int64_t x_stride, const int ntok,
                                     const float *scale_lut, float *out)
{
    const __m128i twice_e2m1 =
        _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    const __m128i low_nibble = _mm_set1_epi8(0x0f);
    __m256 acc[CPU_TILE_ROWS][3];
#pragma GCC unroll 4
    for (int r = 0; r < CPU_TILE_ROWS; r++) {
#pragma GCC unroll 3
        for (int t = 0; t < ntok; t++) acc[r][t] = _mm256_setzero_ps();
    }
    for (int64_t p = 0; p < pairs; p++) {
        const uint8_t *c = codes + p * CPU_TILE_ROWS * CPU_PAIR_CODE_BYTES;
        const uint8_t *s = scales + p * CPU_TILE_ROWS * CPU_PAIR_SCALE_BYTES;
        const float *xp = x + p * CPU_PAIR_VALUES;
#pragma GCC unroll 4
        for (int r = 0; r < CPU_TILE_ROWS; r++) {
            __m128i bytes = _mm_loadu_si128((const __m128i *)(c + r * CPU_PAIR_CODE_BYTES));
            __m128i q[2];
            q[0] = _mm_shuffle_epi8(twice_e2m1, _mm_and_si128(bytes, low_nibble));
            q[1] = _mm_shuffle_epi8(twice_e2m1,
                                    _mm_and_si128(_mm_srli_epi16(bytes, 4), low_nibble));
#pragma GCC unroll 2
            for (int b = 0; b < 2; b++) {
                const __m256 half_scale = _mm256_set1_ps(0.5f * scale_lut[s[2 * r + b]]);
                __m256 w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q[b])),
                                          half_scale);
                __m256 w1 = _mm256_mul_ps(
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q[b], 8))),
                    half_scale);
#pragma GCC unroll 3
                for (int t = 0; t < ntok; t++) {
                    const float *xt = xp + t * x_stride + 16 * b;
                    acc[r][t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xt), acc[r][t]);
                    acc[r][t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xt + 8), acc[r][t]);
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < CPU_TILE_ROWS; r++) {
#pragma GCC unroll 3
        for (int t = 0; t < ntok; t++) {
            __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc[r][t]),
                                  _mm256_extractf128_ps(acc[r][t], 1));
            v = _mm_add_ps(v, _mm_movehl_ps(v, v));
            v = _mm_add_ss(v, _mm_movehdup_ps(v));
            out[t * CPU_TILE_ROWS + r] = _mm_cvtss_f32(v);
        }
    }
}

static void dot_tile_avx2(const uint8_t *codes, const uint8_t *scales, int64_t pairs,
                          const float *x, int64_t x_stride, int ntok, const float *scale_lut,
                          float *out)
{
    switch (ntok) {
    case 1: dot_tile_n(codes, scales, pairs, x, x_stride, 1, scale_lut, out); break;
    case 2: dot_tile_n(codes, scales, pairs, x, x_stride, 2, scale_lut, out); break;
    default: dot_tile_n(codes, scales, pairs, x, x_stride, 3, scale_lut, out); break;
    }
}

const cpu_kernels cpu_kernels_avx2 = {"avx2", 3, dot_tile_avx2};

#else
typedef int cpu_kernels_avx2_unused;
#endif
