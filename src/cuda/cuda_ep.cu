// Expert parallelism's row movement on the GPU (src/ep/ep_forward.c, device path): packing the
// dispatched rows into the transport's send buffer, unpacking the received ones for the expert
// plan, and the combine (the weighted k-sum in slot order, exactly the host combine and
// cpu_experts.c's finalize_token: FP32 w0*y0, then sum + wj*yj, then p*sum, one rounding).
#include "cuda_internal.cuh"

extern "C" {
#include "../ep/ep_device.h"
}

// One block per (token, slot): record = [int32 expert id][the token's hidden row].
__global__ void ep_pack_kernel(const uint32_t *hidden, int64_t row_words, const int32_t *ids,
                               const int64_t *row_index, int64_t k, uint32_t *send)
{
    const int64_t s = blockIdx.x;
    uint32_t *rec = send + row_index[s] * (1 + row_words);
    if (threadIdx.x == 0) rec[0] = (uint32_t)ids[s];
    const uint32_t *row = hidden + (s / k) * row_words;
    for (int64_t i = threadIdx.x; i < row_words; i += blockDim.x) rec[1 + i] = row[i];
}

// One block per received row: the expert id and the hidden row, apart.
__global__ void ep_unpack_kernel(const uint8_t *recv, int64_t rec_bytes, int64_t row_words,
                                 uint32_t *rows, int32_t *ids)
{
    const int64_t r = blockIdx.x;
    const uint32_t *rec = reinterpret_cast<const uint32_t *>(recv + r * rec_bytes);
    if (threadIdx.x == 0) ids[r] = (int32_t)rec[0];
    for (int64_t i = threadIdx.x; i < row_words; i += blockDim.x) rows[r * row_words + i] = rec[1 + i];
}

// One thread per (token, column); grid.y over column blocks.
__global__ void ep_combine_kernel(const float *results, const int64_t *result_row,
                                  const float *weights, int64_t k, int64_t h,
                                  const float *token_scale, int skip_finalize, void *out,
                                  int out_dtype)
{
    const int64_t t = blockIdx.x, col = (int64_t)blockIdx.y * blockDim.x + threadIdx.x;
    if (col >= h) return;
    float sum = 0.0f;
    for (int64_t j = 0; j < k; j++) {
        const int64_t s = t * k + j;
        const float y = results[result_row[s] * h + col];
        if (skip_finalize) {
            store_from_f32(out, out_dtype, s * h + col, y);
            continue;
        }
        const float term = __fmul_rn(weights[s], y);
        sum = j == 0 ? term : __fadd_rn(sum, term);
    }
    if (skip_finalize) return;
    if (token_scale) sum = __fmul_rn(token_scale[t], sum);
    store_from_f32(out, out_dtype, t * h + col, sum);
}

extern "C" int ep_device_pack(const void *hidden, size_t row_bytes, const int32_t *ids,
                              const int64_t *row_index, int64_t slots, int64_t k, void *send,
                              void *stream)
{
    if (slots == 0) return 0;
    ep_pack_kernel<<<(unsigned)slots, 256, 0, (cudaStream_t)stream>>>(
        (const uint32_t *)hidden, (int64_t)(row_bytes / 4), ids, row_index, k, (uint32_t *)send);
    return (int)cudaGetLastError();
}

extern "C" int ep_device_unpack(const void *recv, int64_t rows, size_t rec_bytes, size_t row_bytes,
                                void *rows_hidden, int32_t *rows_ids, void *stream)
{
    if (rows == 0) return 0;
    ep_unpack_kernel<<<(unsigned)rows, 256, 0, (cudaStream_t)stream>>>(
        (const uint8_t *)recv, (int64_t)rec_bytes, (int64_t)(row_bytes / 4), (uint32_t *)rows_hidden,
        rows_ids);
    return (int)cudaGetLastError();
}

extern "C" int ep_device_combine(const float *results, const int64_t *result_row,
                                 const float *weights, int64_t t, int64_t k, int64_t h,
                                 const float *token_scale, int skip_finalize, void *out,
                                 int out_dtype, void *stream)
{
    if (t == 0) return 0;
    const dim3 grid((unsigned)t, (unsigned)((h + 255) / 256));
    ep_combine_kernel<<<grid, 256, 0, (cudaStream_t)stream>>>(results, result_row, weights, k, h,
                                                              token_scale, skip_finalize, out,
                                                              out_dtype);
    return (int)cudaGetLastError();
}

__global__ void ep_fill_nan_kernel(float *p, int64_t count)
{
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) p[i] = __int_as_float(0x7fc00000);
}

extern "C" int ep_device_fill_nan(float *p, int64_t count, void *stream)
{
    if (count == 0) return 0;
    ep_fill_nan_kernel<<<(unsigned)((count + 255) / 256), 256, 0, (cudaStream_t)stream>>>(p, count);
    return (int)cudaGetLastError();
}

// Thread (e, c) of experts x 256: the multiplier of nvfp4_fake_quantize16 for scale code c.
__global__ void ep_w4a4_reciprocals_kernel(const float *g, int64_t experts, float *rcp6, float *out_scale)
{
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i == 0) *rcp6 = rcp_approx_ftz(6.0f);
    if (i >= experts * 256) return;
    const float s = e4m3_value((uint32_t)(i % 256));
    out_scale[i] = s != 0.0f ? rcp_approx_ftz(__fmul_rn(s, rcp_approx_ftz(g[i / 256]))) : 0.0f;
}

extern "C" int ep_device_w4a4_reciprocals(const float *g, int64_t experts, float *rcp6, float *out_scale)
{
    const size_t table_bytes = (size_t)experts * 256 * sizeof(float);
    float *d_g = NULL, *d_out = NULL;
    cudaError_t err = cudaMalloc(&d_g, (size_t)experts * sizeof(float));
    if (err == cudaSuccess) err = cudaMalloc(&d_out, table_bytes + sizeof(float));
    if (err == cudaSuccess) err = cudaMemcpy(d_g, g, (size_t)experts * sizeof(float), cudaMemcpyHostToDevice);
    if (err == cudaSuccess) {
        ep_w4a4_reciprocals_kernel<<<(unsigned)((experts * 256 + 255) / 256), 256>>>(d_g, experts, d_out + experts * 256,
                                                                                   d_out);
        err = cudaGetLastError();
    }
    if (err == cudaSuccess) err = cudaMemcpy(out_scale, d_out, table_bytes, cudaMemcpyDeviceToHost);
    if (err == cudaSuccess) err = cudaMemcpy(rcp6, d_out + experts * 256, sizeof(float), cudaMemcpyDeviceToHost);
    cudaFree(d_g);
    cudaFree(d_out);
    return (int)err;
}

extern "C" const char *ep_device_error_string(int code)
{
    return cudaGetErrorString((cudaError_t)code);
}
