/* The CPU backend's entry: routing per token, then the experts with decoded-once NVFP4 blocks,
 * threads across cores (OpenMP), SIMD kernels chosen at run time from CPUID. */
#ifndef FP4MOE_CPU_BACKEND_H
#define FP4MOE_CPU_BACKEND_H

#include "../core/plan.h"

extern const backend_ops cpu_backend_ops;

/* "avx512", "avx2", or "generic": the widest kernel set this CPU runs. */
const char *cpu_kernel_isa(void);

#endif
