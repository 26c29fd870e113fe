/* NVFP4 block quantisation: the Blackwell kernels' algorithm (spec section 2) in FP32.
 *
 * The GPU computes amax * rcp(6), rcp(g) and the final reciprocal with rcp.approx.ftz.f32
 * (at most 1 ulp off); here they are IEEE-correct FP32 operations. Only a product that lands
 * within an ulp of an E4M3 or E2M1 rounding tie can come out one code apart: see
 * docs/FORMATS.md. */
#include <math.h>

#include "format.h"

#define NVFP4_BLOCK 16

/* ------------------------------------------------------------------------------ E2M1 */
/* Sign, 2 exponent bits (bias 1), 1 mantissa bit; code 1 is the subnormal 0.5. */
static const float e2m1_values[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                      -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

/* With only eight magnitudes, counting the decision points passed is exact RNE: each
 * threshold is the midpoint of two neighbours, strict (>) where the lower one has the even
 * code and inclusive (>=) where the upper one does; inf passes them all (saturation). */
static inline uint8_t encode_e2m1(float x)
{
    float a = fabsf(x);
    if (isnan(x)) return 0x7; /* NaN -> +6 (code 7), as the header documents */
    uint8_t magnitude = (uint8_t)((a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) +
                                  (a > 2.5f) + (a >= 3.5f) + (a > 5.0f));
    return (uint8_t)((signbit(x) ? 0x8 : 0x0) | magnitude);
}

float e2m1_to_float(uint8_t code)
{
    return e2m1_values[code & 0xf];
}
uint8_t float_to_e2m1(float x)
{
    return encode_e2m1(x);
}

/* ------------------------------------------------------------------------------ NVFP4 */

/* (static inline, as encode_e2m1 beside its exported twin: this is the quantiser's hot path) */
static inline float block_amax(const float *x)
{
    float amax = 0.0f;
    for (int i = 0; i < NVFP4_BLOCK; i++) {
        float a = fabsf(x[i]);
        amax = a > amax ? a : amax; /* NaN skipped, as fmaxf would, without a libm call */
    }
    return amax;
}

static inline void encode_block16(const float *x, float out_scale, uint8_t *packed8)
{
    for (int i = 0; i < NVFP4_BLOCK; i += 2) {
        uint8_t lo = encode_e2m1(x[i] * out_scale);
        uint8_t hi = encode_e2m1(x[i + 1] * out_scale);
        packed8[i / 2] = (uint8_t)(lo | (hi << 4));
    }
}

float nvfp4_block_amax(const float *x16)
{
    return block_amax(x16);
}
void nvfp4_encode_block16(const float *x16, float out_scale, uint8_t *packed8)
{
    encode_block16(x16, out_scale, packed8);
}

void nvfp4_quantize_block16(const float *x, float g, uint8_t *packed8, uint8_t *scale)
{
    const float amax = block_amax(x);
    float scale_float = g * (amax * (1.0f / 6.0f));
    uint8_t scale_code = float_to_e4m3(scale_float);
    float scale_value = e4m3_to_float(scale_code);
    /* A scale that underflows to E4M3 zero would make the reciprocal infinite and saturate
     * every value to +-6; a zero multiplier gives (signed) zero codes instead, as the kernels
     * that test s != 0 do. */
    float out_scale =
        (amax != 0.0f && scale_value != 0.0f) ? 1.0f / (scale_value * (1.0f / g)) : 0.0f;
    encode_block16(x, out_scale, packed8);
    *scale = scale_code;
}

void nvfp4_dequantize_block16(const uint8_t *packed8, uint8_t scale, float global_dequant,
                              float *out16)
{
    float scale_value = e4m3_to_float(scale);
    for (int i = 0; i < NVFP4_BLOCK / 2; i++) {
        out16[2 * i] = e2m1_values[packed8[i] & 0xf] * scale_value * global_dequant;
        out16[2 * i + 1] = e2m1_values[packed8[i] >> 4] * scale_value * global_dequant;
    }
}

void nvfp4_quantize_row(const float *x, int64_t cols, float g, uint8_t *packed, uint8_t *scales)
{
    for (int64_t b = 0; b < cols / NVFP4_BLOCK; b++)
        nvfp4_quantize_block16(x + b * NVFP4_BLOCK, g, packed + b * (NVFP4_BLOCK / 2), scales + b);
}

void nvfp4_fake_quantize_row(const float *x, int64_t cols, float g, float *x_hat)
{
    for (int64_t b = 0; b < cols / NVFP4_BLOCK; b++) {
        uint8_t packed8[NVFP4_BLOCK / 2], scale;
        nvfp4_quantize_block16(x + b * NVFP4_BLOCK, g, packed8, &scale);
        nvfp4_dequantize_block16(packed8, scale, 1.0f, x_hat + b * NVFP4_BLOCK);
    }
}

void nvfp4_dequantize_row(const uint8_t *packed, const uint8_t *scales, int64_t cols,
                          float global_dequant, float *out)
{
    for (int64_t b = 0; b < cols / NVFP4_BLOCK; b++)
        nvfp4_dequantize_block16(packed + b * (NVFP4_BLOCK / 2), scales[b], global_dequant,
                                 out + b * NVFP4_BLOCK);
}
