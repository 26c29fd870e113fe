/* The public NVFP4 format functions of include/fp4moe.h: argument checks, then the internal
 * codecs of format.h. Large matrices are split over rows with OpenMP; every block is
 * independent, so the result does not depend on the thread count. */
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "core/context.h"
#include "format.h"

/* Below this many values a parallel region costs more than it saves. */
#define PARALLEL_MIN_VALUES ((int64_t)1 << 18)
/* Values converted to FP32 at a time on the stack (a multiple of 16). */
#define LOAD_CHUNK 256

float fp4moe_e2m1_to_float(uint8_t code)
{
    return e2m1_to_float(code);
}
float fp4moe_e4m3_to_float(uint8_t code)
{
    return e4m3_to_float(code);
}
uint8_t fp4moe_float_to_e2m1(float x)
{
    return float_to_e2m1(x);
}
uint8_t fp4moe_float_to_e4m3(float x)
{
    return float_to_e4m3(x);
}
float fp4moe_bf16_to_float(uint16_t bits)
{
    return bf16_to_float(bits);
}
uint16_t fp4moe_float_to_bf16(float x)
{
    return float_to_bf16(x);
}
float fp4moe_f16_to_float(uint16_t bits)
{
    return f16_to_float(bits);
}
uint16_t fp4moe_float_to_f16(float x)
{
    return float_to_f16(x);
}

/* ------------------------------------------------------------------------------ checks */
static int is_float_dtype(fp4moe_dtype dtype)
{
    return dtype == FP4MOE_DTYPE_F32 || dtype == FP4MOE_DTYPE_F16 || dtype == FP4MOE_DTYPE_BF16;
}

static int is_layout(fp4moe_scale_layout layout)
{
    return layout == FP4MOE_SCALE_LINEAR || layout == FP4MOE_SCALE_SWIZZLED_128x4;
}

/* a * b * c without overflowing int64 or size_t; a, b, c > 0. */
static int product_fits(int64_t a, int64_t b, int64_t c)
{
    int64_t limit = (uint64_t)SIZE_MAX < (uint64_t)INT64_MAX ? (int64_t)SIZE_MAX : INT64_MAX;
    if (a > limit / b) return 0;
    return a * b <= limit / c;
}

/* Checks a [count of matrices, rows, cols] NVFP4 tensor whose unpacked elements have
 * element_bytes bytes: sizes, the multiple of 16, and every derived size in range. */
static fp4moe_status check_shape(fp4moe_context *ctx, const char *fn, int64_t matrices,
                                 int64_t rows, int64_t cols, size_t element_bytes,
                                 fp4moe_scale_layout layout)
{
    if (matrices <= 0)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: experts (%lld) must be > 0", fn,
                           (long long)matrices);
    if (rows <= 0)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: rows (%lld) must be > 0", fn,
                           (long long)rows);
    if (cols <= 0 || cols % 16 != 0)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                           "%s: cols (%lld) must be a positive multiple of 16", fn,
                           (long long)cols);
    if (!is_layout(layout))
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: invalid scale layout %d", fn,
                           (int)layout);
    size_t scale_bytes = scale_matrix_bytes(rows, cols, layout);
    if (!product_fits(matrices, rows, cols) ||
        !product_fits(matrices * rows, cols, (int64_t)element_bytes) || scale_bytes == 0 ||
        !product_fits(matrices, (int64_t)scale_bytes, 1))
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                           "%s: size %lld x %lld x %lld overflows", fn, (long long)matrices,
                           (long long)rows, (long long)cols);
    return FP4MOE_SUCCESS;
}

static int thread_count(const fp4moe_context *ctx)
{
    return ctx != NULL && ctx->num_threads > 0 ? ctx->num_threads : omp_get_max_threads();
}

/* ------------------------------------------------------------------------------ kernels */
/* Largest |x| of count values; *finite is 0 when any value is inf or NaN. */
static float amax_of(const void *x, fp4moe_dtype dtype, int64_t count, int *finite)
{
    const uint8_t *bytes = (const uint8_t *)x;
    size_t element_bytes = dtype_size(dtype);
    float amax = 0.0f;
    int all_finite = 1;
    for (int64_t start = 0; start < count; start += LOAD_CHUNK) {
        float chunk[LOAD_CHUNK];
        int64_t n = count - start < LOAD_CHUNK ? count - start : LOAD_CHUNK;
        load_f32(bytes + (size_t)start * element_bytes, dtype, n, chunk);
        for (int64_t i = 0; i < n; i++) {
            all_finite &= isfinite(chunk[i]) != 0;
            float a = fabsf(chunk[i]);
            amax = a > amax ? a : amax; /* NaN is caught by all_finite */
        }
    }
    *finite = all_finite;
    return amax;
}

/* g = 6*448/amax; 1 when amax is 0 or not finite. A tiny amax would overflow g: it is
 * clamped to the largest float so that g stays a valid quantisation scale. */
static float global_scale_from_amax(float amax, int finite)
{
    if (!finite || !(amax > 0.0f)) return 1.0f;
    float g = (6.0f * 448.0f) / amax;
    return isfinite(g) ? g : FLT_MAX;
}

static void quantize_matrix(const void *x, fp4moe_dtype dtype, int64_t rows, int64_t cols, float g,
                            uint8_t *packed, uint8_t *scales, fp4moe_scale_layout layout,
                            int threads)
{
    const uint8_t *bytes = (const uint8_t *)x;
    size_t element_bytes = dtype_size(dtype);
    int64_t scale_cols = cols / 16;
    if (layout == FP4MOE_SCALE_SWIZZLED_128x4)
        memset(scales, 0, scale_matrix_bytes(rows, cols, layout)); /* the padding */
#pragma omp parallel for schedule(static)                                                          \
    num_threads(threads) if (rows * cols >= PARALLEL_MIN_VALUES)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t start = 0; start < cols; start += LOAD_CHUNK) {
            float chunk[LOAD_CHUNK];
            int64_t n = cols - start < LOAD_CHUNK ? cols - start : LOAD_CHUNK;
            load_f32(bytes + (size_t)(r * cols + start) * element_bytes, dtype, n, chunk);
            for (int64_t b = 0; b < n / 16; b++) {
                int64_t c = start / 16 + b;
                int64_t offset = layout == FP4MOE_SCALE_LINEAR ? r * scale_cols + c
                                                               : swizzled_offset(r, c, scale_cols);
                nvfp4_quantize_block16(chunk + 16 * b, g, packed + r * (cols / 2) + c * 8,
                                       scales + offset);
            }
        }
    }
}

/* ------------------------------------------------------------------------------ public */
fp4moe_status fp4moe_nvfp4_global_scale(fp4moe_context *ctx, const void *x, fp4moe_dtype dtype,
                                        int64_t count, float *global_scale)
{
    static const char fn[] = "fp4moe_nvfp4_global_scale";
    fp4moe_clear_error(ctx);
    if (x == NULL) return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: x is NULL", fn);
    if (global_scale == NULL)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: global_scale is NULL", fn);
    if (!is_float_dtype(dtype))
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                           "%s: dtype %d is not F32, F16 or BF16", fn, (int)dtype);
    if (count <= 0 || !product_fits(count, (int64_t)dtype_size(dtype), 1))
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                           "%s: count (%lld) must be > 0 and fit in memory", fn, (long long)count);
    int finite;
    float amax = amax_of(x, dtype, count, &finite);
    *global_scale = global_scale_from_amax(amax, finite);
    return FP4MOE_SUCCESS;
}

fp4moe_status fp4moe_nvfp4_quantize(fp4moe_context *ctx, const void *x, fp4moe_dtype dtype,
                                    int64_t rows, int64_t cols, float global_scale, uint8_t *packed,
                                    uint8_t *scales, fp4moe_scale_layout layout)
{
    static const char fn[] = "fp4moe_nvfp4_quantize";
    fp4moe_clear_error(ctx);
    if (x == NULL) return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: x is NULL", fn);
    if (packed == NULL)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: packed is NULL", fn);
    if (scales == NULL)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: scales is NULL", fn);
    if (!is_float_dtype(dtype))
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                           "%s: dtype %d is not F32, F16 or BF16", fn, (int)dtype);
    if (!isfinite(global_scale) || !(global_scale > 0.0f))
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                           "%s: global_scale (%g) must be finite and > 0", fn,
                           (double)global_scale);
    fp4moe_status status = check_shape(ctx, fn, 1, rows, cols, dtype_size(dtype), layout);
    if (status != FP4MOE_SUCCESS) return status;
    quantize_matrix(x, dtype, rows, cols, global_scale, packed, scales, layout, thread_count(ctx));
    return FP4MOE_SUCCESS;
}

fp4moe_status fp4moe_nvfp4_dequantize(fp4moe_context *ctx, const uint8_t *packed,
                                      const uint8_t *scales, fp4moe_scale_layout layout,
                                      int64_t rows, int64_t cols, float global_dequant_scale,
                                      float *out)
{
    static const char fn[] = "fp4moe_nvfp4_dequantize";
    fp4moe_clear_error(ctx);
    if (packed == NULL)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: packed is NULL", fn);
    if (scales == NULL)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: scales is NULL", fn);
    if (out == NULL) return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: out is NULL", fn);
    if (!isfinite(global_dequant_scale) || !(global_dequant_scale > 0.0f))
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                           "%s: global_dequant_scale (%g) must be finite and > 0", fn,
                           (double)global_dequant_scale);
    fp4moe_status status = check_shape(ctx, fn, 1, rows, cols, sizeof(float), layout);
    if (status != FP4MOE_SUCCESS) return status;

    int64_t scale_cols = cols / 16;
#pragma omp parallel for schedule(static)                                                          \
    num_threads(thread_count(ctx)) if (rows * cols >= PARALLEL_MIN_VALUES)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t c = 0; c < scale_cols; c++) {
            int64_t offset = layout == FP4MOE_SCALE_LINEAR ? r * scale_cols + c
                                                           : swizzled_offset(r, c, scale_cols);
            nvfp4_dequantize_block16(packed + r * (cols / 2) + c * 8, scales[offset],
                                     global_dequant_scale, out + r * cols + c * 16);
        }
    }
    return FP4MOE_SUCCESS;
}

fp4moe_status fp4moe_nvfp4_quantize_experts(fp4moe_context *ctx, const void *x, fp4moe_dtype dtype,
                                            int64_t experts, int64_t rows, int64_t cols,
                                            uint8_t *packed, uint8_t *scales,
                                            fp4moe_scale_layout layout, float *global_dequant_out)
{
    static const char fn[] = "fp4moe_nvfp4_quantize_experts";
    fp4moe_clear_error(ctx);
    if (x == NULL) return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: x is NULL", fn);
    if (packed == NULL)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: packed is NULL", fn);
    if (scales == NULL)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: scales is NULL", fn);
    if (global_dequant_out == NULL)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: global_dequant_out is NULL",
                           fn);
    if (!is_float_dtype(dtype))
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                           "%s: dtype %d is not F32, F16 or BF16", fn, (int)dtype);
    fp4moe_status status = check_shape(ctx, fn, experts, rows, cols, dtype_size(dtype), layout);
    if (status != FP4MOE_SUCCESS) return status;

    const uint8_t *bytes = (const uint8_t *)x;
    size_t scale_bytes = scale_matrix_bytes(rows, cols, layout);
    int64_t values = rows * cols;
    int threads = thread_count(ctx);
    for (int64_t e = 0; e < experts; e++) {
        const uint8_t *expert_x = bytes + (size_t)(e * values) * dtype_size(dtype);
        int finite;
        float amax = amax_of(expert_x, dtype, values, &finite);
        float g = global_scale_from_amax(amax, finite);
        quantize_matrix(expert_x, dtype, rows, cols, g, packed + e * (values / 2),
                        scales + (size_t)e * scale_bytes, layout, threads);
        global_dequant_out[e] = 1.0f / g;
    }
    return FP4MOE_SUCCESS;
}

size_t fp4moe_scale_bytes(int64_t rows, int64_t cols, fp4moe_scale_layout layout)
{
    return scale_matrix_bytes(rows, cols, layout);
}

static int ranges_overlap(const void *a, size_t a_bytes, const void *b, size_t b_bytes)
{
    uintptr_t a0 = (uintptr_t)a, b0 = (uintptr_t)b;
    return a0 < b0 + b_bytes && b0 < a0 + a_bytes;
}

fp4moe_status fp4moe_scales_convert(fp4moe_context *ctx, const uint8_t *in,
                                    fp4moe_scale_layout in_layout, uint8_t *out,
                                    fp4moe_scale_layout out_layout, int64_t rows, int64_t cols)
{
    static const char fn[] = "fp4moe_scales_convert";
    fp4moe_clear_error(ctx);
    if (in == NULL) return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: in is NULL", fn);
    if (out == NULL) return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: out is NULL", fn);
    if (!is_layout(in_layout))
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: invalid in_layout %d", fn,
                           (int)in_layout);
    fp4moe_status status = check_shape(ctx, fn, 1, rows, cols, 1, out_layout);
    if (status != FP4MOE_SUCCESS) return status;
    size_t in_bytes = scale_matrix_bytes(rows, cols, in_layout);
    size_t out_bytes = scale_matrix_bytes(rows, cols, out_layout);
    int same_layout = in_layout == out_layout;
    /* A layout change reads and writes scattered bytes: it cannot run in place. */
    if (!(same_layout && in == out) && ranges_overlap(in, in_bytes, out, out_bytes))
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                           "%s: in and out overlap (only in == out with one layout is allowed)",
                           fn);

    if (in_layout == FP4MOE_SCALE_LINEAR && out_layout == FP4MOE_SCALE_LINEAR) {
        memmove(out, in, out_bytes);
    } else if (in_layout == FP4MOE_SCALE_LINEAR) {
        scales_to_swizzled(in, rows, cols, out);
    } else if (out_layout == FP4MOE_SCALE_LINEAR) {
        scales_to_linear(in, in_layout, rows, cols, out);
    } else {
        /* Swizzled to swizzled: copy, then rewrite the padding as the header promises. */
        memmove(out, in, out_bytes);
        int64_t scale_cols = cols / 16;
        int64_t padded_rows = (rows + 127) / 128 * 128, padded_cols = (scale_cols + 3) / 4 * 4;
        for (int64_t r = 0; r < padded_rows; r++)
            for (int64_t c = r < rows ? scale_cols : 0; c < padded_cols; c++)
                out[swizzled_offset(r, c, scale_cols)] = 0;
    }
    return FP4MOE_SUCCESS;
}

int64_t fp4moe_swizzled_scale_offset(int64_t row, int64_t scale_col, int64_t scale_cols)
{
    /* -1 for arguments outside the matrix or a padded size beyond int64. */
    if (row < 0 || scale_cols <= 0 || scale_col < 0 || scale_col >= scale_cols) return -1;
    if (row > INT64_MAX - 128 || scale_cols > INT64_MAX - 4) return -1;
    int64_t padded_rows = (row + 128) / 128 * 128, padded_cols = (scale_cols + 3) / 4 * 4;
    if (padded_rows > INT64_MAX / padded_cols) return -1;
    return swizzled_offset(row, scale_col, scale_cols);
}
