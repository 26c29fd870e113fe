/* Scalar codecs (E4M3 "fn", BF16, F16) and the dtype helpers; E2M1 lives with the block
 * quantiser in nvfp4.c, where its encoder must inline.
 *
 * Every float -> narrow conversion rounds on the integer bits of the FP32 input, never through
 * the FPU, so the result is one correct round-to-nearest-even whatever the rounding mode, the
 * compiler flags or the FPU's flush-to-zero setting. See docs/FORMATS.md for the formats. */
#include <string.h>

#include "format.h"

static inline uint32_t float_bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static inline float bits_float(uint32_t u)
{
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* Rounds the FP32 magnitude bits `a` to `drop` fewer mantissa bits, to nearest even, keeping the
 * FP32 encoding: a carry out of the mantissa correctly bumps the exponent. */
static inline uint32_t round_mantissa_bits(uint32_t a, int drop)
{
    uint32_t lsb = (a >> drop) & 1u;
    uint32_t half_minus_one = (1u << (drop - 1)) - 1u;
    return (a + half_minus_one + lsb) & ~((1u << drop) - 1u);
}

/* The number of target subnormal quanta in FP32 magnitude `a`, rounded to nearest even, where
 * one quantum is 2^quantum_exp. Used below a format's smallest normal, where the quantum is
 * fixed. A result equal to 2^mantissa_bits is the smallest normal, and its code is that
 * integer too, so the caller uses the result as the code directly. */
static inline uint32_t round_to_quanta(uint32_t a, int quantum_exp)
{
    int biased = (int)(a >> 23);
    uint32_t significand = (a & 0x7fffffu) | (biased != 0 ? 0x800000u : 0u);
    int exponent = biased != 0 ? biased - 127 : -126; /* a = significand * 2^(exponent-23) */
    int shift = quantum_exp - (exponent - 23);
    if (shift <= 0) return significand << -shift; /* not reached by the callers */
    if (shift >= 26) return 0;                    /* below half a quantum: significand < 2^24 */
    uint32_t quotient = significand >> shift;
    uint32_t remainder = significand & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1);
    if (remainder > half || (remainder == half && (quotient & 1u))) quotient++;
    return quotient;
}

/* ------------------------------------------------------------------------------ E4M3 fn */
/* Sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities; S.1111.111 is NaN, so the
 * largest finite value is 1.75 * 2^8 = 448; subnormals are m * 2^-9. */
float e4m3_to_float(uint8_t code)
{
    uint32_t sign = (uint32_t)(code & 0x80u) << 24;
    uint32_t exponent = (code >> 3) & 0xfu;
    uint32_t mantissa = code & 0x7u;
    if (exponent == 0xf && mantissa == 0x7) return bits_float(sign | 0x7fc00000u);
    if (exponent == 0) return bits_float(sign | float_bits((float)mantissa * 0x1p-9f));
    return bits_float(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

uint8_t float_to_e4m3(float x)
{
    uint32_t bits = float_bits(x);
    uint8_t sign = (uint8_t)((bits >> 24) & 0x80u);
    uint32_t a = bits & 0x7fffffffu;
    if (a > 0x7f800000u) return 0x7f;        /* NaN */
    if (a > 0x43e00000u) return sign | 0x7e; /* beyond 448 (inf too): satfinite */
    if (a >= 0x3c800000u) {                  /* [2^-6, 448]: normal */
        uint32_t r = round_mantissa_bits(a, 20);
        uint32_t exponent = (r >> 23) - 120u; /* biased for E4M3: 1..15 */
        return (uint8_t)(sign | (exponent << 3) | ((r >> 20) & 0x7u));
    }
    return (uint8_t)(sign | round_to_quanta(a, -9));
}

/* ------------------------------------------------------------------------------ BF16 */
float bf16_to_float(uint16_t bits)
{
    return bits_float((uint32_t)bits << 16);
}

uint16_t float_to_bf16(float x)
{
    uint32_t bits = float_bits(x);
    /* Truncating a NaN could leave an all-zero mantissa (inf): force the quiet bit. */
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* ------------------------------------------------------------------------------ F16 */
/* Written with selects rather than branches so that load_f32's loop vectorises. */
float f16_to_float(uint16_t bits)
{
    uint32_t sign = (uint32_t)(bits & 0x8000u) << 16;
    uint32_t magnitude = bits & 0x7fffu;
    uint32_t normal = (magnitude << 13) + (112u << 23); /* rebias 15 -> 127 */
    uint32_t inf_nan = (magnitude << 13) | 0x7f800000u;
    uint32_t subnormal = float_bits((float)(int32_t)magnitude * 0x1p-24f); /* exact */
    uint32_t is_inf_nan = 0u - (uint32_t)(magnitude >= 0x7c00u);
    uint32_t is_subnormal = 0u - (uint32_t)(magnitude < 0x400u);
    uint32_t r = (inf_nan & is_inf_nan) | (subnormal & is_subnormal) |
                 (normal & ~(is_inf_nan | is_subnormal));
    return bits_float(sign | r);
}

uint16_t float_to_f16(float x)
{
    uint32_t bits = float_bits(x);
    uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
    uint32_t a = bits & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) return sign | 0x7c00u; /* >= 65520, the tie above 65504: inf */
    if (a >= 0x38800000u) {                      /* [2^-14, 65520): normal */
        uint32_t r = round_mantissa_bits(a, 13);
        return (uint16_t)(sign | ((r - (112u << 23)) >> 13));
    }
    return (uint16_t)(sign | round_to_quanta(a, -24));
}

/* ------------------------------------------------------------------------------ dtypes */
size_t dtype_size(fp4moe_dtype dtype)
{
    switch (dtype) {
    case FP4MOE_DTYPE_F32:
        return 4;
    case FP4MOE_DTYPE_F16:
        return 2;
    case FP4MOE_DTYPE_BF16:
        return 2;
    case FP4MOE_DTYPE_I32:
        return 4;
    case FP4MOE_DTYPE_U8:
        return 1;
    case FP4MOE_DTYPE_E4M3:
        return 1;
    }
    return 0;
}

const char *dtype_name(fp4moe_dtype dtype)
{
    switch (dtype) {
    case FP4MOE_DTYPE_F32:
        return "f32";
    case FP4MOE_DTYPE_F16:
        return "f16";
    case FP4MOE_DTYPE_BF16:
        return "bf16";
    case FP4MOE_DTYPE_I32:
        return "i32";
    case FP4MOE_DTYPE_U8:
        return "u8";
    case FP4MOE_DTYPE_E4M3:
        return "e4m3";
    }
    return "invalid";
}

/* Callers validate the dtype; other dtypes leave dst untouched. */
void load_f32(const void *src, fp4moe_dtype dtype, int64_t count, float *dst)
{
    if (dtype == FP4MOE_DTYPE_F32) {
        memmove(dst, src, (size_t)count * sizeof(float));
    } else if (dtype == FP4MOE_DTYPE_F16) {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < count; i++)
            dst[i] = f16_to_float(s[i]);
    } else if (dtype == FP4MOE_DTYPE_BF16) {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < count; i++)
            dst[i] = bits_float((uint32_t)s[i] << 16);
    }
}

void store_f32(const float *src, int64_t count, fp4moe_dtype dtype, void *dst)
{
    if (dtype == FP4MOE_DTYPE_F32) {
        memmove(dst, src, (size_t)count * sizeof(float));
    } else if (dtype == FP4MOE_DTYPE_F16) {
        uint16_t *d = (uint16_t *)dst;
        for (int64_t i = 0; i < count; i++)
            d[i] = float_to_f16(src[i]);
    } else if (dtype == FP4MOE_DTYPE_BF16) {
        uint16_t *d = (uint16_t *)dst;
        for (int64_t i = 0; i < count; i++)
            d[i] = float_to_bf16(src[i]);
    }
}

void round_to_dtype(float *x, int64_t count, fp4moe_dtype dtype)
{
    if (dtype == FP4MOE_DTYPE_F16) {
        for (int64_t i = 0; i < count; i++)
            x[i] = f16_to_float(float_to_f16(x[i]));
    } else if (dtype == FP4MOE_DTYPE_BF16) {
        for (int64_t i = 0; i < count; i++)
            x[i] = bf16_to_float(float_to_bf16(x[i]));
    }
}
