/* Block-scale layouts: LINEAR [rows, cols/16] and the 128x4 "swizzled" layout of the Blackwell
 * kernels (TRT-LLM cvt_quant_get_sf_out_offset, 128x4 case). A tile covers 128 rows x 4 scale
 * columns in 512 bytes, stored as [32][4][4]: row m%32 picks a 16-byte line, (m%128)/32 a
 * 4-byte group in it, c%4 the byte; so one 16-byte load gives a thread 4 rows x 4 scales.
 * Tiles are ordered column-tile fastest within a 128-row band. */
#include <stdint.h>
#include <string.h>

#include "format.h"

static int64_t round_up(int64_t value, int64_t multiple)
{
    return (value + multiple - 1) / multiple * multiple;
}

int64_t swizzled_offset(int64_t row, int64_t scale_col, int64_t scale_cols)
{
    int64_t column_tiles = round_up(scale_cols, 4) / 4;
    return (row / 128) * column_tiles * 512 + (scale_col / 4) * 512 + (row % 32) * 16 +
           ((row % 128) / 32) * 4 + (scale_col % 4);
}

size_t scale_matrix_bytes(int64_t rows, int64_t cols, fp4moe_scale_layout layout)
{
    if (rows <= 0 || cols <= 0 || cols % 16 != 0) return 0;
    int64_t scale_cols = cols / 16;
    int64_t padded_rows = rows, padded_cols = scale_cols;
    if (layout == FP4MOE_SCALE_SWIZZLED_128x4) {
        if (rows > INT64_MAX - 127) return 0;
        padded_rows = round_up(rows, 128);
        padded_cols = round_up(scale_cols, 4);
    } else if (layout != FP4MOE_SCALE_LINEAR) {
        return 0;
    }
    if (padded_rows > INT64_MAX / padded_cols) return 0;
    int64_t bytes = padded_rows * padded_cols;
    if ((uint64_t)bytes > (uint64_t)SIZE_MAX) return 0;
    return (size_t)bytes;
}

void scales_to_linear(const uint8_t *in, fp4moe_scale_layout in_layout, int64_t rows, int64_t cols,
                      uint8_t *linear)
{
    int64_t scale_cols = cols / 16;
    if (in_layout == FP4MOE_SCALE_LINEAR) {
        memmove(linear, in, (size_t)(rows * scale_cols));
        return;
    }
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < scale_cols; c++)
            linear[r * scale_cols + c] = in[swizzled_offset(r, c, scale_cols)];
}

void scales_to_swizzled(const uint8_t *linear, int64_t rows, int64_t cols, uint8_t *swizzled)
{
    int64_t scale_cols = cols / 16;
    memset(swizzled, 0, scale_matrix_bytes(rows, cols, FP4MOE_SCALE_SWIZZLED_128x4));
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < scale_cols; c++)
            swizzled[swizzled_offset(r, c, scale_cols)] = linear[r * scale_cols + c];
}
