/* Plain-C kernels: the path of non-x86 builds and the peer the SIMD kernels are tested against.
 * Sixteen partial sums per (row, token), as the 16-lane kernels keep, reduced at the end. */
#include "cpu_kernels.h"

static const float e2m1_table[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                     -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

static void dot_tile_generic(const uint8_t *codes, const uint8_t *scales, int64_t pairs,
                             const float *x, int64_t x_stride, int ntok, const float *scale_lut,
                             float *out)
{
    float lanes[CPU_MAX_TILE_TOKENS][CPU_TILE_ROWS][16] = {{{0.0f}}};
    for (int64_t p = 0; p < pairs; p++) {
        for (int r = 0; r < CPU_TILE_ROWS; r++) {
            const uint8_t *c = codes + (p * CPU_TILE_ROWS + r) * CPU_PAIR_CODE_BYTES;
            const uint8_t *s = scales + (p * CPU_TILE_ROWS + r) * CPU_PAIR_SCALE_BYTES;
            float wa[16], wb[16];
            for (int j = 0; j < 16; j++) {
                wa[j] = e2m1_table[c[j] & 0xf] * scale_lut[s[0]];
                wb[j] = e2m1_table[c[j] >> 4] * scale_lut[s[1]];
            }
            for (int t = 0; t < ntok; t++) {
                const float *xp = x + t * x_stride + p * CPU_PAIR_VALUES;
                for (int j = 0; j < 16; j++)
                    lanes[t][r][j] += wa[j] * xp[j];
                for (int j = 0; j < 16; j++)
                    lanes[t][r][j] += wb[j] * xp[16 + j];
            }
        }
    }
    for (int t = 0; t < ntok; t++)
        for (int r = 0; r < CPU_TILE_ROWS; r++) {
            float sum = 0.0f;
            for (int j = 0; j < 16; j++)
                sum += lanes[t][r][j];
            out[t * CPU_TILE_ROWS + r] = sum;
        }
}

const cpu_kernels cpu_kernels_generic = {"generic", CPU_MAX_TILE_TOKENS, dot_tile_generic};
