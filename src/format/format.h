/* Internal NVFP4 / FP8 / 16-bit float helpers shared by the backends, the IO code and the
 * public format functions (src/format/public_api.c). Pure functions, no state. */
#ifndef FP4MOE_FORMAT_H
#define FP4MOE_FORMAT_H

#include <stddef.h>
#include <stdint.h>

#include "fp4moe.h"

/* Scalar conversions (definitions in convert.c; the public fp4moe_* ones call these). */
float e2m1_to_float(uint8_t code);   /* low nibble */
uint8_t float_to_e2m1(float x);      /* RNE, saturating at +-6, NaN -> 0x7 (+6) */
float e4m3_to_float(uint8_t code);   /* NaN for 0x7f / 0xff */
uint8_t float_to_e4m3(float x);      /* RNE, satfinite at +-448, NaN -> 0x7f */
float bf16_to_float(uint16_t bits);
uint16_t float_to_bf16(float x);     /* RNE; NaN stays NaN */
float f16_to_float(uint16_t bits);
uint16_t float_to_f16(float x);      /* RNE; overflow -> inf; NaN stays NaN */

/* Bytes per element of a dtype (U8 and E4M3: 1). 0 for an invalid dtype. */
size_t dtype_size(fp4moe_dtype dtype);
const char *dtype_name(fp4moe_dtype dtype);

/* Converts count values of a F32/F16/BF16 array to FP32. */
void load_f32(const void *src, fp4moe_dtype dtype, int64_t count, float *dst);
/* Converts count FP32 values to F32/F16/BF16 (RNE). */
void store_f32(const float *src, int64_t count, fp4moe_dtype dtype, void *dst);
/* Rounds FP32 values in place to what the dtype can hold (F32: unchanged). */
void round_to_dtype(float *x, int64_t count, fp4moe_dtype dtype);

/* The spec's NVFP4 quantisation of one 16-value block with quantisation scale g
 * (amax -> sf = g*(amax/6) -> s = e4m3(sf) -> out_scale = amax != 0 ? 1/(s * (1/g)) : 0
 * -> q = e2m1(x * out_scale)). IEEE division stands in for the GPU's rcp.approx.
 * Writes 8 packed bytes (element 2i low nibble) and the E4M3 scale code. */
void nvfp4_quantize_block16(const float *x, float g, uint8_t *packed8, uint8_t *scale);
/* Its two pieces, for quantisers with other reciprocals (the EP codec): the block's max |x|
 * (NaN skipped) and the 8 packed codes of x * out_scale. */
float nvfp4_block_amax(const float *x16);
void nvfp4_encode_block16(const float *x16, float out_scale, uint8_t *packed8);

/* One block back: out16[i] = e2m1(code i) * e4m3(scale) * global_dequant (the first product
 * is exact; the global scale is applied last). */
void nvfp4_dequantize_block16(const uint8_t *packed8, uint8_t scale, float global_dequant,
                              float *out16);

/* Rows of FP32 values (cols a multiple of 16) -> packed [cols/2] + linear scales [cols/16]. */
void nvfp4_quantize_row(const float *x, int64_t cols, float g, uint8_t *packed,
                        uint8_t *scales);

/* Quantise then dequantise a row: x_hat = e2m1 * e4m3 (exact), WITHOUT the 1/g factor,
 * which callers apply once after the dot product, as the Blackwell GEMM epilogue does. */
void nvfp4_fake_quantize_row(const float *x, int64_t cols, float g, float *x_hat);

/* One row of packed values + linear scales -> FP32 values times global_dequant. */
void nvfp4_dequantize_row(const uint8_t *packed, const uint8_t *scales, int64_t cols,
                          float global_dequant, float *out);

/* 128x4 swizzled layout (TRT-LLM cvt_quant_get_sf_out_offset). scale_cols = cols/16. */
int64_t swizzled_offset(int64_t row, int64_t scale_col, int64_t scale_cols);
size_t scale_matrix_bytes(int64_t rows, int64_t cols, fp4moe_scale_layout layout);
/* Copies a scale matrix of a [rows, cols] tensor from in_layout to LINEAR. */
void scales_to_linear(const uint8_t *in, fp4moe_scale_layout in_layout, int64_t rows,
                      int64_t cols, uint8_t *linear);
/* Copies a LINEAR scale matrix into the swizzled layout, padding with zero codes. */
void scales_to_swizzled(const uint8_t *linear, int64_t rows, int64_t cols, uint8_t *swizzled);

#endif
