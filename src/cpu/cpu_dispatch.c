/* Run-time choice of the kernel set: CPUID decides (never the build machine), and
 * FP4MOE_CPU_ISA may lower the level (tests run every level the CPU supports). */
#include <stdlib.h>
#include <string.h>

#if defined(FP4MOE_X86)
#include <cpuid.h>
#endif

#include "cpu_backend.h"
#include "cpu_kernels.h"

cpu_isa cpu_isa_detect(void)
{
#if defined(FP4MOE_X86) && (defined(__GNUC__) || defined(__clang__))
    /* libgcc's checks include the OS's XSAVE support of the wider registers. */
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return CPU_ISA_AVX512;
    /* clang 14 knows no "f16c" for __builtin_cpu_supports: read CPUID leaf 1 (ECX bit 29). */
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    int f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & (1u << 29)) != 0;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c)
        return CPU_ISA_AVX2;
#endif
    return CPU_ISA_GENERIC;
}

cpu_isa cpu_isa_selected(void)
{
    cpu_isa isa = cpu_isa_detect();
    const char *env = getenv("FP4MOE_CPU_ISA");
    if (env == NULL) return isa;
    cpu_isa wanted = isa;
    if (strcmp(env, "generic") == 0)
        wanted = CPU_ISA_GENERIC;
    else if (strcmp(env, "avx2") == 0)
        wanted = CPU_ISA_AVX2;
    else if (strcmp(env, "avx512") == 0)
        wanted = CPU_ISA_AVX512;
    return wanted < isa ? wanted : isa;
}

const cpu_kernels *cpu_kernels_for(cpu_isa isa)
{
#if defined(FP4MOE_X86)
    if (isa == CPU_ISA_AVX512) return &cpu_kernels_avx512;
    if (isa == CPU_ISA_AVX2) return &cpu_kernels_avx2;
#else
    (void)isa;
#endif
    return &cpu_kernels_generic;
}

const char *cpu_kernel_isa(void)
{
    return cpu_kernels_for(cpu_isa_selected())->isa;
}
