/* The W4A4 dispatch codec. Sending the NVFP4 codes instead of 16-bit activations cuts the
 * dispatch traffic ~3x, but the expert's plan quantises its input itself, so the receiver must
 * hand it a row whose quantisation gives back exactly the sender's codes and block scales.
 *
 * Why that row always exists and how it is found (docs/EP.md has the long form): the block
 * scale depends only on the block's maximum magnitude amax, which is sent (in the hidden dtype,
 * where it is exact). Given amax, the multiplier O = 1/(s * (1/g)) is the sender's, and each
 * value only has to land in its code's interval: the receiver picks +-amax for the codes of
 * amax's magnitude, NaN for the larger ones (only NaN inputs produce those), +-0 for zeros, and
 * otherwise the dtype value nearest code/O, falling back to a bisection over the dtype's values
 * in [0, amax] (the code of v*O is monotone in v, and the sender's own value lies there). The
 * block is then re-quantised and compared, so a mismatch can never pass silently. */
#include <math.h>
#include <string.h>

#include "../format/format.h"
#include "ep_internal.h"

#define BLOCK 16

size_t ep_w4a4_payload_bytes(int64_t hidden, fp4moe_dtype dtype)
{
    return (size_t)(hidden / 2 + hidden / BLOCK) + (size_t)(hidden / BLOCK) * dtype_size(dtype);
}

void ep_w4a4_cpu_arith(float g, ep_w4a4_arith *q)
{
    q->g = g;
    q->rcp6 = 1.0f / 6.0f;
    for (int c = 0; c < 256; c++) {
        const float s = e4m3_to_float((uint8_t)c);
        q->out_scale[c] = s != 0.0f ? 1.0f / (s * (1.0f / g)) : 0.0f;
    }
}

/* The value multiplier of a block: nvfp4_quantize_block16's, with q's reciprocals. */
static float block_out_scale(float amax, uint8_t scale_code, const ep_w4a4_arith *q)
{
    return amax != 0.0f ? q->out_scale[scale_code] : 0.0f;
}

/* nvfp4_quantize_block16 with q's arithmetic (with ep_w4a4_cpu_arith: the same bits); returns
 * the block maximum it used. */
static float quantize_block(const float *x, const ep_w4a4_arith *q, uint8_t *packed8, uint8_t *scale)
{
    const float amax = nvfp4_block_amax(x);
    const uint8_t scale_code = float_to_e4m3(q->g * (amax * q->rcp6));
    nvfp4_encode_block16(x, block_out_scale(amax, scale_code, q), packed8);
    *scale = scale_code;
    return amax;
}

void ep_w4a4_encode_row(const float *x, int64_t hidden, fp4moe_dtype dtype, const ep_w4a4_arith *q,
                        uint8_t *payload)
{
    const int64_t blocks = hidden / BLOCK;
    uint8_t *codes = payload, *scales = payload + hidden / 2, *maxima = scales + blocks;
    const size_t elt = dtype_size(dtype);
    for (int64_t b = 0; b < blocks; b++) {
        const float amax = quantize_block(x + b * BLOCK, q, codes + b * (BLOCK / 2), scales + b);
        store_f32(&amax, 1, dtype, maxima + (size_t)b * elt);
    }
}

static float dtype_value_of_bits(fp4moe_dtype dtype, uint32_t bits)
{
    if (dtype == FP4MOE_DTYPE_F32) {
        float v;
        memcpy(&v, &bits, sizeof v);
        return v;
    }
    return dtype == FP4MOE_DTYPE_BF16 ? bf16_to_float((uint16_t)bits) : f16_to_float((uint16_t)bits);
}

static uint32_t dtype_bits_of_value(fp4moe_dtype dtype, float v)
{
    if (dtype == FP4MOE_DTYPE_F32) {
        uint32_t bits;
        memcpy(&bits, &v, sizeof bits);
        return bits;
    }
    return dtype == FP4MOE_DTYPE_BF16 ? float_to_bf16(v) : float_to_f16(v);
}

static int code_magnitude(float v, float out_scale)
{
    return float_to_e2m1(v * out_scale) & 0x7;
}

/* The smallest non-negative dtype value v <= amax with code_magnitude(v) == magnitude, or -1.
 * Positive floats of every dtype order like their bit patterns. */
static int bisect(fp4moe_dtype dtype, float amax, float out_scale, int magnitude, float *out)
{
    uint32_t lo = 0, hi = dtype_bits_of_value(dtype, amax);
    if (code_magnitude(dtype_value_of_bits(dtype, hi), out_scale) < magnitude) return -1;
    while (lo < hi) { /* invariant: the answer's bits are in [lo, hi] */
        const uint32_t mid = lo + (hi - lo) / 2;
        if (code_magnitude(dtype_value_of_bits(dtype, mid), out_scale) >= magnitude)
            hi = mid;
        else
            lo = mid + 1;
    }
    const float v = dtype_value_of_bits(dtype, lo);
    if (code_magnitude(v, out_scale) != magnitude) return -1;
    *out = v;
    return 0;
}

/* One value whose code with out_scale is `code` and whose magnitude is at most amax. */
static int reconstruct(fp4moe_dtype dtype, float amax, float out_scale, int amax_magnitude,
                       uint8_t code, float *out)
{
    const int magnitude = code & 0x7;
    const float sign = (code & 0x8) ? -1.0f : 1.0f;
    float v;
    if (magnitude == amax_magnitude)
        v = sign * amax;
    else if (magnitude > amax_magnitude)
        v = NAN; /* only a NaN input is coded above its block maximum (as +6) */
    else if (magnitude == 0)
        v = sign * 0.0f;
    else {
        /* The interval of a code spans >= 17% around its value: the nearest dtype value of
         * code/O lands inside unless the dtype is subnormal there. */
        float guess = e2m1_to_float((uint8_t)magnitude) / out_scale;
        round_to_dtype(&guess, 1, dtype);
        if (!(guess <= amax && code_magnitude(guess, out_scale) == magnitude) &&
            bisect(dtype, amax, out_scale, magnitude, &guess) != 0)
            return -1;
        v = sign * guess;
    }
    if (float_to_e2m1(v * out_scale) != code) return -1;
    *out = v;
    return 0;
}

int ep_w4a4_decode_row(const uint8_t *payload, int64_t hidden, fp4moe_dtype dtype,
                       const ep_w4a4_arith *q, void *row)
{
    const int64_t blocks = hidden / BLOCK;
    const uint8_t *codes = payload, *scales = payload + hidden / 2, *maxima = scales + blocks;
    const size_t elt = dtype_size(dtype);
    for (int64_t b = 0; b < blocks; b++) {
        float amax, block[BLOCK];
        load_f32(maxima + (size_t)b * elt, dtype, 1, &amax);
        /* The multiplier exactly as the expert's quantiser forms it. */
        const float out_scale = block_out_scale(amax, scales[b], q);
        const int amax_magnitude = code_magnitude(amax, out_scale);
        const uint8_t *block_codes = codes + b * (BLOCK / 2);
        for (int i = 0; i < BLOCK; i++) {
            const uint8_t code = (uint8_t)((block_codes[i / 2] >> (4 * (i % 2))) & 0xf);
            if (reconstruct(dtype, amax, out_scale, amax_magnitude, code, &block[i]) != 0)
                return -1;
        }
        /* The expert quantises exactly this: check that it gets the sender's block back. */
        uint8_t again[BLOCK / 2], again_scale;
        quantize_block(block, q, again, &again_scale);
        if (again_scale != scales[b] || memcmp(again, block_codes, sizeof again) != 0) return -1;
        store_f32(block, BLOCK, dtype, (uint8_t *)row + (size_t)(b * BLOCK) * elt);
    }
    return 0;
}
