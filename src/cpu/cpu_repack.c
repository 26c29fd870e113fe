/* Canonical NVFP4 matrices <-> the pair-tile layout of cpu_kernels.h. */
#include <string.h>

#include "cpu_kernels.h"

static int64_t row_tiles_of(int64_t rows)
{
    return (rows + CPU_TILE_ROWS - 1) / CPU_TILE_ROWS;
}
static int64_t pairs_of(int64_t cols)
{
    return (cols + CPU_PAIR_VALUES - 1) / CPU_PAIR_VALUES;
}

size_t cpu_packed_code_bytes(int64_t rows, int64_t cols)
{
    return (size_t)(row_tiles_of(rows) * pairs_of(cols) * CPU_TILE_ROWS * CPU_PAIR_CODE_BYTES);
}

size_t cpu_packed_scale_bytes(int64_t rows, int64_t cols)
{
    return (size_t)(row_tiles_of(rows) * pairs_of(cols) * CPU_TILE_ROWS * CPU_PAIR_SCALE_BYTES);
}

void cpu_packed_init(cpu_packed_matrix *m, int64_t rows, int64_t cols, uint8_t *codes,
                     uint8_t *scales)
{
    m->codes = codes;
    m->scales = scales;
    m->rows = rows;
    m->cols = cols;
    m->pairs = pairs_of(cols);
    m->row_tiles = row_tiles_of(rows);
}

/* The 4-bit code of element k of a canonical row (element 2i low nibble, 2i+1 high). */
static uint8_t code_at(const uint8_t *row, int64_t k)
{
    uint8_t byte = row[k / 2];
    return (uint8_t)((k & 1) ? byte >> 4 : byte & 0xf);
}

void cpu_repack_matrix(const uint8_t *packed, const uint8_t *scales, cpu_packed_matrix *m)
{
    const int64_t blocks = m->cols / 16;
    memset(m->codes, 0, cpu_packed_code_bytes(m->rows, m->cols));
    memset(m->scales, 0, cpu_packed_scale_bytes(m->rows, m->cols));
    for (int64_t n = 0; n < m->rows; n++) {
        const int64_t tile = n / CPU_TILE_ROWS, r = n % CPU_TILE_ROWS;
        const uint8_t *row = packed + n * (m->cols / 2);
        const uint8_t *row_scales = scales + n * blocks;
        uint8_t *tile_codes = m->codes + tile * m->pairs * CPU_TILE_ROWS * CPU_PAIR_CODE_BYTES;
        uint8_t *tile_scales = m->scales + tile * m->pairs * CPU_TILE_ROWS * CPU_PAIR_SCALE_BYTES;
        for (int64_t p = 0; p < m->pairs; p++) {
            uint8_t *dst = tile_codes + (p * CPU_TILE_ROWS + r) * CPU_PAIR_CODE_BYTES;
            uint8_t *dst_scales = tile_scales + (p * CPU_TILE_ROWS + r) * CPU_PAIR_SCALE_BYTES;
            const int64_t block_a = 2 * p, block_b = 2 * p + 1;
            for (int j = 0; j < 16; j++) {
                uint8_t a = code_at(row, block_a * 16 + j);
                uint8_t b = block_b < blocks ? code_at(row, block_b * 16 + j) : 0;
                dst[j] = (uint8_t)(a | (b << 4));
            }
            dst_scales[0] = row_scales[block_a];
            dst_scales[1] = block_b < blocks ? row_scales[block_b] : 0;
        }
    }
}

void cpu_unpack_matrix(const cpu_packed_matrix *m, uint8_t *packed, uint8_t *scales)
{
    const int64_t blocks = m->cols / 16;
    for (int64_t n = 0; n < m->rows; n++) {
        const int64_t tile = n / CPU_TILE_ROWS, r = n % CPU_TILE_ROWS;
        uint8_t *row = packed ? packed + n * (m->cols / 2) : NULL;
        uint8_t *row_scales = scales ? scales + n * blocks : NULL;
        const uint8_t *tile_codes = m->codes + tile * m->pairs * CPU_TILE_ROWS * CPU_PAIR_CODE_BYTES;
        const uint8_t *tile_scales = m->scales + tile * m->pairs * CPU_TILE_ROWS * CPU_PAIR_SCALE_BYTES;
        for (int64_t p = 0; p < m->pairs; p++) {
            const uint8_t *src = tile_codes + (p * CPU_TILE_ROWS + r) * CPU_PAIR_CODE_BYTES;
            const uint8_t *src_scales = tile_scales + (p * CPU_TILE_ROWS + r) * CPU_PAIR_SCALE_BYTES;
            for (int half = 0; half < 2; half++) {
                const int64_t block = 2 * p + half;
                if (block >= blocks) break;
                /* value j of the block sits in nibble `half` of src[j] */
                for (int j = 0; row != NULL && j < 16; j += 2) {
                    const uint8_t lo = (uint8_t)((src[j] >> (4 * half)) & 0xf);
                    const uint8_t hi = (uint8_t)((src[j + 1] >> (4 * half)) & 0xf);
                    row[(block * 16 + j) / 2] = (uint8_t)(lo | (hi << 4));
                }
                if (row_scales != NULL) row_scales[block] = src_scales[half];
            }
        }
    }
}
