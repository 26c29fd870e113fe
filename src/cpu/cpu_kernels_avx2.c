/* AVX2 + FMA + F16C kernels (compiled with -mavx2 -mfma -mf16c; called only when CPUID
 * reports them).
 *
 * E2M1 values are exact in FP16 with a zero low byte, so vpshufb on the nibbles with a table of
 * FP16 high bytes (sign included), an unpack against zero and vcvtph2ps give the exact FP32
 * values: about two operations per 8 weights where sign extension plus int->float conversion
 * took four. Two rows' codes (32 bytes) go through the nibble split and table in one
 * instruction each; one multiply by the broadcast block scale finishes the decode. */
#include "cpu_kernels.h"

#if defined(FP4MOE_X86) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

#define ALWAYS_INLINE inline __attribute__((always_inline))

/* FP16 high bytes of the E2M1 values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives. */
#define E2M1_F16_HIGH_BYTES                                                                        \
    0x00, 0x38, 0x3c, 0x3e, 0x40, 0x42, 0x44, 0x46, (char)0x80, (char)0xb8, (char)0xbc,            \
        (char)0xbe, (char)0xc0, (char)0xc2, (char)0xc4, (char)0xc6

static ALWAYS_INLINE void dot_tile_n(const uint8_t *codes, const uint8_t *scales, int64_t pairs,
                                     const float *x, int64_t x_stride, const int ntok,
                                     const float *scale_lut, float *out)
{
    const __m256i table = _mm256_setr_epi8(E2M1_F16_HIGH_BYTES, E2M1_F16_HIGH_BYTES);
    const __m256i low_nibble = _mm256_set1_epi8(0x0f);
    const __m256i zero = _mm256_setzero_si256();
    /* One token: blocks A and B accumulate apart (acc[r][0], acc[r][1]) so that the chain of
     * dependent FMAs per pair halves; the FMA latency, not the decode, bounded that case. */
    const int split = ntok == 1;
    __m256 acc[CPU_TILE_ROWS][3];
#pragma GCC unroll 4
    for (int r = 0; r < CPU_TILE_ROWS; r++) {
#pragma GCC unroll 3
        for (int t = 0; t < ntok + split; t++)
            acc[r][t] = _mm256_setzero_ps();
    }
    for (int64_t p = 0; p < pairs; p++) {
        const uint8_t *c = codes + p * CPU_TILE_ROWS * CPU_PAIR_CODE_BYTES;
        const uint8_t *s = scales + p * CPU_TILE_ROWS * CPU_PAIR_SCALE_BYTES;
        const float *xp = x + p * CPU_PAIR_VALUES;
        _mm_prefetch((const char *)(c + CPU_PREFETCH_CODE_BYTES), _MM_HINT_T0);
        if ((p & 7) == 0) _mm_prefetch((const char *)(s + CPU_PREFETCH_SCALE_BYTES), _MM_HINT_T0);
            /* Rows 2g and 2g+1 sit in the low and high 128-bit lanes. */
#pragma GCC unroll 2
        for (int g = 0; g < CPU_TILE_ROWS / 2; g++) {
            const __m256i bytes = _mm256_loadu_si256((const __m256i *)(c + 32 * g));
            __m256i q[2];
            q[0] = _mm256_shuffle_epi8(table, _mm256_and_si256(bytes, low_nibble));
            q[1] = _mm256_shuffle_epi8(table,
                                       _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_nibble));
#pragma GCC unroll 2
            for (int b = 0; b < 2; b++) {
                /* Words: lane 0 = row 2g values 0-7 (lo) / 8-15 (hi), lane 1 = row 2g+1. */
                _Alignas(32) uint16_t half[32];
                _mm256_store_si256((__m256i *)half, _mm256_unpacklo_epi8(zero, q[b]));
                _mm256_store_si256((__m256i *)(half + 16), _mm256_unpackhi_epi8(zero, q[b]));
#pragma GCC unroll 2
                for (int h = 0; h < 2; h++) {
                    const int r = 2 * g + h;
                    const __m256 scale = _mm256_broadcast_ss(&scale_lut[s[2 * r + b]]);
                    const __m128i lo_h = _mm_load_si128((const __m128i *)(half + 8 * h));
                    const __m128i hi_h = _mm_load_si128((const __m128i *)(half + 16 + 8 * h));
                    const __m256 w0 = _mm256_mul_ps(_mm256_cvtph_ps(lo_h), scale);
                    const __m256 w1 = _mm256_mul_ps(_mm256_cvtph_ps(hi_h), scale);
#pragma GCC unroll 3
                    for (int t = 0; t < ntok; t++) {
                        const float *xt = xp + t * x_stride + 16 * b;
                        const int a = split ? b : t;
                        acc[r][a] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xt), acc[r][a]);
                        acc[r][a] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xt + 8), acc[r][a]);
                    }
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < CPU_TILE_ROWS; r++) {
#pragma GCC unroll 3
        for (int t = 0; t < ntok; t++) {
            const __m256 sum = split ? _mm256_add_ps(acc[r][0], acc[r][1]) : acc[r][t];
            __m128 v = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
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
    case 1:
        dot_tile_n(codes, scales, pairs, x, x_stride, 1, scale_lut, out);
        break;
    case 2:
        dot_tile_n(codes, scales, pairs, x, x_stride, 2, scale_lut, out);
        break;
    default:
        dot_tile_n(codes, scales, pairs, x, x_stride, 3, scale_lut, out);
        break;
    }
}

const cpu_kernels cpu_kernels_avx2 = {"avx2", 3, dot_tile_avx2};

#else
typedef int cpu_kernels_avx2_unused;
#endif
