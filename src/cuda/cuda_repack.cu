// Plan-time repacking of one expert matrix into the tile layout the expert kernels read (see
// cuda_internal.cuh): per (16-row tile, 64-value K group), lane L = 4g + q of a warp gets 16
// bytes, one 32-bit word per k step s, holding the 8 values of its four A-fragment registers
// of mma.m16n8k16: R0 = (row g, k 2q..2q+1), R1 = (row g+8, same k), R2 = (row g, k 2q+8..2q+9),
// R3 = (row g+8, same k). The bits of Ri's even-k (odd-k) value sit where decode_pair's shifts
// move its magnitude to bits 9-11 (25-27) and its sign to bit 15 (31). Lanes 0-7 also write
// the 4 k steps' E4M3 scales of rows g and g+8 (8 bytes). Padding (k >= K) is zero.
#include "cuda_internal.cuh"

// The source row of tile row r: gated FC1 tiles are 8 gate rows then the 8 up rows of the same
// channels.
static __device__ __forceinline__ int64_t source_row(int64_t tile, int r, int gated_fc1,
                                                     int gate_first, int64_t inter)
{
    if (!gated_fc1) return tile * CUDA_TILE_ROWS + r;
    const int64_t ch = tile * 8 + (r & 7);
    const bool gate = r < 8;
    return gate == (gate_first != 0) ? ch : ch + inter;
}

__global__ void repack_kernel(const uint8_t *codes, const uint8_t *scales, int64_t rows, int64_t k,
                              int64_t kp, int gated_fc1, int gate_first, int64_t inter,
                              uint4 *tile_codes, uint2 *tile_scales)
{
    const int64_t groups = kp / CUDA_KGROUP, tiles = rows / CUDA_TILE_ROWS;
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= tiles * groups * 32) return;
    const int lane = (int)(idx % 32);
    const int64_t kg = (idx / 32) % groups, tile = idx / (32 * groups);
    const int g = lane / 4, q = lane % 4;
    const int64_t row_g = source_row(tile, g, gated_fc1, gate_first, inter);
    const int64_t row_g8 = source_row(tile, g + 8, gated_fc1, gate_first, inter);
    uint32_t words[4];
    for (int s = 0; s < 4; s++) {
        const int64_t base = kg * CUDA_KGROUP + s * 16 + 2 * q;
        const int64_t reg_row[4] = {row_g, row_g8, row_g, row_g8};
        const int64_t reg_k[4] = {base, base, base + 8, base + 8};
        const int shift_mag[4] = CUDA_DECODE_SHIFT_MAG, shift_sign[4] = CUDA_DECODE_SHIFT_SIGN;
        uint32_t w = 0;
        for (int i = 0; i < 4; i++) {
            for (int odd = 0; odd < 2; odd++) {
                const int64_t col = reg_k[i] + odd;
                uint32_t nib = 0;
                if (col < k) nib = (codes[reg_row[i] * (k / 2) + col / 2] >> (4 * (col & 1))) & 0xfu;
                const int base = 16 * odd;
                for (int j = 0; j < 3; j++) // magnitude bit j ends at FP16 bit 9 + j
                    w |= ((nib >> j) & 1u) << (base + 9 + j - shift_mag[i]);
                w |= (nib >> 3) << (base + 15 - shift_sign[i]);
            }
        }
        words[s] = w;
    }
    tile_codes[(tile * groups + kg) * 32 + lane] = make_uint4(words[0], words[1], words[2], words[3]);
    if (lane < 8) {
        // scale entry r (read by the lanes of group g = r): tile rows r and r + 8
        const int64_t row_r = source_row(tile, lane, gated_fc1, gate_first, inter);
        const int64_t row_r8 = source_row(tile, lane + 8, gated_fc1, gate_first, inter);
        uint32_t lo = 0, hi = 0;
        for (int s = 0; s < 4; s++) {
            const int64_t ks = kg * 4 + s;
            if (ks < k / 16) {
                lo |= (uint32_t)scales[row_r * (k / 16) + ks] << (8 * s);
                hi |= (uint32_t)scales[row_r8 * (k / 16) + ks] << (8 * s);
            }
        }
        tile_scales[(tile * groups + kg) * 8 + lane] = make_uint2(lo, hi);
    }
}

extern "C" cudaError_t cuda_launch_repack(const uint8_t *codes, const uint8_t *scales, int64_t rows,
                                          int64_t k, int64_t kp, int gated_fc1, int gate_first,
                                          int64_t inter, uint8_t *tile_codes, uint8_t *tile_scales)
{
    const int64_t threads = rows / CUDA_TILE_ROWS * (kp / CUDA_KGROUP) * 32;
    repack_kernel<<<(unsigned)((threads + 255) / 256), 256>>>(codes, scales, rows, k, kp, gated_fc1,
                                                              gate_first, inter, (uint4 *)tile_codes,
                                                              (uint2 *)tile_scales);
    return cudaGetLastError();
}
