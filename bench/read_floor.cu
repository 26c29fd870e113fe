// What the GPU gives for reading N bytes once, timed much as `fp4moe bench` times a layer
// (one-kernel CUDA graphs replayed back to back, an event pair around each, the median; here
// queued behind a ~10 ms spin kernel so the host's launch pace never shows; 8 buffers rotated,
// so L2 holds none of them from 14 MB up): the practical floor of a decode GEMV that streams N
// bytes of weights, against the copy-rate floor the decode table uses (docs/PERF.md, decode).
// Patterns: a block of 128 threads per 18 KB chunk (a decode FC1 tile: 16 rows of 2048 NVFP4
// values with scales), every load in flight at once; the same with 64 KB chunks; a grid of 8
// blocks of 256 threads per SM walking the buffer with 8 loads in flight per thread; and the
// decode GEMV's shared-memory ring without its arithmetic (ring_read).
// Usage: read_floor [--sizes-mb 7,14,21,34,75,140,214] [--repeat 200 (at most 1000)]
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SETS 8

#define CHECK(call)                                                                           \
    do {                                                                                      \
        cudaError_t err_ = (call);                                                            \
        if (err_ != cudaSuccess) {                                                            \
            fprintf(stderr, "read_floor: %s: %s\n", #call, cudaGetErrorString(err_));        \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

static __device__ __forceinline__ uint4 load_nc(const uint4 *p)
{
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// One block per chunk of CHUNK bytes, all of a thread's loads issued before any is used.
template <int CHUNK>
__global__ void __launch_bounds__(128) chunk_read(const uint4 *buf, size_t units, unsigned *sink)
{
    constexpr int PER = CHUNK / 16 / 128;
    const size_t base = (size_t)blockIdx.x * (CHUNK / 16);
    uint4 v[PER];
#pragma unroll
    for (int i = 0; i < PER; i++) {
        const size_t u = base + (size_t)i * 128 + threadIdx.x;
        v[i] = u < units ? load_nc(buf + u) : make_uint4(0, 0, 0, 0);
    }
    unsigned x = 0;
#pragma unroll
    for (int i = 0; i < PER; i++) x ^= v[i].x ^ v[i].y ^ v[i].z ^ v[i].w;
    if (x == 0x12345678u) sink[blockIdx.x] = x; // keeps the loads; (almost) never stores
}

// A grid-stride walk, 8 loads in flight per thread.
__global__ void __launch_bounds__(256) stride_read(const uint4 *buf, size_t units, unsigned *sink)
{
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    unsigned x = 0;
    for (size_t u0 = (size_t)blockIdx.x * blockDim.x + threadIdx.x; u0 < units; u0 += 8 * stride) {
        uint4 v[8];
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = u0 + i * stride < units ? load_nc(buf + u0 + i * stride) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int i = 0; i < 8; i++) x ^= v[i].x ^ v[i].y ^ v[i].z ^ v[i].w;
    }
    if (x == 0x12345678u) sink[blockIdx.x] = x;
}

// Holds the stream ~`cycles` clocks, so the host queues every timed replay before the GPU reaches it.
__global__ void spin_kernel(long long cycles)
{
    const long long t0 = clock64();
    while (clock64() - t0 < cycles) {
    }
}

// The decode GEMV's memory pattern without its arithmetic: a warp per tile of G K groups, each
// group 512 code bytes (codes region) and 64 scale bytes (scales region, or right after the
// codes when INTERLEAVED: 576 contiguous bytes), through a ring of D shared-memory stages filled
// by cp.async (each lane 16 code bytes, lanes 0-3 the scales), D - 1 groups in flight.
template <int D, int G, int INTERLEAVED>
__global__ void __launch_bounds__(128) ring_read(const uint8_t *buf, size_t tiles, unsigned *sink)
{
    __shared__ uint4 ring[4][D * 36];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const size_t tile = (size_t)blockIdx.x * 4 + warp;
    if (tile >= tiles) return;
    const uint8_t *codes = INTERLEAVED ? buf + tile * G * 576 : buf + tile * G * 512;
    const uint8_t *scales = INTERLEAVED ? codes + 512 : buf + tiles * G * 512 + tile * G * 64;
    const size_t step_c = INTERLEAVED ? 576 : 512, step_s = INTERLEAVED ? 576 : 64;
    const uint32_t base = (uint32_t)__cvta_generic_to_shared(ring[warp]);
    int next = 0;
    auto request = [&](int stage) {
        if (next < G) {
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(base + stage * 576 + lane * 16),
                         "l"(codes + next * step_c + lane * 16) : "memory");
            if (lane < 4)
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(base + stage * 576 + 512 + lane * 16),
                             "l"(scales + next * step_s + lane * 16) : "memory");
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
        next++;
    };
    for (int d = 0; d + 1 < D; d++) request(d);
    unsigned x = 0;
    int stage = 0;
    for (int kg = 0; kg < G; kg++) {
        asm volatile("cp.async.wait_group %0;" ::"n"(D - 2) : "memory");
        __syncwarp();
        request(stage == 0 ? D - 1 : stage - 1);
        const uint4 w = ring[warp][stage * 36 + lane];
        const uint2 sc = reinterpret_cast<const uint2 *>(ring[warp] + stage * 36 + 32)[lane / 4];
        x ^= w.x ^ w.y ^ w.z ^ w.w ^ sc.x ^ sc.y;
        stage = stage + 1 == D ? 0 : stage + 1;
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    if (x == 0x12345678u) sink[blockIdx.x] = x;
}


__global__ void empty_kernel(unsigned *sink)
{
    if (threadIdx.x == 1024) sink[0] = 0;
}

static int compare_float(const void *a, const void *b)
{
    const float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

// pattern 0: 18 KB chunks, 1: 64 KB chunks, 2: grid-stride, 3: empty kernel; 4-7: the GEMV's
// ring (warp per 32-group tile) with 4 stages, 8 stages, 4 stages interleaved, 8 interleaved
#define PATTERNS 8
static void launch(int pattern, const uint4 *buf, size_t bytes, unsigned *sink, int sms, cudaStream_t s)
{
    const size_t units = bytes / 16, tiles = bytes / (32 * 576);
    const unsigned ring_blocks = (unsigned)((tiles + 3) / 4);
    const uint8_t *b = (const uint8_t *)buf;
    if (pattern == 0) chunk_read<18432><<<(unsigned)((bytes + 18431) / 18432), 128, 0, s>>>(buf, units, sink);
    else if (pattern == 1) chunk_read<65536><<<(unsigned)((bytes + 65535) / 65536), 128, 0, s>>>(buf, units, sink);
    else if (pattern == 2) stride_read<<<sms * 8, 256, 0, s>>>(buf, units, sink);
    else if (pattern == 4) ring_read<4, 32, 0><<<ring_blocks, 128, 0, s>>>(b, tiles, sink);
    else if (pattern == 5) ring_read<8, 32, 0><<<ring_blocks, 128, 0, s>>>(b, tiles, sink);
    else if (pattern == 6) ring_read<4, 32, 1><<<ring_blocks, 128, 0, s>>>(b, tiles, sink);
    else if (pattern == 7) ring_read<8, 32, 1><<<ring_blocks, 128, 0, s>>>(b, tiles, sink);
    else empty_kernel<<<1, 32, 0, s>>>(sink);
    CHECK(cudaGetLastError());
}

// Median microseconds of `repeat` replays of one-kernel graphs over the SETS buffers in turn.
static float median_us(int pattern, uint4 *const bufs[SETS], size_t bytes, unsigned *sink, int sms, int repeat,
                       cudaStream_t s)
{
    cudaGraphExec_t execs[SETS];
    for (int i = 0; i < SETS; i++) {
        cudaGraph_t g;
        CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
        launch(pattern, bufs[i], bytes, sink, sms, s);
        CHECK(cudaStreamEndCapture(s, &g));
        CHECK(cudaGraphInstantiate(&execs[i], g, 0));
        CHECK(cudaGraphDestroy(g));
    }
    cudaEvent_t *ev = (cudaEvent_t *)malloc(sizeof(cudaEvent_t) * 2 * repeat);
    float *ms = (float *)malloc(sizeof(float) * repeat);
    if (!ev || !ms) exit(1);
    for (int i = 0; i < 2 * repeat; i++) CHECK(cudaEventCreate(&ev[i]));
    for (int r = 0; r < 3 * SETS; r++) CHECK(cudaGraphLaunch(execs[r % SETS], s));
    spin_kernel<<<1, 1, 0, s>>>(20000000LL); // ~10 ms
    CHECK(cudaGetLastError());
    for (int r = 0; r < repeat; r++) {
        CHECK(cudaEventRecord(ev[2 * r], s));
        CHECK(cudaGraphLaunch(execs[r % SETS], s));
        CHECK(cudaEventRecord(ev[2 * r + 1], s));
    }
    CHECK(cudaStreamSynchronize(s));
    for (int r = 0; r < repeat; r++) CHECK(cudaEventElapsedTime(&ms[r], ev[2 * r], ev[2 * r + 1]));
    qsort(ms, (size_t)repeat, sizeof(float), compare_float);
    const float med = ms[repeat / 2] * 1e3f;
    for (int i = 0; i < 2 * repeat; i++) CHECK(cudaEventDestroy(ev[i]));
    for (int i = 0; i < SETS; i++) CHECK(cudaGraphExecDestroy(execs[i]));
    free(ev);
    free(ms);
    return med;
}

static int usage(const char *why)
{
    fprintf(stderr, "read_floor: %s\nusage: read_floor [--sizes-mb 7,14,21,34,75,140,214] [--repeat 200]\n", why);
    return 2;
}

int main(int argc, char **argv)
{
    char sizes[256] = "7,14,21,34,75,140,214";
    int repeat = 200;
    for (int i = 1; i < argc; i += 2) {
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        char *end = NULL;
        if (v != NULL && strcmp(argv[i], "--sizes-mb") == 0) {
            snprintf(sizes, sizeof sizes, "%s", v);
        } else if (v != NULL && strcmp(argv[i], "--repeat") == 0) {
            const long r = strtol(v, &end, 10);
            if (*end != '\0' || r < 1 || r > 1000) return usage("--repeat takes 1 to 1000");
            repeat = (int)r;
        } else {
            return usage(argv[i]);
        }
    }
    // (each size: at least one 18 KB chunk, at most 4 GB; rounded down to whole chunks)
    size_t most = 0;
    {
        char tmp[256];
        snprintf(tmp, sizeof tmp, "%s", sizes);
        for (char *t = strtok(tmp, ","); t; t = strtok(NULL, ",")) {
            char *end = NULL;
            const double mb = strtod(t, &end);
            if (*end != '\0' || !(mb >= 0.0185 && mb <= 4000.0)) return usage("--sizes-mb takes 0.0185 to 4000 each");
            const size_t b = (size_t)(mb * 1e6) / 18432 * 18432;
            if (b > most) most = b;
        }
    }
    int sms = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    uint4 *bufs[SETS];
    unsigned *sink;
    for (int i = 0; i < SETS; i++) {
        CHECK(cudaMalloc((void **)&bufs[i], most + 65536));
        CHECK(cudaMemset(bufs[i], i + 1, most + 65536));
    }
    CHECK(cudaMalloc((void **)&sink, 1 << 20));
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    const float empty = median_us(3, bufs, 0, sink, sms, repeat, s);
    printf("one-kernel graph, empty kernel: %.2f us (median of %d replays)\n", empty, repeat);
    const char *names[PATTERNS] = {"18KB-blk", "64KB-blk", "stride", "", "ring4", "ring8", "ring4-il", "ring8-il"};
    printf("%8s", "MB");
    for (int p = 0; p < PATTERNS; p++)
        if (p != 3) printf(" %9s us %6s", names[p], "GB/s");
    printf("\n");
    for (char *t = strtok(sizes, ","); t; t = strtok(NULL, ",")) {
        const size_t bytes = (size_t)(atof(t) * 1e6) / 18432 * 18432;
        printf("%8.1f", bytes / 1e6);
        for (int p = 0; p < PATTERNS; p++) {
            if (p == 3) continue;
            const float us = median_us(p, bufs, bytes, sink, sms, repeat, s);
            printf(" %12.2f %6.0f", us, bytes / (us * 1e3));
        }
        printf("\n");
    }
    for (int i = 0; i < SETS; i++) CHECK(cudaFree(bufs[i]));
    CHECK(cudaFree(sink));
    CHECK(cudaStreamDestroy(s));
    return 0;
}
