/* The CPU backend's repacking and dot-product kernels: every kernel level this CPU supports
 * against the plain-C one, and the plain-C one against a float64 dot product of the canonical
 * (unpacked) weights, on random codes and scales, odd shapes and token counts. */
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu_kernels.h"
#include "format/format.h"
#include "testing.h"

/* Y[t][n] = sum_k x[t][k] * w[n][k] through a kernel set, tile by tile as the backend does. */
static void kernel_matmul(const cpu_kernels *kern, const cpu_packed_matrix *m, const float *x,
                          int64_t x_stride, int64_t ntok, const float *lut, float *y)
{
    float out[CPU_MAX_TILE_TOKENS * CPU_TILE_ROWS];
    for (int64_t tile = 0; tile < m->row_tiles; tile++) {
        for (int64_t t0 = 0; t0 < ntok; t0 += kern->max_tokens) {
            int nt = (int)(ntok - t0 < kern->max_tokens ? ntok - t0 : kern->max_tokens);
            kern->dot_tile(cpu_tile_codes(m, tile), cpu_tile_scales(m, tile), m->pairs,
                           x + t0 * x_stride, x_stride, nt, lut, out);
            for (int t = 0; t < nt; t++)
                for (int r = 0; r < CPU_TILE_ROWS; r++) {
                    int64_t n = tile * CPU_TILE_ROWS + r;
                    if (n < m->rows) y[(t0 + t) * m->rows + n] = out[t * CPU_TILE_ROWS + r];
                }
        }
    }
}

/* A random E4M3 scale code: finite, in a range where products neither overflow nor vanish. */
static uint8_t random_scale(testing_rng *rng)
{
    uint8_t c = (uint8_t)testing_int(rng, 0x08, 0x5f); /* 2^-6 .. 2^4 * 1.875 */
    if (testing_uniform(rng) < 0.02) c = 0;            /* some all-zero blocks */
    return c;
}

/* The largest error of one output of y against ref relative to its row's sum of |x_i * w_i|
 * (an FP32 dot product's rounding error scales with that, not with a result that cancels: one
 * token of 5 rows of 16 terms failed a 1e-6 bound relative to ||ref||, seed
 * 9717846002096724739); per output, so that one wrong output is not diluted by the others.
 * NaN (an unwritten output) counts as infinite. ref_f64 or ref_f32 is given. */
static double err_vs_magnitude(const float *y, const double *ref_f64, const float *ref_f32, const double *mag,
                               int64_t n)
{
    double worst = 0.0;
    for (int64_t i = 0; i < n; i++) {
        const double d = fabs((double)y[i] - (ref_f64 ? ref_f64[i] : (double)ref_f32[i]));
        const double e = isnan(d) ? INFINITY : mag[i] > 0.0 ? d / mag[i] : d > 0.0 ? INFINITY : 0.0;
        if (e > worst) worst = e;
    }
    return worst;
}

static void check_shape(testing_state *st, testing_rng *rng, int64_t rows, int64_t cols,
                        int64_t ntok, const float *lut)
{
    const int64_t stride = cpu_padded_cols(cols);
    uint8_t *packed = malloc((size_t)(rows * cols / 2));
    uint8_t *scales = malloc((size_t)(rows * cols / 16));
    uint8_t *codes_r = malloc(cpu_packed_code_bytes(rows, cols));
    uint8_t *scales_r = malloc(cpu_packed_scale_bytes(rows, cols));
    float *x = malloc((size_t)(ntok * stride) * sizeof(float));
    float *y_generic = malloc((size_t)(ntok * rows) * sizeof(float));
    float *y = malloc((size_t)(ntok * rows) * sizeof(float));
    double *y_ref = malloc((size_t)(ntok * rows) * sizeof(double));
    double *y_mag = malloc((size_t)(ntok * rows) * sizeof(double));
    float *w_row = malloc((size_t)cols * sizeof(float));
    if (!packed || !scales || !codes_r || !scales_r || !x || !y_generic || !y || !y_ref || !y_mag || !w_row) {
        CHECK(st, 0, "out of memory");
        goto done;
    }
    for (int64_t i = 0; i < rows * cols / 2; i++)
        packed[i] = (uint8_t)testing_next(rng);
    for (int64_t i = 0; i < rows * cols / 16; i++)
        scales[i] = random_scale(rng);
    for (int64_t t = 0; t < ntok; t++)
        for (int64_t i = 0; i < stride; i++)
            x[t * stride + i] = i < cols ? (float)testing_normal(rng) : 0.0f;

    cpu_packed_matrix m;
    cpu_packed_init(&m, rows, cols, codes_r, scales_r);
    cpu_repack_matrix(packed, scales, &m);

    for (int64_t n = 0; n < rows; n++) {
        nvfp4_dequantize_row(packed + n * cols / 2, scales + n * cols / 16, cols, 1.0f, w_row);
        for (int64_t t = 0; t < ntok; t++) {
            double s = 0.0, mag = 0.0;
            for (int64_t i = 0; i < cols; i++) {
                s += (double)x[t * stride + i] * w_row[i];
                mag += fabs((double)x[t * stride + i] * w_row[i]);
            }
            y_ref[t * rows + n] = s;
            y_mag[t * rows + n] = mag;
        }
    }
    kernel_matmul(&cpu_kernels_generic, &m, x, stride, ntok, lut, y_generic);
    double err = err_vs_magnitude(y_generic, y_ref, NULL, y_mag, ntok * rows);
    CHECK(st, err < 1e-6, "generic vs float64: rows %lld cols %lld tokens %lld: worst error %.3g of |terms|",
          (long long)rows, (long long)cols, (long long)ntok, err);

    for (int level = CPU_ISA_AVX2; level <= (int)cpu_isa_detect(); level++) {
        const cpu_kernels *kern = cpu_kernels_for((cpu_isa)level);
        memset(y, 0xff, (size_t)(ntok * rows) * sizeof(float)); /* NaN: unwritten shows */
        kernel_matmul(kern, &m, x, stride, ntok, lut, y);
        double e = err_vs_magnitude(y, NULL, y_generic, y_mag, ntok * rows);
        CHECK(st, e < 1e-6, "%s vs generic: rows %lld cols %lld tokens %lld: worst error %.3g of |terms|",
              kern->isa, (long long)rows, (long long)cols, (long long)ntok, e);
    }
done:
    free(packed), free(scales), free(codes_r), free(scales_r), free(x), free(y_generic), free(y),
        free(y_ref), free(y_mag), free(w_row);
}

int main(void)
{
    testing_state st = {0, 0};
    testing_rng rng = testing_rng_from_env("test_cpu_kernels");
    float lut[256];
    for (int c = 0; c < 256; c++)
        lut[c] = e4m3_to_float((uint8_t)c);

    printf("test_cpu_kernels: widest level %s, selected %s\n",
           cpu_kernels_for(cpu_isa_detect())->isa, cpu_kernels_for(cpu_isa_selected())->isa);
    CHECK(&st, cpu_isa_selected() <= cpu_isa_detect(), "selection above the CPU's level");

    /* Shapes of the presets' odd sizes, a block count that is odd (48: pairs padded), a single
     * block, and row counts that do not fill the last tile. */
    const int64_t shapes[][2] = {{2688, 1856}, {1856, 2688}, {37, 48},
                                 {5, 16},      {64, 2048},   {130, 768}};
    const int64_t tokens[] = {1, 3, 17};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (size_t t = 0; t < sizeof tokens / sizeof tokens[0]; t++)
            check_shape(&st, &rng, shapes[s][0], shapes[s][1], tokens[t], lut);
    return testing_finish(&st, "test_cpu_kernels");
}
