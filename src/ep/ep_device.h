/* The row movement of expert parallelism on the GPU (src/cuda/cuda_ep.cu; stubs without CUDA):
 * the device path of ep_forward.c for W4A16 dispatch over a device transport, and the numbers
 * that make the host's W4A4 codec match the GPU quantiser. Each returns 0 or
 * a CUDA error code (ep_device_error_string names it). Row sizes are multiples of 4 bytes. */
#ifndef FP4MOE_EP_DEVICE_H
#define FP4MOE_EP_DEVICE_H

#include <stddef.h>
#include <stdint.h>

/* Record row_index[s] of send (records of 4 + row_bytes bytes) <- [ids[s]][hidden row s / k]
 * for s in [0, slots). */
int ep_device_pack(const void *hidden, size_t row_bytes, const int32_t *ids,
                   const int64_t *row_index, int64_t slots, int64_t k, void *send, void *stream);
/* rows_hidden[r], rows_ids[r] <- record r of recv (records of rec_bytes). */
int ep_device_unpack(const void *recv, int64_t rows, size_t rec_bytes, size_t row_bytes,
                     void *rows_hidden, int32_t *rows_ids, void *stream);
/* out <- the combine of results rows result_row[t*k + j] with weights (FP32) in slot order,
 * times token_scale[t] when given; or the per-slot rows when skip_finalize. */
int ep_device_combine(const float *results, const int64_t *result_row, const float *weights,
                      int64_t t, int64_t k, int64_t h, const float *token_scale,
                      int skip_finalize, void *out, int out_dtype, void *stream);
/* count floats at p <- NaN (the rows of a failed expert call, so peers cannot take them). */
int ep_device_fill_nan(float *p, int64_t count, void *stream);
/* The CUDA backend's W4A4 quantiser reciprocals (rcp.approx, as nvfp4_fake_quantize16 forms
 * them), computed on the current device: *rcp6 <- 1/6, out_scale[e * 256 + c] <- the value
 * multiplier of expert e (global scale g[e]) for E4M3 scale code c, 0 where c is zero.
 * Synchronous (plan-creation time). */
int ep_device_w4a4_reciprocals(const float *g, int64_t experts, float *rcp6, float *out_scale);
const char *ep_device_error_string(int code);

#endif
