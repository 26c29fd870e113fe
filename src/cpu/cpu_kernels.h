/* The CPU backend's weight layout and its dot-product kernels (one set per instruction set).
 *
 * Layout ("pair tiles"). A [rows, cols] NVFP4 matrix is cut into tiles of CPU_TILE_ROWS rows
 * and, along K, into pairs of 16-value blocks (32 values). For tile i, pair p and row r of the
 * tile, 16 bytes hold the two blocks side by side: byte j = code(32p + j) | code(32p + 16 + j)
 * << 4. So one zero-extension of 16 bytes to 16 lanes gives block A in the low nibbles and block B
 * in the high nibbles, each already in natural order: a 16-entry table lookup (vpermps) decodes a
 * block with no shuffling of the activations. The two E4M3 scale codes of (i, p, r) sit in a
 * separate stream. Both streams are read sequentially, a tile after the other, so a range of
 * rows is one contiguous run of memory for the prefetchers. Rows past `rows` and blocks past
 * cols/16 are zero codes with zero scales (they contribute exact zeros against the zero padding
 * of the activations).
 */
#ifndef FP4MOE_CPU_KERNELS_H
#define FP4MOE_CPU_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#define CPU_TILE_ROWS 4
#define CPU_PAIR_VALUES 32
#define CPU_PAIR_CODE_BYTES 16 /* per row */
#define CPU_PAIR_SCALE_BYTES 2 /* per row */
/* Software prefetch distance of the SIMD kernels, in bytes of the code stream (the scale
 * stream is 8 times thinner). The hardware prefetchers alone left T = 16 at 60% of the bus
 * rate; 2 KB ahead (32 pair steps) brought it to ~90% on Zen 5 (1 KB: 80%, 4 KB: same). Reads
 * past the matrix are harmless: prefetches never fault. */
#define CPU_PREFETCH_CODE_BYTES 2048
#define CPU_PREFETCH_SCALE_BYTES (CPU_PREFETCH_CODE_BYTES / 8)
/* Largest token count any kernel takes in one call. */
#define CPU_MAX_TILE_TOKENS 24

typedef struct cpu_packed_matrix {
    uint8_t *codes;  /* [row_tiles][pairs][CPU_TILE_ROWS][16] */
    uint8_t *scales; /* [row_tiles][pairs][CPU_TILE_ROWS][2] E4M3 codes */
    int64_t rows;
    int64_t cols;
    int64_t pairs;     /* ceil(cols / 32) */
    int64_t row_tiles; /* ceil(rows / CPU_TILE_ROWS) */
} cpu_packed_matrix;

/* Activation rows the kernels read have pairs * 32 floats, zero past cols. */
static inline int64_t cpu_padded_cols(int64_t cols)
{
    return (cols + CPU_PAIR_VALUES - 1) / CPU_PAIR_VALUES * CPU_PAIR_VALUES;
}

static inline const uint8_t *cpu_tile_codes(const cpu_packed_matrix *m, int64_t tile)
{
    return m->codes + tile * m->pairs * CPU_TILE_ROWS * CPU_PAIR_CODE_BYTES;
}

static inline const uint8_t *cpu_tile_scales(const cpu_packed_matrix *m, int64_t tile)
{
    return m->scales + tile * m->pairs * CPU_TILE_ROWS * CPU_PAIR_SCALE_BYTES;
}

/* Raw dot products of one row tile with ntok activation rows (1 <= ntok <= the kernel set's
 * max_tokens): out[t * CPU_TILE_ROWS + r] = sum_k x[t][k] * e2m1(code[r][k]) *
 * e4m3(scale[r][k/16]), FP32 sums. x rows are x + t * x_stride, pairs * 32 floats each.
 * scale_lut[c] = e4m3(c). */
typedef void (*cpu_dot_tile_fn)(const uint8_t *codes, const uint8_t *scales, int64_t pairs,
                                const float *x, int64_t x_stride, int ntok, const float *scale_lut,
                                float *out);

typedef struct cpu_kernels {
    const char *isa; /* "generic", "avx2", "avx512" */
    int max_tokens;  /* <= CPU_MAX_TILE_TOKENS */
    cpu_dot_tile_fn dot_tile;
} cpu_kernels;

/* Repacking (cpu_repack.c). The canonical matrix: packed [rows, cols/2], linear scales
 * [rows, cols/16]. m->codes and m->scales must be allocated with the sizes below. */
size_t cpu_packed_code_bytes(int64_t rows, int64_t cols);
size_t cpu_packed_scale_bytes(int64_t rows, int64_t cols);
void cpu_packed_init(cpu_packed_matrix *m, int64_t rows, int64_t cols, uint8_t *codes,
                     uint8_t *scales);
void cpu_repack_matrix(const uint8_t *packed, const uint8_t *scales, cpu_packed_matrix *m);
/* The inverse: the canonical codes [rows][cols/2] and linear scales [rows][cols/16] of m
 * (either output may be NULL). */
void cpu_unpack_matrix(const cpu_packed_matrix *m, uint8_t *packed, uint8_t *scales);

/* The kernel sets. Those of wider instruction sets exist only on x86 builds; call them only
 * when cpu_isa_supported() says the CPU runs them. */
extern const cpu_kernels cpu_kernels_generic;
#if defined(FP4MOE_X86)
extern const cpu_kernels cpu_kernels_avx2;
extern const cpu_kernels cpu_kernels_avx512;
#endif

/* Instruction-set levels, ordered. */
typedef enum cpu_isa { CPU_ISA_GENERIC = 0, CPU_ISA_AVX2 = 1, CPU_ISA_AVX512 = 2 } cpu_isa;

/* The widest level this CPU (and OS) runs, from CPUID at run time. */
cpu_isa cpu_isa_detect(void);
/* cpu_isa_detect() lowered by FP4MOE_CPU_ISA=generic|avx2|avx512 when set (never raised). */
cpu_isa cpu_isa_selected(void);
/* The kernels of a level (the level must be supported). */
const cpu_kernels *cpu_kernels_for(cpu_isa isa);

#endif
