/* AVX2 + FMA + F16C kernels (compiled with -mavx2 -mfma -mf16c; called only when CPUID
 * reports them).
 *
 * E2M1 values are exact in FP16 with a zero low byte, so vpshufb on the nibbles with a table of
 * FP16 high bytes (sign included), an unpack against zero and vcvtph2ps give the exact FP32
 * values: about two operations per 8 weights where sign extension plus int->float conversion
 * took four. Two rows' codes (32 bytes) go through the nibble split and table in one
 * instruction each; one multiply by the broadcast block scale finishes the decode. One token
 * takes a BF16 variant with fewer shuffles (dot_tile_one), four or more tokens decode each
 * segment of the tile once (dot_tile_many).
 *
 * Batch invariance. Every path gives each token's row the same FP32 operations in the same
 * order: the same exact weights times the same scale, 8 lanes per row, lane j adding values
 * j and j + 8 of block A, then of block B, of each pair into one accumulator, the same
 * horizontal reduction at the end. So a token's bits do not depend on how many tokens share
 * its call. (The one-token kernel used to keep 4 lanes per row and separate A/B accumulators:
 * another order of the same sum.) */
#include "cpu_kernels.h"

#if defined(FP4MOE_X86) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

#define ALWAYS_INLINE inline __attribute__((always_inline))

/* BF16 of the E2M1 values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives (FP32 = BF16 << 16,
 * exact): low and high bytes. */
#define E2M1_BF16_LOW_BYTES                                                                        \
    0x00, 0x00, (char)0x80, (char)0xc0, 0x00, 0x40, (char)0x80, (char)0xc0, 0x00, 0x00,            \
        (char)0x80, (char)0xc0, 0x00, 0x40, (char)0x80, (char)0xc0
#define E2M1_BF16_HIGH_BYTES                                                                       \
    0x00, 0x3f, 0x3f, 0x3f, 0x40, 0x40, 0x40, 0x40, (char)0x80, (char)0xbf, (char)0xbf,            \
        (char)0xbf, (char)0xc0, (char)0xc0, (char)0xc0, (char)0xc0
/* FP16 high bytes of the same values. */
#define E2M1_F16_HIGH_BYTES                                                                        \
    0x00, 0x38, 0x3c, 0x3e, 0x40, 0x42, 0x44, 0x46, (char)0x80, (char)0xb8, (char)0xbc,            \
        (char)0xbe, (char)0xc0, (char)0xc2, (char)0xc4, (char)0xc6

/* Tokens per call (the set's max_tokens) and, above FUSED_MAX_TOKENS, the decode-once path:
 * the fused loop decodes every block again for each group of 3 tokens, and the decode (about
 * 20 shuffle-port operations per 64 weights) then costs more than the FMAs. Decoding a
 * segment of the tile once into an L1 buffer of FP32 weights and running all the tokens over
 * it leaves mostly FMAs. Each lane sums the same products in the same order as the fused loop. */
#define AVX2_MAX_TOKENS 24
#define FUSED_MAX_TOKENS 3
#define GROUP_TOKENS 6   /* tokens per pass over the buffer: 2 rows x 6 = 12 accumulators */
#define SEGMENT_PAIRS 32 /* 32 pairs x 4 rows x 32 floats = 16 KB */

/* One to three tokens. */
static ALWAYS_INLINE void dot_tile_n(const uint8_t *codes, const uint8_t *scales, int64_t pairs,
                                     const float *x, int64_t x_stride, const int ntok,
                                     const float *scale_lut, float *out)
{
    const __m256i table = _mm256_setr_epi8(E2M1_F16_HIGH_BYTES, E2M1_F16_HIGH_BYTES);
    const __m256i low_nibble = _mm256_set1_epi8(0x0f);
    const __m256i zero = _mm256_setzero_si256();
    __m256 acc[CPU_TILE_ROWS][FUSED_MAX_TOKENS];
#pragma GCC unroll 4
    for (int r = 0; r < CPU_TILE_ROWS; r++) {
#pragma GCC unroll 3
        for (int t = 0; t < ntok; t++)
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
                        acc[r][t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xt), acc[r][t]);
                        acc[r][t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xt + 8), acc[r][t]);
                    }
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < CPU_TILE_ROWS; r++) {
#pragma GCC unroll 3
        for (int t = 0; t < ntok; t++) {
            const __m256 sum = acc[r][t];
            __m128 v = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
            v = _mm_add_ps(v, _mm_movehl_ps(v, v));
            v = _mm_add_ss(v, _mm_movehdup_ps(v));
            out[t * CPU_TILE_ROWS + r] = _mm_cvtss_f32(v);
        }
    }
}

/* One token (decode). The FP16 route of dot_tile_n spends most of its time on the shuffle ports
 * (table, unpack, lane extraction, and vcvtph2ps, two operations each). Here two table lookups
 * give the BF16 low and high bytes, and E2M1 values are exact in BF16, so two unpacks (bytes to
 * words, words to dwords against zero) leave FP32 values with no conversion. One vpermd first
 * puts code bytes 0-3 and 8-11 of each row in the low 128-bit lane and 4-7, 12-15 in the high
 * one, so that the in-lane unpacks come out as values 0-7 and 8-15 of one row in lane order:
 * the same weights in the same lanes as dot_tile_n, FMAs and reduction in the same order, so
 * the bits equal those of any other token count. */
static void dot_tile_one(const uint8_t *codes, const uint8_t *scales, int64_t pairs, const float *x,
                         const float *scale_lut, float *out)
{
    const __m256i table_lo = _mm256_setr_epi8(E2M1_BF16_LOW_BYTES, E2M1_BF16_LOW_BYTES);
    const __m256i table_hi = _mm256_setr_epi8(E2M1_BF16_HIGH_BYTES, E2M1_BF16_HIGH_BYTES);
    const __m256i low_nibble = _mm256_set1_epi8(0x0f);
    const __m256i zero = _mm256_setzero_si256();
    const __m256i spread = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    __m256 acc[CPU_TILE_ROWS];
#pragma GCC unroll 4
    for (int r = 0; r < CPU_TILE_ROWS; r++)
        acc[r] = _mm256_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        const uint8_t *c = codes + p * CPU_TILE_ROWS * CPU_PAIR_CODE_BYTES;
        const uint8_t *s = scales + p * CPU_TILE_ROWS * CPU_PAIR_SCALE_BYTES;
        const float *xp = x + p * CPU_PAIR_VALUES;
        _mm_prefetch((const char *)(c + CPU_PREFETCH_CODE_BYTES), _MM_HINT_T0);
        if ((p & 7) == 0) _mm_prefetch((const char *)(s + CPU_PREFETCH_SCALE_BYTES), _MM_HINT_T0);
#pragma GCC unroll 2
        for (int g = 0; g < CPU_TILE_ROWS / 2; g++) {
            /* Rows 2g and 2g + 1, dwords reordered as the comment above says. */
            const __m256i bytes = _mm256_permutevar8x32_epi32(
                _mm256_loadu_si256((const __m256i *)(c + 32 * g)), spread);
#pragma GCC unroll 2
            for (int b = 0; b < 2; b++) {
                const __m256i nib = b ? _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_nibble)
                                      : _mm256_and_si256(bytes, low_nibble);
                const __m256i lo = _mm256_shuffle_epi8(table_lo, nib);
                const __m256i hi = _mm256_shuffle_epi8(table_hi, nib);
                /* BF16 words of row 2g + h: values 0-3, 8-11 (low lane), 4-7, 12-15 (high). */
                const __m256i words[2] = {_mm256_unpacklo_epi8(lo, hi),
                                          _mm256_unpackhi_epi8(lo, hi)};
                const float *xb = xp + 16 * b;
                const __m256 x0 = _mm256_loadu_ps(xb), x1 = _mm256_loadu_ps(xb + 8);
#pragma GCC unroll 2
                for (int h = 0; h < 2; h++) {
                    const int r = 2 * g + h;
                    const __m256 scale = _mm256_broadcast_ss(&scale_lut[s[2 * r + b]]);
                    const __m256 w0 = _mm256_mul_ps(
                        _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, words[h])), scale);
                    const __m256 w1 = _mm256_mul_ps(
                        _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, words[h])), scale);
                    acc[r] = _mm256_fmadd_ps(w0, x0, acc[r]);
                    acc[r] = _mm256_fmadd_ps(w1, x1, acc[r]);
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < CPU_TILE_ROWS; r++) {
        __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
        v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        v = _mm_add_ss(v, _mm_movehdup_ps(v));
        out[r] = _mm_cvtss_f32(v);
    }
}

/* Decoded weights of pairs [0, np): w[((p * 2 + b) * 4 + r) * 16 + j], block b of row r. */
static void decode_segment(const uint8_t *codes, const uint8_t *scales, int64_t np,
                           const float *scale_lut, float *w)
{
    const __m256i table = _mm256_setr_epi8(E2M1_F16_HIGH_BYTES, E2M1_F16_HIGH_BYTES);
    const __m256i low_nibble = _mm256_set1_epi8(0x0f);
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t p = 0; p < np; p++) {
        const uint8_t *c = codes + p * CPU_TILE_ROWS * CPU_PAIR_CODE_BYTES;
        const uint8_t *s = scales + p * CPU_TILE_ROWS * CPU_PAIR_SCALE_BYTES;
        _mm_prefetch((const char *)(c + CPU_PREFETCH_CODE_BYTES), _MM_HINT_T0);
        if ((p & 7) == 0) _mm_prefetch((const char *)(s + CPU_PREFETCH_SCALE_BYTES), _MM_HINT_T0);
#pragma GCC unroll 2
        for (int g = 0; g < CPU_TILE_ROWS / 2; g++) {
            const __m256i bytes = _mm256_loadu_si256((const __m256i *)(c + 32 * g));
            __m256i q[2];
            q[0] = _mm256_shuffle_epi8(table, _mm256_and_si256(bytes, low_nibble));
            q[1] = _mm256_shuffle_epi8(table,
                                       _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_nibble));
#pragma GCC unroll 2
            for (int b = 0; b < 2; b++) {
                const __m256i lo = _mm256_unpacklo_epi8(zero, q[b]);
                const __m256i hi = _mm256_unpackhi_epi8(zero, q[b]);
#pragma GCC unroll 2
                for (int h = 0; h < 2; h++) {
                    const int r = 2 * g + h;
                    const __m256 scale = _mm256_broadcast_ss(&scale_lut[s[2 * r + b]]);
                    const __m128i lo_h =
                        h ? _mm256_extracti128_si256(lo, 1) : _mm256_castsi256_si128(lo);
                    const __m128i hi_h =
                        h ? _mm256_extracti128_si256(hi, 1) : _mm256_castsi256_si128(hi);
                    float *wr = w + ((p * 2 + b) * CPU_TILE_ROWS + r) * 16;
                    _mm256_store_ps(wr, _mm256_mul_ps(_mm256_cvtph_ps(lo_h), scale));
                    _mm256_store_ps(wr + 8, _mm256_mul_ps(_mm256_cvtph_ps(hi_h), scale));
                }
            }
        }
    }
}

/* Rows r0, r0 + 1 and ntok tokens over np decoded pairs; accumulators acc[t * 4 + r] in memory
 * in and out. */
static ALWAYS_INLINE void dot_decoded_n(const float *w, int64_t np, const float *x,
                                        int64_t x_stride, const int ntok, const int r0,
                                        __m256 *acc_mem)
{
    __m256 acc[GROUP_TOKENS][2];
#pragma GCC unroll 6
    for (int t = 0; t < ntok; t++) {
        acc[t][0] = acc_mem[t * CPU_TILE_ROWS + r0];
        acc[t][1] = acc_mem[t * CPU_TILE_ROWS + r0 + 1];
    }
    for (int64_t p = 0; p < np; p++) {
#pragma GCC unroll 2
        for (int b = 0; b < 2; b++) {
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                const float *wp = w + ((p * 2 + b) * CPU_TILE_ROWS + r0) * 16 + 8 * h;
                __m256 w0 = _mm256_load_ps(wp), w1 = _mm256_load_ps(wp + 16);
                /* Loaded once each, not folded into every token's FMA (load ports). */
                __asm__("" : "+x"(w0), "+x"(w1));
                const float *xb = x + p * CPU_PAIR_VALUES + 16 * b + 8 * h;
#pragma GCC unroll 6
                for (int t = 0; t < ntok; t++) {
                    __m256 xv = _mm256_loadu_ps(xb + t * x_stride);
                    __asm__("" : "+x"(xv));
                    acc[t][0] = _mm256_fmadd_ps(w0, xv, acc[t][0]);
                    acc[t][1] = _mm256_fmadd_ps(w1, xv, acc[t][1]);
                }
            }
        }
    }
#pragma GCC unroll 6
    for (int t = 0; t < ntok; t++) {
        acc_mem[t * CPU_TILE_ROWS + r0] = acc[t][0];
        acc_mem[t * CPU_TILE_ROWS + r0 + 1] = acc[t][1];
    }
}

static void dot_decoded(const float *w, int64_t np, const float *x, int64_t x_stride, int ntok,
                        __m256 *acc_mem)
{
    for (int r0 = 0; r0 < CPU_TILE_ROWS; r0 += 2) {
        switch (ntok) {
        case 1:
            dot_decoded_n(w, np, x, x_stride, 1, r0, acc_mem);
            break;
        case 2:
            dot_decoded_n(w, np, x, x_stride, 2, r0, acc_mem);
            break;
        case 3:
            dot_decoded_n(w, np, x, x_stride, 3, r0, acc_mem);
            break;
        case 4:
            dot_decoded_n(w, np, x, x_stride, 4, r0, acc_mem);
            break;
        case 5:
            dot_decoded_n(w, np, x, x_stride, 5, r0, acc_mem);
            break;
        default:
            dot_decoded_n(w, np, x, x_stride, 6, r0, acc_mem);
            break;
        }
    }
}

static void dot_tile_many(const uint8_t *codes, const uint8_t *scales, int64_t pairs,
                          const float *x, int64_t x_stride, int ntok, const float *scale_lut,
                          float *out)
{
    _Alignas(32) float w[SEGMENT_PAIRS * 2 * CPU_TILE_ROWS * 16];
    _Alignas(32) __m256 acc[AVX2_MAX_TOKENS * CPU_TILE_ROWS];
    for (int i = 0; i < ntok * CPU_TILE_ROWS; i++)
        acc[i] = _mm256_setzero_ps();
    const int groups = (ntok + GROUP_TOKENS - 1) / GROUP_TOKENS;
    for (int64_t p0 = 0; p0 < pairs; p0 += SEGMENT_PAIRS) {
        const int64_t np = pairs - p0 < SEGMENT_PAIRS ? pairs - p0 : SEGMENT_PAIRS;
        decode_segment(codes + p0 * CPU_TILE_ROWS * CPU_PAIR_CODE_BYTES,
                       scales + p0 * CPU_TILE_ROWS * CPU_PAIR_SCALE_BYTES, np, scale_lut, w);
        for (int g = 0, t0 = 0; g < groups; g++) {
            const int nt = (ntok - t0 + (groups - g) - 1) / (groups - g);
            dot_decoded(w, np, x + t0 * x_stride + p0 * CPU_PAIR_VALUES, x_stride, nt,
                        acc + t0 * CPU_TILE_ROWS);
            t0 += nt;
        }
    }
    for (int i = 0; i < ntok * CPU_TILE_ROWS; i++) {
        __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc[i]), _mm256_extractf128_ps(acc[i], 1));
        v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        v = _mm_add_ss(v, _mm_movehdup_ps(v));
        out[i] = _mm_cvtss_f32(v);
    }
}

static void dot_tile_avx2(const uint8_t *codes, const uint8_t *scales, int64_t pairs,
                          const float *x, int64_t x_stride, int ntok, const float *scale_lut,
                          float *out)
{
    switch (ntok) {
    case 1:
        dot_tile_one(codes, scales, pairs, x, scale_lut, out);
        break;
    case 2:
        dot_tile_n(codes, scales, pairs, x, x_stride, 2, scale_lut, out);
        break;
    case 3:
        dot_tile_n(codes, scales, pairs, x, x_stride, 3, scale_lut, out);
        break;
    default:
        dot_tile_many(codes, scales, pairs, x, x_stride, ntok, scale_lut, out);
        break;
    }
}

const cpu_kernels cpu_kernels_avx2 = {"avx2", AVX2_MAX_TOKENS, dot_tile_avx2};

#else
typedef int cpu_kernels_avx2_unused;
#endif
