/* The NVFP4 / FP8 / 16-bit codecs, block quantisation, scale layouts and the public format
 * functions. Small domains are exhausted (16 E2M1 codes, 256 E4M3 codes, 65536 BF16 and F16
 * codes and every rounding tie between them); golden values come from the bit layouts worked
 * by hand (docs/FORMATS.md), not from the code under test. */
#include <float.h>
#include <math.h>
#include <string.h>

#include "core/context.h"
#include "format/format.h"
#include "fp4moe.h"
#include "testing.h"

static uint32_t bits_of(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static float float_of(uint32_t u)
{
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

static int same_bits(float a, float b)
{
    return bits_of(a) == bits_of(b);
}

/* ------------------------------------------------------------------------------ E2M1 */
static void test_e2m1(testing_state *st)
{
    static const float expected[16] = {0,     0.5f,  1,  1.5f,  2,  3,  4,  6,
                                       -0.0f, -0.5f, -1, -1.5f, -2, -3, -4, -6};
    for (int c = 0; c < 16; c++) {
        CHECK(st, same_bits(fp4moe_e2m1_to_float((uint8_t)c), expected[c]), "code %d", c);
        CHECK(st, fp4moe_e2m1_to_float((uint8_t)(c | 0xf0)) == expected[c], "high nibble %d", c);
        CHECK(st, fp4moe_float_to_e2m1(expected[c]) == c, "re-encode %d", c);
    }
    /* Every midpoint between adjacent magnitudes goes to the even code (mantissa bit 0);
     * one float ulp either side goes to the nearer value. */
    for (int c = 0; c < 7; c++) {
        float mid = (expected[c] + expected[c + 1]) / 2; /* exact: <= 3 significant bits */
        int even = c % 2 == 0 ? c : c + 1;
        for (int s = 0; s < 2; s++) {
            float sign = s ? -1.0f : 1.0f;
            uint8_t sign_bit = s ? 0x8 : 0;
            CHECK(st, fp4moe_float_to_e2m1(sign * mid) == (sign_bit | even), "tie %g",
                  (double)(sign * mid));
            CHECK(st, fp4moe_float_to_e2m1(sign * nextafterf(mid, 0)) == (sign_bit | c),
                  "below tie %g", (double)mid);
            CHECK(st, fp4moe_float_to_e2m1(sign * nextafterf(mid, 10)) == (sign_bit | (c + 1)),
                  "above tie %g", (double)mid);
        }
    }
    /* The brief's table of ties, spelled out. */
    static const struct {
        float x;
        uint8_t code;
    } ties[] = {{0.25f, 0}, {0.75f, 2}, {1.25f, 2},  {1.75f, 4},  {2.5f, 4},
                {3.5f, 6},  {5.0f, 6},  {-0.25f, 8}, {-5.0f, 0xe}};
    for (size_t i = 0; i < sizeof ties / sizeof ties[0]; i++)
        CHECK(st, fp4moe_float_to_e2m1(ties[i].x) == ties[i].code, "%g", (double)ties[i].x);
    /* Saturation, NaN, tiny values. */
    CHECK(st, fp4moe_float_to_e2m1(nextafterf(6, 7)) == 7, "6+ulp");
    CHECK(st, fp4moe_float_to_e2m1(7.0f) == 7, "7");
    CHECK(st, fp4moe_float_to_e2m1(1e30f) == 7, "1e30");
    CHECK(st, fp4moe_float_to_e2m1(INFINITY) == 7, "inf");
    CHECK(st, fp4moe_float_to_e2m1(-INFINITY) == 0xf, "-inf");
    CHECK(st, fp4moe_float_to_e2m1(NAN) == 7, "NaN -> code 0x7 (+6), as fp4moe.h documents");
    CHECK(st, fp4moe_float_to_e2m1(1e-40f) == 0, "float subnormal");
    CHECK(st, fp4moe_float_to_e2m1(-1e-40f) == 8, "-float subnormal");
}

/* ------------------------------------------------------------------------------ E4M3 */
/* Worked by hand from S.EEEE.MMM, bias 7: normal (1 + M/8) * 2^(E-7), subnormal M/8 * 2^-6. */
static const struct {
    uint8_t code;
    float value;
} e4m3_golden[] = {
    {0x00, 0.0f},    {0x01, 0x1p-9f},                   /* 1/8 * 2^-6 */
    {0x02, 0x1p-8f}, {0x03, 0x3p-9f},  {0x07, 0x7p-9f}, /* largest subnormal */
    {0x08, 0x1p-6f},                                    /* smallest normal */
    {0x09, 0x9p-9f},                                    /* 1.125 * 2^-6 */
    {0x30, 0.5f},    {0x34, 0.75f},    {0x38, 1.0f},    {0x39, 1.125f},  {0x3f, 1.875f},
    {0x40, 2.0f},    {0x44, 3.0f},     {0x48, 4.0f},    {0x4c, 6.0f},    {0x50, 8.0f},
    {0x58, 16.0f},   {0x60, 32.0f},    {0x68, 64.0f},   {0x6b, 88.0f},  /* 1.375 * 64 */
    {0x70, 128.0f},  {0x77, 240.0f},                                    /* 1.875 * 128 */
    {0x78, 256.0f},  {0x7c, 384.0f},   {0x7d, 416.0f},  {0x7e, 448.0f}, /* max */
    {0x80, -0.0f},   {0x81, -0x1p-9f}, {0xb8, -1.0f},   {0xfe, -448.0f},
};

static void test_e4m3(testing_state *st)
{
    for (size_t i = 0; i < sizeof e4m3_golden / sizeof e4m3_golden[0]; i++)
        CHECK(st, same_bits(fp4moe_e4m3_to_float(e4m3_golden[i].code), e4m3_golden[i].value),
              "golden 0x%02x: got %a want %a", e4m3_golden[i].code,
              (double)fp4moe_e4m3_to_float(e4m3_golden[i].code), (double)e4m3_golden[i].value);
    CHECK(st, isnan(fp4moe_e4m3_to_float(0x7f)), "0x7f NaN");
    CHECK(st, isnan(fp4moe_e4m3_to_float(0xff)), "0xff NaN");

    /* All 256 codes against the layout formula in double, and the round trip. */
    for (int c = 0; c < 256; c++) {
        if ((c & 0x7f) == 0x7f) continue;
        int e = (c >> 3) & 0xf, m = c & 7;
        double magnitude = e == 0 ? ldexp(m / 8.0, -6) : ldexp(1.0 + m / 8.0, e - 7);
        double want = (c & 0x80) ? -magnitude : magnitude;
        float got = fp4moe_e4m3_to_float((uint8_t)c);
        CHECK(st, (double)got == want && (signbit(got) != 0) == ((c & 0x80) != 0), "code 0x%02x",
              c);
        CHECK(st, fp4moe_float_to_e4m3(got) == c, "round trip 0x%02x", c);
    }

    /* Every tie between adjacent codes 0x00..0x7e (subnormal ones included) goes to the even
     * code; one ulp either side to the nearer one. Midpoints are exact in FP32. */
    for (int c = 0; c < 0x7e; c++) {
        float lo = fp4moe_e4m3_to_float((uint8_t)c), hi = fp4moe_e4m3_to_float((uint8_t)(c + 1));
        float mid = (lo + hi) / 2;
        int even = c % 2 == 0 ? c : c + 1;
        CHECK(st, fp4moe_float_to_e4m3(mid) == even, "tie %a", (double)mid);
        CHECK(st, fp4moe_float_to_e4m3(-mid) == (0x80 | even), "tie -%a", (double)mid);
        CHECK(st, fp4moe_float_to_e4m3(nextafterf(mid, 0)) == c, "below %a", (double)mid);
        CHECK(st, fp4moe_float_to_e4m3(nextafterf(mid, 1000)) == c + 1, "above %a", (double)mid);
    }
    /* Below the smallest subnormal 2^-9: the tie 2^-10 goes to 0. */
    CHECK(st, fp4moe_float_to_e4m3(0x1p-10f) == 0x00, "2^-10");
    CHECK(st, fp4moe_float_to_e4m3(nextafterf(0x1p-10f, 1)) == 0x01, "2^-10+");
    CHECK(st, fp4moe_float_to_e4m3(1e-30f) == 0x00, "tiny");
    CHECK(st, fp4moe_float_to_e4m3(-1e-40f) == 0x80, "-float subnormal");
    /* Saturation: 464 is the midpoint of 448 and 480 (which E4M3fn lacks); everything above
     * 448 is satfinite 448. */
    CHECK(st, fp4moe_float_to_e4m3(464.0f) == 0x7e, "464");
    CHECK(st, fp4moe_float_to_e4m3(nextafterf(464.0f, 0)) == 0x7e, "464-");
    CHECK(st, fp4moe_float_to_e4m3(nextafterf(464.0f, 1000)) == 0x7e, "464+");
    CHECK(st, fp4moe_float_to_e4m3(480.0f) == 0x7e, "480");
    CHECK(st, fp4moe_float_to_e4m3(1e20f) == 0x7e, "1e20");
    CHECK(st, fp4moe_float_to_e4m3(INFINITY) == 0x7e, "inf");
    CHECK(st, fp4moe_float_to_e4m3(-INFINITY) == 0xfe, "-inf");
    CHECK(st, fp4moe_float_to_e4m3(-500.0f) == 0xfe, "-500");
    CHECK(st, fp4moe_float_to_e4m3(NAN) == 0x7f, "NaN");
    CHECK(st, fp4moe_float_to_e4m3(-NAN) == 0x7f, "-NaN");
    CHECK(st, fp4moe_float_to_e4m3(432.0f) == 0x7e, "432 tie 416/448 -> even 448");
    CHECK(st, fp4moe_float_to_e4m3(89.6f) == 0x6b, "89.6 -> 88");
}

/* ------------------------------------------------------------------------------ BF16, F16 */
static double f16_formula(int c)
{
    int e = (c >> 10) & 0x1f, m = c & 0x3ff;
    double magnitude = e == 0 ? ldexp(m, -24) : ldexp(1.0 + m / 1024.0, e - 15);
    return (c & 0x8000) ? -magnitude : magnitude;
}

static void test_bf16(testing_state *st)
{
    for (uint32_t c = 0; c < 65536; c++) {
        float v = fp4moe_bf16_to_float((uint16_t)c);
        CHECK(st, bits_of(v) == c << 16, "decode 0x%04x", c);
        uint16_t back = fp4moe_float_to_bf16(v);
        if (isnan(v))
            CHECK(st, isnan(fp4moe_bf16_to_float(back)), "NaN 0x%04x", c);
        else
            CHECK(st, back == c, "round trip 0x%04x", c);
    }
    /* Ties and their neighbours for every positive finite pair, normal and subnormal
     * (bf16 subnormals are FP32 subnormals); 0x7f7f..0x7f80 is the overflow tie (odd 0x7f7f
     * rounds up to inf). */
    for (uint32_t c = 0; c < 0x7f80; c++) {
        uint32_t mid = (c << 16) | 0x8000u;
        uint32_t even = (c & 1) ? c + 1 : c;
        CHECK(st, fp4moe_float_to_bf16(float_of(mid)) == even, "tie 0x%08x", mid);
        CHECK(st, fp4moe_float_to_bf16(float_of(mid | 0x80000000u)) == (even | 0x8000u),
              "-tie 0x%08x", mid);
        CHECK(st, fp4moe_float_to_bf16(float_of(mid - 1)) == c, "below 0x%08x", mid);
        CHECK(st, fp4moe_float_to_bf16(float_of(mid + 1)) == c + 1, "above 0x%08x", mid);
    }
    CHECK(st, fp4moe_float_to_bf16(INFINITY) == 0x7f80, "inf");
    CHECK(st, fp4moe_float_to_bf16(-INFINITY) == 0xff80, "-inf");
    CHECK(st, isnan(fp4moe_bf16_to_float(fp4moe_float_to_bf16(float_of(0x7f800001u)))),
          "NaN with only low payload bits stays NaN");
    CHECK(st, fp4moe_float_to_bf16(1.0f) == 0x3f80, "1");
}

static void test_f16(testing_state *st)
{
    for (uint32_t c = 0; c < 65536; c++) {
        float v = fp4moe_f16_to_float((uint16_t)c);
        int e = (c >> 10) & 0x1f;
        if (e == 31) {
            CHECK(st,
                  (c & 0x3ff) ? isnan(v) : (isinf(v) && (signbit(v) != 0) == ((c & 0x8000) != 0)),
                  "inf/NaN 0x%04x", c);
            if (c & 0x3ff)
                CHECK(st, isnan(fp4moe_f16_to_float(fp4moe_float_to_f16(v))), "NaN 0x%04x", c);
            else
                CHECK(st, fp4moe_float_to_f16(v) == c, "inf 0x%04x", c);
            continue;
        }
        CHECK(st, (double)v == f16_formula((int)c) && (signbit(v) != 0) == ((c & 0x8000) != 0),
              "decode 0x%04x", c);
        CHECK(st, fp4moe_float_to_f16(v) == c, "round trip 0x%04x", c);
    }
    /* Every tie between adjacent positive finite codes, subnormals included. */
    for (uint32_t c = 0; c < 0x7bff; c++) {
        float mid = (float)((f16_formula((int)c) + f16_formula((int)c + 1)) / 2); /* exact */
        uint32_t even = (c & 1) ? c + 1 : c;
        CHECK(st, fp4moe_float_to_f16(mid) == even, "tie %a", (double)mid);
        CHECK(st, fp4moe_float_to_f16(-mid) == (even | 0x8000u), "-tie %a", (double)mid);
        CHECK(st, fp4moe_float_to_f16(nextafterf(mid, 0)) == c, "below %a", (double)mid);
        CHECK(st, fp4moe_float_to_f16(nextafterf(mid, INFINITY)) == c + 1, "above %a", (double)mid);
    }
    CHECK(st, fp4moe_f16_to_float(0x0001) == 0x1p-24f, "smallest subnormal");
    CHECK(st, fp4moe_f16_to_float(0x03ff) == 0x3ffp-24f, "largest subnormal");
    CHECK(st, fp4moe_f16_to_float(0x0400) == 0x1p-14f, "smallest normal");
    CHECK(st, fp4moe_f16_to_float(0x7bff) == 65504.0f, "max");
    CHECK(st, fp4moe_float_to_f16(0x1p-25f) == 0x0000, "2^-25 tie -> 0");
    CHECK(st, fp4moe_float_to_f16(nextafterf(0x1p-25f, 1)) == 0x0001, "2^-25+");
    CHECK(st, fp4moe_float_to_f16(1e-40f) == 0x0000, "float subnormal");
    CHECK(st, fp4moe_float_to_f16(65519.0f) == 0x7bff, "65519");
    CHECK(st, fp4moe_float_to_f16(65520.0f) == 0x7c00, "65520 tie -> inf");
    CHECK(st, fp4moe_float_to_f16(1e10f) == 0x7c00, "overflow");
    CHECK(st, fp4moe_float_to_f16(-INFINITY) == 0xfc00, "-inf");
    CHECK(st, (fp4moe_float_to_f16(NAN) & 0x7fff) > 0x7c00, "NaN");
}

static void test_array_conversions(testing_state *st, testing_rng *rng)
{
    enum { N = 1037 };
    float src[N], back[N], rounded[N];
    uint16_t half[N];
    for (int i = 0; i < N; i++)
        src[i] = (float)(testing_normal(rng) * 100.0);
    src[0] = 1e-6f; /* an F16 subnormal */
    src[1] = 1e6f;  /* F16 overflow */
    const fp4moe_dtype dtypes[2] = {FP4MOE_DTYPE_F16, FP4MOE_DTYPE_BF16};
    for (int d = 0; d < 2; d++) {
        store_f32(src, N, dtypes[d], half);
        load_f32(half, dtypes[d], N, back);
        memcpy(rounded, src, sizeof src);
        round_to_dtype(rounded, N, dtypes[d]);
        int bad = 0;
        for (int i = 0; i < N; i++) {
            uint16_t want = d == 0 ? float_to_f16(src[i]) : float_to_bf16(src[i]);
            float want_value = d == 0 ? f16_to_float(want) : bf16_to_float(want);
            bad += half[i] != want || !same_bits(back[i], want_value) ||
                   !same_bits(rounded[i], want_value);
        }
        CHECK(st, bad == 0, "%s array conversions: %d mismatches", dtype_name(dtypes[d]), bad);
    }
    store_f32(src, N, FP4MOE_DTYPE_F32, back);
    CHECK(st, memcmp(src, back, sizeof src) == 0, "f32 store");
    CHECK(st,
          dtype_size(FP4MOE_DTYPE_F32) == 4 && dtype_size(FP4MOE_DTYPE_BF16) == 2 &&
              dtype_size(FP4MOE_DTYPE_E4M3) == 1 && dtype_size((fp4moe_dtype)99) == 0,
          "dtype_size");
    CHECK(st, strcmp(dtype_name(FP4MOE_DTYPE_BF16), "bf16") == 0, "dtype_name");
}

/* ------------------------------------------------------------------------------ NVFP4 */
static void check_block(testing_state *st, const char *name, const float *x, float g,
                        uint8_t want_scale, const uint8_t *want_codes)
{
    uint8_t packed[8], scale;
    nvfp4_quantize_block16(x, g, packed, &scale);
    CHECK(st, scale == want_scale, "%s: scale 0x%02x, want 0x%02x", name, scale, want_scale);
    for (int i = 0; i < 16; i++) {
        uint8_t code = (packed[i / 2] >> (4 * (i % 2))) & 0xf;
        CHECK(st, code == want_codes[i], "%s: element %d (%g): code 0x%x, want 0x%x", name, i,
              (double)x[i], code, want_codes[i]);
    }
}

static void test_nvfp4_golden(testing_state *st)
{
    /* Block A, g = 1. amax = 6; sf = 1 * (6 * fl(1/6)) = 6 * 0x1.555556p-3 = 1.0000000298...
     * which rounds to exactly 1.0f; s = e4m3(1.0) = 0x38; out_scale = 1 / (1.0 * (1/1)) = 1, so
     * the codes are e2m1(x): ties 5 -> 4, 2.5 -> 2, 3.5 -> 4, 1.25 -> 1, 1.75 -> 2, 0.25 -> 0,
     * 0.75 -> 1 (even codes). */
    const float block_a[16] = {6,    -3,    1.5f,   0.75f, 0.25f, 5,     -5, 2.5f,
                               3.5f, 1.25f, -1.75f, 0,     0.5f,  -0.5f, 4,  1};
    const uint8_t codes_a[16] = {0x7, 0xd, 0x3, 0x2, 0x0, 0x6, 0xe, 0x4,
                                 0x6, 0x2, 0xc, 0x0, 0x1, 0x9, 0x6, 0x2};
    check_block(st, "block A (g=1)", block_a, 1.0f, 0x38, codes_a);

    /* Block B, a realistic g: the tensor's amax is 10, so g = fl(2688/10) = 268.79998779.
     * The block's amax is 2: sf = g * fl(2 * fl(1/6)) = fl(268.8 * 0.33333334) = 89.5999985;
     * in [64, 128) E4M3 steps by 8, so s = 88 = 1.375 * 2^6 = code 0x6b (E=13, M=3).
     * 1/g = 0.0037202383; 88 * (1/g) = 0.32738098; out_scale = 1/0.32738098 = 3.0545452.
     * x * out_scale -> e2m1:  2 -> 6.109 -> 6 (7);   1 -> 3.055 -> 3 (5);  0.5 -> 1.527 -> 1.5 (3);
     * -0.25 -> -0.764 -> -1 (a);  0.1 -> 0.305 -> 0.5 (1);  1.2 -> 3.665 -> 4 (6);
     * -1.6 -> -4.887 -> -4 (e);   1.7 -> 5.193 -> 6 (7);  -0.9 -> -2.749 -> -3 (d);
     * 0.3 -> 0.916 -> 1 (2);  1.9 -> 5.804 -> 6 (7);  -0.05 -> -0.153 -> -0 (8);
     * 0.75 -> 2.291 -> 2 (4);  1.4 -> 4.276 -> 4 (6);  -1.1 -> -3.360 -> -3 (d);
     * 0.6 -> 1.833 -> 2 (4). None is within 1e-2 of a tie, so rcp.approx cannot change them. */
    const float block_b[16] = {2,     1,    0.5f, -0.25f, 0.1f,  1.2f, -1.6f, 1.7f,
                               -0.9f, 0.3f, 1.9f, -0.05f, 0.75f, 1.4f, -1.1f, 0.6f};
    const uint8_t codes_b[16] = {0x7, 0x5, 0x3, 0xa, 0x1, 0x6, 0xe, 0x7,
                                 0xd, 0x2, 0x7, 0x8, 0x4, 0x6, 0xd, 0x4};
    float g_b = 2688.0f / 10.0f;
    check_block(st, "block B (g=268.8)", block_b, g_b, 0x6b, codes_b);
    /* Its dequantisation: code * 88 * (1/g); e.g. element 0: 6 * 88 / 268.8 = 1.9643. */
    uint8_t packed[8], scale;
    float out[16];
    nvfp4_quantize_block16(block_b, g_b, packed, &scale);
    nvfp4_dequantize_block16(packed, scale, 1.0f / g_b, out);
    CHECK(st, fabsf(out[0] - 6.0f * 88.0f / 268.8f) < 1e-6f, "block B dequant %g", (double)out[0]);

    /* Block C: scale underflow. g = 1, amax 1e-5: sf = 1.7e-6 < 2^-10 (half the smallest
     * subnormal), so s = 0; the values must come out as zeros, not as +-6. */
    float block_c[16];
    uint8_t codes_c[16];
    for (int i = 0; i < 16; i++) {
        block_c[i] = (i % 2 ? -1e-5f : 1e-5f) * (float)(i + 1) / 16.0f;
        codes_c[i] = i % 2 ? 0x8 : 0x0; /* x * 0: signed zeros */
    }
    check_block(st, "block C (underflow)", block_c, 1.0f, 0x00, codes_c);

    /* Block D: scale saturation. g = 1000, amax 6: sf = 1000 > 448 -> s = 448 (0x7e);
     * out_scale = 1/(448/1000) = 2.232; 6 -> 13.4 and 3 -> 6.7 saturate to 6, 1 -> 2.23 -> 2,
     * 0.25 -> 0.558 -> 0.5. */
    const float block_d[16] = {6, -3, 1, 0.25f, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6};
    const uint8_t codes_d[16] = {7, 0xf, 4, 1, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7};
    check_block(st, "block D (saturated scale)", block_d, 1000.0f, 0x7e, codes_d);

    /* Block E: all zeros (amax 0): scale 0, codes 0. */
    const float block_e[16] = {0};
    const uint8_t codes_e[16] = {0};
    check_block(st, "block E (zeros)", block_e, 268.8f, 0x00, codes_e);
}

static void test_nvfp4_error_bound(testing_state *st, testing_rng *rng)
{
    enum { ROWS = 37, COLS = 256 };
    static float x[ROWS * COLS], x_hat[ROWS * COLS], deq[ROWS * COLS];
    static uint8_t packed[ROWS * COLS / 2], scales[ROWS * COLS / 16];
    float amax = 0;
    for (int i = 0; i < ROWS * COLS; i++) {
        /* Per-row magnitudes over 4 decades, so blocks use many scale exponents. */
        x[i] = (float)(testing_normal(rng) * pow(10.0, (i / COLS) % 5 - 2));
        amax = fmaxf(amax, fabsf(x[i]));
    }
    float g = 2688.0f / amax;
    int bad = 0;
    double worst_ratio = 0;
    for (int r = 0; r < ROWS; r++) {
        nvfp4_quantize_row(x + r * COLS, COLS, g, packed + r * COLS / 2, scales + r * COLS / 16);
        nvfp4_dequantize_row(packed + r * COLS / 2, scales + r * COLS / 16, COLS, 1.0f / g,
                             deq + r * COLS);
        nvfp4_fake_quantize_row(x + r * COLS, COLS, g, x_hat + r * COLS);
    }
    for (int i = 0; i < ROWS * COLS; i++) {
        /* In units of the block's step s/g, an E2M1 value is off by at most half its local
         * spacing (0.25 below 2, 0.5 below 4, 1 up to 6), or by its excess over 6 where the
         * E4M3 scale rounded down and the value saturates. A scale that underflowed to 0
         * leaves zeros, which needs sf = g*amax/6 below 2^-10. */
        float s = fp4moe_e4m3_to_float(scales[i / 16]);
        if (!same_bits(deq[i], x_hat[i] * (1.0f / g))) bad++;
        if (s == 0.0f) {
            if (deq[i] != 0.0f || fabs((double)x[i]) * g / 6 > 0x1p-10) bad++;
            continue;
        }
        double unit = (double)s / (double)g;
        double scaled = fabs((double)x[i]) / unit;
        double allowed = scaled < 2 ? 0.25 : scaled < 4 ? 0.5 : scaled <= 7 ? 1.0 : scaled - 6;
        double err = fabs((double)deq[i] - (double)x[i]) / unit;
        if (err > allowed * (1 + 1e-5) + 1e-6) bad++;
        if (err / allowed > worst_ratio) worst_ratio = err / allowed;
    }
    CHECK(st, bad == 0, "%d values beyond the half-step bound (worst %.3f of it)", bad,
          worst_ratio);
    double rel = testing_rel_l2_f32(deq, x, ROWS * COLS);
    CHECK(st, rel < 0.12, "relative L2 error %.4f", rel);
}

/* ------------------------------------------------------------------------------ layouts */
static void test_swizzled_layout(testing_state *st, testing_rng *rng)
{
    /* Golden offsets from the formula, worked by hand:
     * offset = (m/128)*(C_pad4/4)*512 + (c/4)*512 + (m%32)*16 + ((m%128)/32)*4 + c%4 */
    static const struct {
        int64_t m, c, cols, offset;
    } golden[] = {
        {0, 0, 1, 0},
        {1, 0, 1, 16},
        {32, 0, 1, 4},
        {0, 1, 2, 1},
        {0, 4, 8, 512},
        {128, 0, 1, 512},
        {128, 0, 5, 1024},
        {127, 3, 4, 511},
        {31, 0, 4, 496},
        {96, 2, 3, 14},
        {200, 5, 168, 22153}, /* 42*512+512+8*16+2*4+1 */
        {299, 167, 168, 2 * 42 * 512 + 41 * 512 + 11 * 16 + 1 * 4 + 3},
    };
    for (size_t i = 0; i < sizeof golden / sizeof golden[0]; i++) {
        int64_t got = fp4moe_swizzled_scale_offset(golden[i].m, golden[i].c, golden[i].cols);
        CHECK(st, got == golden[i].offset, "offset(%lld,%lld,C=%lld) = %lld, want %lld",
              (long long)golden[i].m, (long long)golden[i].c, (long long)golden[i].cols,
              (long long)got, (long long)golden[i].offset);
    }
    CHECK(st, fp4moe_swizzled_scale_offset(-1, 0, 1) == -1, "row < 0");
    CHECK(st, fp4moe_swizzled_scale_offset(0, 1, 1) == -1, "col >= C");
    CHECK(st, fp4moe_swizzled_scale_offset(0, 0, 0) == -1, "C = 0");
    CHECK(st, fp4moe_swizzled_scale_offset(INT64_MAX - 5, 0, 1) == -1, "row overflow");

    CHECK(st, fp4moe_scale_bytes(1, 16, FP4MOE_SCALE_LINEAR) == 1, "bytes 1x1 linear");
    CHECK(st, fp4moe_scale_bytes(1, 16, FP4MOE_SCALE_SWIZZLED_128x4) == 512, "bytes 1x1 swz");
    CHECK(st, fp4moe_scale_bytes(300, 80, FP4MOE_SCALE_SWIZZLED_128x4) == 384 * 8, "300x5 swz");
    CHECK(st, fp4moe_scale_bytes(300, 80, FP4MOE_SCALE_LINEAR) == 1500, "300x5 linear");
    CHECK(st, fp4moe_scale_bytes(0, 16, FP4MOE_SCALE_LINEAR) == 0, "rows 0");
    CHECK(st, fp4moe_scale_bytes(-1, 16, FP4MOE_SCALE_LINEAR) == 0, "rows < 0");
    CHECK(st, fp4moe_scale_bytes(1, 8, FP4MOE_SCALE_LINEAR) == 0, "cols 8");
    CHECK(st, fp4moe_scale_bytes(1, 0, FP4MOE_SCALE_LINEAR) == 0, "cols 0");
    CHECK(st, fp4moe_scale_bytes(1, 16, (fp4moe_scale_layout)7) == 0, "bad layout");
    CHECK(st, fp4moe_scale_bytes(INT64_MAX, 16 * 16, FP4MOE_SCALE_LINEAR) == 0, "overflow");
    CHECK(st, fp4moe_scale_bytes(INT64_MAX, 16, FP4MOE_SCALE_SWIZZLED_128x4) == 0,
          "padding overflow");

    const int64_t rows_list[] = {1, 127, 129, 300};
    const int64_t scale_cols_list[] = {1, 3, 5, 168};
    for (int ri = 0; ri < 4; ri++) {
        for (int ci = 0; ci < 4; ci++) {
            int64_t rows = rows_list[ri], scale_cols = scale_cols_list[ci], cols = 16 * scale_cols;
            size_t linear_bytes = (size_t)(rows * scale_cols);
            size_t swizzled_bytes = fp4moe_scale_bytes(rows, cols, FP4MOE_SCALE_SWIZZLED_128x4);
            uint8_t *linear = malloc(linear_bytes), *back = malloc(linear_bytes);
            uint8_t *swizzled = malloc(swizzled_bytes), *swizzled2 = malloc(swizzled_bytes);
            uint8_t *seen = calloc(swizzled_bytes, 1);
            if (!linear || !back || !swizzled || !swizzled2 || !seen) {
                CHECK(st, 0, "out of memory");
                free(linear);
                free(back);
                free(swizzled);
                free(swizzled2);
                free(seen);
                return;
            }
            for (size_t i = 0; i < linear_bytes; i++)
                linear[i] = (uint8_t)testing_int(rng, 1, 0x7e); /* never 0: padding is 0 */
            memset(swizzled, 0xa5, swizzled_bytes);
            fp4moe_status s1 = fp4moe_scales_convert(NULL, linear, FP4MOE_SCALE_LINEAR, swizzled,
                                                     FP4MOE_SCALE_SWIZZLED_128x4, rows, cols);
            int misplaced = 0, collisions = 0;
            for (int64_t r = 0; r < rows; r++)
                for (int64_t c = 0; c < scale_cols; c++) {
                    int64_t o = fp4moe_swizzled_scale_offset(r, c, scale_cols);
                    if (o < 0 || (size_t)o >= swizzled_bytes) {
                        misplaced++;
                        continue;
                    }
                    misplaced += swizzled[o] != linear[r * scale_cols + c];
                    collisions += seen[o]++ != 0;
                }
            size_t nonzero_padding = 0;
            for (size_t i = 0; i < swizzled_bytes; i++)
                nonzero_padding += !seen[i] && swizzled[i] != 0;
            memset(back, 0, linear_bytes);
            fp4moe_status s2 = fp4moe_scales_convert(NULL, swizzled, FP4MOE_SCALE_SWIZZLED_128x4,
                                                     back, FP4MOE_SCALE_LINEAR, rows, cols);
            /* Swizzled to swizzled rewrites garbage padding as zeros, also in place. */
            memcpy(swizzled2, swizzled, swizzled_bytes);
            for (size_t i = 0; i < swizzled_bytes; i++)
                if (!seen[i]) swizzled2[i] = 0xee;
            fp4moe_status s3 =
                fp4moe_scales_convert(NULL, swizzled2, FP4MOE_SCALE_SWIZZLED_128x4, swizzled2,
                                      FP4MOE_SCALE_SWIZZLED_128x4, rows, cols);
            CHECK(st, s1 == FP4MOE_SUCCESS && s2 == FP4MOE_SUCCESS && s3 == FP4MOE_SUCCESS,
                  "statuses %d %d %d", s1, s2, s3);
            CHECK(st, misplaced == 0 && collisions == 0 && nonzero_padding == 0,
                  "rows %lld C %lld: %d misplaced, %d collisions, %zu padding bytes not 0",
                  (long long)rows, (long long)scale_cols, misplaced, collisions, nonzero_padding);
            CHECK(st, memcmp(back, linear, linear_bytes) == 0, "round trip rows %lld C %lld",
                  (long long)rows, (long long)scale_cols);
            CHECK(st, memcmp(swizzled2, swizzled, swizzled_bytes) == 0,
                  "swizzled->swizzled padding rows %lld C %lld", (long long)rows,
                  (long long)scale_cols);
            free(linear);
            free(back);
            free(swizzled);
            free(swizzled2);
            free(seen);
        }
    }
}

/* ------------------------------------------------------------------------------ public API */
static void test_public_quantize(testing_state *st, testing_rng *rng)
{
    enum { E = 3, ROWS = 129, COLS = 80 };
    static float x[E * ROWS * COLS], deq_linear[ROWS * COLS], deq_swizzled[ROWS * COLS];
    static uint16_t x16[E * ROWS * COLS];
    static uint8_t packed[E * ROWS * COLS / 2], packed2[E * ROWS * COLS / 2];
    static uint8_t scales_linear[ROWS * COLS / 16], scales_linear2[256 * 8]; /* room for padding */
    static uint8_t scales_swizzled[E * 256 * 8];
    for (int i = 0; i < E * ROWS * COLS; i++)
        x[i] = (float)(testing_normal(rng) * (1 + i / (ROWS * COLS)));

    /* Global scale: amax planted at a known value. */
    float g = 0;
    x[5] = -40.0f;
    fp4moe_status s = fp4moe_nvfp4_global_scale(NULL, x, FP4MOE_DTYPE_F32, ROWS * COLS, &g);
    CHECK(st, s == FP4MOE_SUCCESS && g == 2688.0f / 40.0f, "global scale %g", (double)g);
    store_f32(x, E * ROWS * COLS, FP4MOE_DTYPE_BF16, x16);
    s = fp4moe_nvfp4_global_scale(NULL, x16, FP4MOE_DTYPE_BF16, ROWS * COLS, &g);
    CHECK(st, s == FP4MOE_SUCCESS && g == 2688.0f / 40.0f, "bf16 global scale %g", (double)g);
    float special[3] = {0, 0, 0};
    fp4moe_nvfp4_global_scale(NULL, special, FP4MOE_DTYPE_F32, 3, &g);
    CHECK(st, g == 1.0f, "amax 0 -> 1");
    special[1] = INFINITY;
    fp4moe_nvfp4_global_scale(NULL, special, FP4MOE_DTYPE_F32, 3, &g);
    CHECK(st, g == 1.0f, "amax inf -> 1");
    special[1] = NAN;
    fp4moe_nvfp4_global_scale(NULL, special, FP4MOE_DTYPE_F32, 3, &g);
    CHECK(st, g == 1.0f, "NaN -> 1");
    special[1] = 1e-40f;
    fp4moe_nvfp4_global_scale(NULL, special, FP4MOE_DTYPE_F32, 3, &g);
    CHECK(st, g == FLT_MAX, "tiny amax -> FLT_MAX, got %g", (double)g);

    /* Matrix quantisation agrees with the row quantiser, in both layouts and for 16-bit
     * inputs; dequantisation gives the same values through either layout. */
    g = 2688.0f / 40.0f;
    s = fp4moe_nvfp4_quantize(NULL, x, FP4MOE_DTYPE_F32, ROWS, COLS, g, packed, scales_linear,
                              FP4MOE_SCALE_LINEAR);
    CHECK(st, s == FP4MOE_SUCCESS, "quantize linear");
    int bad = 0;
    for (int r = 0; r < ROWS; r++) {
        uint8_t p[COLS / 2], sc[COLS / 16];
        nvfp4_quantize_row(x + r * COLS, COLS, g, p, sc);
        bad += memcmp(p, packed + r * COLS / 2, sizeof p) != 0 ||
               memcmp(sc, scales_linear + r * COLS / 16, sizeof sc) != 0;
    }
    CHECK(st, bad == 0, "%d rows differ from nvfp4_quantize_row", bad);
    memset(scales_swizzled, 0xa5, sizeof scales_swizzled);
    s = fp4moe_nvfp4_quantize(NULL, x, FP4MOE_DTYPE_F32, ROWS, COLS, g, packed2, scales_swizzled,
                              FP4MOE_SCALE_SWIZZLED_128x4);
    CHECK(st, s == FP4MOE_SUCCESS && memcmp(packed, packed2, ROWS * COLS / 2) == 0,
          "quantize swizzled packed");
    fp4moe_scales_convert(NULL, scales_swizzled, FP4MOE_SCALE_SWIZZLED_128x4, scales_linear2,
                          FP4MOE_SCALE_LINEAR, ROWS, COLS);
    CHECK(st, memcmp(scales_linear, scales_linear2, ROWS * COLS / 16) == 0, "swizzled scales");
    CHECK(st, scales_swizzled[fp4moe_swizzled_scale_offset(0, 4, 5) + 1] == 0, "padding zero");
    s = fp4moe_nvfp4_dequantize(NULL, packed, scales_linear, FP4MOE_SCALE_LINEAR, ROWS, COLS,
                                1.0f / g, deq_linear);
    fp4moe_status s2 =
        fp4moe_nvfp4_dequantize(NULL, packed, scales_swizzled, FP4MOE_SCALE_SWIZZLED_128x4, ROWS,
                                COLS, 1.0f / g, deq_swizzled);
    CHECK(st,
          s == FP4MOE_SUCCESS && s2 == FP4MOE_SUCCESS &&
              memcmp(deq_linear, deq_swizzled, sizeof deq_linear) == 0,
          "dequantize layouts agree");
    double rel = testing_rel_l2_f32(deq_linear, x, ROWS * COLS);
    CHECK(st, rel < 0.12, "public round trip rel L2 %.4f", rel);

    float x16_values[ROWS * COLS];
    load_f32(x16, FP4MOE_DTYPE_BF16, ROWS * COLS, x16_values);
    fp4moe_nvfp4_quantize(NULL, x16, FP4MOE_DTYPE_BF16, ROWS, COLS, g, packed2, scales_linear2,
                          FP4MOE_SCALE_LINEAR);
    bad = 0;
    for (int r = 0; r < ROWS; r++) {
        uint8_t p[COLS / 2], sc[COLS / 16];
        nvfp4_quantize_row(x16_values + r * COLS, COLS, g, p, sc);
        bad += memcmp(p, packed2 + r * COLS / 2, sizeof p) != 0 ||
               memcmp(sc, scales_linear2 + r * COLS / 16, sizeof sc) != 0;
    }
    CHECK(st, bad == 0, "bf16 input: %d rows differ", bad);

    /* Experts: each gets g from its own amax and 1/g back. */
    float gd[E];
    s = fp4moe_nvfp4_quantize_experts(NULL, x, FP4MOE_DTYPE_F32, E, ROWS, COLS, packed,
                                      scales_swizzled, FP4MOE_SCALE_SWIZZLED_128x4, gd);
    CHECK(st, s == FP4MOE_SUCCESS, "quantize_experts");
    size_t expert_scale_bytes = fp4moe_scale_bytes(ROWS, COLS, FP4MOE_SCALE_SWIZZLED_128x4);
    for (int e = 0; e < E; e++) {
        float ge;
        fp4moe_nvfp4_global_scale(NULL, x + e * ROWS * COLS, FP4MOE_DTYPE_F32, ROWS * COLS, &ge);
        CHECK(st, gd[e] == 1.0f / ge, "expert %d: 1/g %g vs %g", e, (double)gd[e],
              (double)(1.0f / ge));
        fp4moe_nvfp4_quantize(NULL, x + e * ROWS * COLS, FP4MOE_DTYPE_F32, ROWS, COLS, ge, packed2,
                              scales_linear2, FP4MOE_SCALE_SWIZZLED_128x4);
        CHECK(st,
              memcmp(packed2, packed + e * ROWS * COLS / 2, ROWS * COLS / 2) == 0 &&
                  memcmp(scales_linear2, scales_swizzled + e * expert_scale_bytes,
                         expert_scale_bytes) == 0,
              "expert %d matches a single quantisation", e);
    }
}

/* A matrix large enough for the threaded path gives the bytes of the row quantiser, whatever
 * the thread count. */
static void test_threaded_quantize(testing_state *st, testing_rng *rng)
{
    const int64_t rows = 1030, cols = 272; /* > 2^18 values; 17 scale columns */
    size_t scale_bytes = fp4moe_scale_bytes(rows, cols, FP4MOE_SCALE_SWIZZLED_128x4);
    float *x = malloc((size_t)(rows * cols) * sizeof(float));
    uint16_t *x16 = malloc((size_t)(rows * cols) * sizeof(uint16_t));
    uint8_t *packed = malloc((size_t)(rows * cols / 2)), *scales = malloc(scale_bytes);
    uint8_t *linear = malloc((size_t)(rows * cols / 16));
    if (!x || !x16 || !packed || !scales || !linear) {
        CHECK(st, 0, "out of memory");
        free(x);
        free(x16);
        free(packed);
        free(scales);
        free(linear);
        return;
    }
    for (int64_t i = 0; i < rows * cols; i++)
        x[i] = (float)testing_normal(rng);
    store_f32(x, rows * cols, FP4MOE_DTYPE_F16, x16);
    load_f32(x16, FP4MOE_DTYPE_F16, rows * cols, x); /* the values the F16 path sees */
    fp4moe_context ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.num_threads = 2;
    fp4moe_status s = fp4moe_nvfp4_quantize(&ctx, x16, FP4MOE_DTYPE_F16, rows, cols, 448.0f, packed,
                                            scales, FP4MOE_SCALE_SWIZZLED_128x4);
    scales_to_linear(scales, FP4MOE_SCALE_SWIZZLED_128x4, rows, cols, linear);
    int bad = 0;
    for (int64_t r = 0; r < rows; r++) {
        uint8_t p[136], sc[17];
        nvfp4_quantize_row(x + r * cols, cols, 448.0f, p, sc);
        bad += memcmp(p, packed + r * cols / 2, sizeof p) != 0 ||
               memcmp(sc, linear + r * cols / 16, sizeof sc) != 0;
    }
    CHECK(st, s == FP4MOE_SUCCESS && bad == 0, "threaded f16 quantise: status %d, %d rows differ",
          s, bad);
    free(x);
    free(x16);
    free(packed);
    free(scales);
    free(linear);
}

static void test_invalid_arguments(testing_state *st)
{
    fp4moe_context ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.num_threads = 1;
    float x[32] = {1, 2, 3}, out[32], g = 0;
    uint8_t packed[16], scales[512], scales2[512];
    const fp4moe_status bad = FP4MOE_ERROR_INVALID_ARGUMENT;
    const fp4moe_dtype f32 = FP4MOE_DTYPE_F32;
    const fp4moe_scale_layout lin = FP4MOE_SCALE_LINEAR;
    const fp4moe_scale_layout swz = FP4MOE_SCALE_SWIZZLED_128x4;
#define EXPECT_INVALID(call)                                                                       \
    do {                                                                                           \
        strcpy(ctx.last_error, "");                                                                \
        fp4moe_status status_ = (call);                                                            \
        CHECK(st, status_ == bad && ctx.last_error[0] != '\0', "%s -> %d \"%s\"", #call, status_,  \
              ctx.last_error);                                                                     \
    } while (0)

    /* global_scale */
    EXPECT_INVALID(fp4moe_nvfp4_global_scale(&ctx, NULL, f32, 3, &g));
    EXPECT_INVALID(fp4moe_nvfp4_global_scale(&ctx, x, f32, 3, NULL));
    EXPECT_INVALID(fp4moe_nvfp4_global_scale(&ctx, x, FP4MOE_DTYPE_I32, 3, &g));
    EXPECT_INVALID(fp4moe_nvfp4_global_scale(&ctx, x, (fp4moe_dtype)42, 3, &g));
    EXPECT_INVALID(fp4moe_nvfp4_global_scale(&ctx, x, f32, 0, &g));
    EXPECT_INVALID(fp4moe_nvfp4_global_scale(&ctx, x, f32, -3, &g));
    EXPECT_INVALID(fp4moe_nvfp4_global_scale(&ctx, x, f32, INT64_MAX / 2, &g));
    /* quantize */
    EXPECT_INVALID(fp4moe_nvfp4_quantize(&ctx, NULL, f32, 1, 32, 1, packed, scales, lin));
    EXPECT_INVALID(fp4moe_nvfp4_quantize(&ctx, x, f32, 1, 32, 1, NULL, scales, lin));
    EXPECT_INVALID(fp4moe_nvfp4_quantize(&ctx, x, f32, 1, 32, 1, packed, NULL, lin));
    EXPECT_INVALID(fp4moe_nvfp4_quantize(&ctx, x, FP4MOE_DTYPE_U8, 1, 32, 1, packed, scales, lin));
    EXPECT_INVALID(fp4moe_nvfp4_quantize(&ctx, x, f32, 0, 32, 1, packed, scales, lin));
    EXPECT_INVALID(fp4moe_nvfp4_quantize(&ctx, x, f32, -1, 32, 1, packed, scales, lin));
    EXPECT_INVALID(fp4moe_nvfp4_quantize(&ctx, x, f32, 1, 0, 1, packed, scales, lin));
    EXPECT_INVALID(fp4moe_nvfp4_quantize(&ctx, x, f32, 1, 24, 1, packed, scales, lin));
    EXPECT_INVALID(fp4moe_nvfp4_quantize(&ctx, x, f32, 1, -16, 1, packed, scales, lin));
    EXPECT_INVALID(fp4moe_nvfp4_quantize(&ctx, x, f32, INT64_MAX / 16, 32, 1, packed, scales, lin));
    EXPECT_INVALID(fp4moe_nvfp4_quantize(&ctx, x, f32, 1, 32, 0, packed, scales, lin));
    EXPECT_INVALID(fp4moe_nvfp4_quantize(&ctx, x, f32, 1, 32, -2, packed, scales, lin));
    EXPECT_INVALID(fp4moe_nvfp4_quantize(&ctx, x, f32, 1, 32, INFINITY, packed, scales, lin));
    EXPECT_INVALID(fp4moe_nvfp4_quantize(&ctx, x, f32, 1, 32, NAN, packed, scales, lin));
    EXPECT_INVALID(
        fp4moe_nvfp4_quantize(&ctx, x, f32, 1, 32, 1, packed, scales, (fp4moe_scale_layout)2));
    /* dequantize */
    EXPECT_INVALID(fp4moe_nvfp4_dequantize(&ctx, NULL, scales, lin, 1, 32, 1, out));
    EXPECT_INVALID(fp4moe_nvfp4_dequantize(&ctx, packed, NULL, lin, 1, 32, 1, out));
    EXPECT_INVALID(fp4moe_nvfp4_dequantize(&ctx, packed, scales, lin, 1, 32, 1, NULL));
    EXPECT_INVALID(
        fp4moe_nvfp4_dequantize(&ctx, packed, scales, (fp4moe_scale_layout)-1, 1, 32, 1, out));
    EXPECT_INVALID(fp4moe_nvfp4_dequantize(&ctx, packed, scales, lin, 0, 32, 1, out));
    EXPECT_INVALID(fp4moe_nvfp4_dequantize(&ctx, packed, scales, lin, 1, 33, 1, out));
    EXPECT_INVALID(fp4moe_nvfp4_dequantize(&ctx, packed, scales, lin, INT64_MAX, 16, 1, out));
    EXPECT_INVALID(fp4moe_nvfp4_dequantize(&ctx, packed, scales, lin, 1, 32, 0, out));
    EXPECT_INVALID(fp4moe_nvfp4_dequantize(&ctx, packed, scales, lin, 1, 32, -INFINITY, out));
    EXPECT_INVALID(fp4moe_nvfp4_dequantize(&ctx, packed, scales, lin, 1, 32, NAN, out));
    /* quantize_experts */
    EXPECT_INVALID(
        fp4moe_nvfp4_quantize_experts(&ctx, NULL, f32, 1, 1, 32, packed, scales, lin, &g));
    EXPECT_INVALID(fp4moe_nvfp4_quantize_experts(&ctx, x, f32, 1, 1, 32, NULL, scales, lin, &g));
    EXPECT_INVALID(fp4moe_nvfp4_quantize_experts(&ctx, x, f32, 1, 1, 32, packed, NULL, lin, &g));
    EXPECT_INVALID(
        fp4moe_nvfp4_quantize_experts(&ctx, x, f32, 1, 1, 32, packed, scales, lin, NULL));
    EXPECT_INVALID(fp4moe_nvfp4_quantize_experts(&ctx, x, FP4MOE_DTYPE_E4M3, 1, 1, 32, packed,
                                                 scales, lin, &g));
    EXPECT_INVALID(fp4moe_nvfp4_quantize_experts(&ctx, x, f32, 0, 1, 32, packed, scales, lin, &g));
    EXPECT_INVALID(fp4moe_nvfp4_quantize_experts(&ctx, x, f32, 1, 0, 32, packed, scales, lin, &g));
    EXPECT_INVALID(fp4moe_nvfp4_quantize_experts(&ctx, x, f32, 1, 1, 8, packed, scales, lin, &g));
    EXPECT_INVALID(fp4moe_nvfp4_quantize_experts(&ctx, x, f32, INT64_MAX / 4, 1 << 20, 32, packed,
                                                 scales, lin, &g));
    EXPECT_INVALID(fp4moe_nvfp4_quantize_experts(&ctx, x, f32, 1, 1, 32, packed, scales,
                                                 (fp4moe_scale_layout)9, &g));
    /* scales_convert */
    EXPECT_INVALID(fp4moe_scales_convert(&ctx, NULL, lin, scales2, swz, 1, 32));
    EXPECT_INVALID(fp4moe_scales_convert(&ctx, scales, lin, NULL, swz, 1, 32));
    EXPECT_INVALID(
        fp4moe_scales_convert(&ctx, scales, (fp4moe_scale_layout)5, scales2, swz, 1, 32));
    EXPECT_INVALID(
        fp4moe_scales_convert(&ctx, scales, lin, scales2, (fp4moe_scale_layout)5, 1, 32));
    EXPECT_INVALID(fp4moe_scales_convert(&ctx, scales, lin, scales2, swz, 0, 32));
    EXPECT_INVALID(fp4moe_scales_convert(&ctx, scales, lin, scales2, swz, 1, 20));
    EXPECT_INVALID(fp4moe_scales_convert(&ctx, scales, lin, scales2, swz, INT64_MAX, 32));
    EXPECT_INVALID(fp4moe_scales_convert(&ctx, scales, lin, scales, swz, 1, 32));     /* in place */
    EXPECT_INVALID(fp4moe_scales_convert(&ctx, scales, swz, scales + 1, swz, 1, 32)); /* overlap */
#undef EXPECT_INVALID

    /* A NULL context reports by status alone; a later good call clears the message. */
    CHECK(st, fp4moe_nvfp4_quantize(NULL, NULL, f32, 1, 32, 1, packed, scales, lin) == bad,
          "NULL ctx");
    CHECK(st,
          fp4moe_nvfp4_global_scale(&ctx, x, f32, 3, &g) == FP4MOE_SUCCESS &&
              ctx.last_error[0] == '\0',
          "success clears the message");
}

int main(void)
{
    testing_state st = {0, 0};
    testing_rng rng = testing_rng_from_env("test_format");
    test_e2m1(&st);
    test_e4m3(&st);
    test_bf16(&st);
    test_f16(&st);
    test_array_conversions(&st, &rng);
    test_nvfp4_golden(&st);
    test_nvfp4_error_bound(&st, &rng);
    test_swizzled_layout(&st, &rng);
    test_public_quantize(&st, &rng);
    test_threaded_quantize(&st, &rng);
    test_invalid_arguments(&st);
    return testing_finish(&st, "test_format");
}
