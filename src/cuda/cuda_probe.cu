// Device discovery and device memory for the CUDA backend (the operations are in
// cuda_backend.cu).
#include <cuda_runtime.h>
#include <stdio.h>

#include "cuda_backend.h"

extern "C" int cuda_backend_available(int device)
{
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || device < 0 || device >= count) {
        (void)cudaGetLastError();
        return 0;
    }
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return major >= 8; // the kernels use sm_80+ features (cvt from E4M3 on sm_89+ in hardware)
}

extern "C" void cuda_backend_describe(int device, char *out, size_t out_bytes)
{
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
        (void)cudaGetLastError();
        snprintf(out, out_bytes, "cuda (device %d unavailable)", device);
        return;
    }
    snprintf(out, out_bytes, "cuda (%s, sm_%d%d)", prop.name, prop.major, prop.minor);
}


static int report(cudaError_t err, const char *what, char *why, size_t why_bytes)
{
    if (err == cudaSuccess) return 0;
    snprintf(why, why_bytes, "%s: %s", what, cudaGetErrorString(err));
    return 1;
}

extern "C" int cuda_buffer_alloc(int device, size_t bytes, void **out, char *why, size_t why_bytes)
{
    if (report(cudaSetDevice(device), "cudaSetDevice", why, why_bytes)) return 1;
    return report(cudaMalloc(out, bytes ? bytes : 1), "cudaMalloc", why, why_bytes);
}

extern "C" void cuda_buffer_free(int device, void *buffer)
{
    if (buffer == NULL || cudaSetDevice(device) != cudaSuccess) return;
    (void)cudaFree(buffer);
}

extern "C" int cuda_buffer_copy(int device, void *dst, const void *src, size_t bytes,
                                int to_device, char *why, size_t why_bytes)
{
    if (report(cudaSetDevice(device), "cudaSetDevice", why, why_bytes)) return 1;
    return report(cudaMemcpy(dst, src, bytes, to_device ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost),
                  "cudaMemcpy", why, why_bytes);
}

extern "C" int cuda_stream_synchronize(int device, void *stream, char *why, size_t why_bytes)
{
    if (report(cudaSetDevice(device), "cudaSetDevice", why, why_bytes)) return 1;
    return report(cudaStreamSynchronize((cudaStream_t)stream), "cudaStreamSynchronize", why, why_bytes);
}
