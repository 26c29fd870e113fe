/* Helpers shared by the subcommands: backend names, context creation, aligned buffers, time. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "commands.h"

int cli_parse_backend(const char *name, fp4moe_backend *out)
{
    if (strcmp(name, "auto") == 0) *out = FP4MOE_BACKEND_AUTO;
    else if (strcmp(name, "cpu") == 0) *out = FP4MOE_BACKEND_CPU;
    else if (strcmp(name, "cuda") == 0) *out = FP4MOE_BACKEND_CUDA;
    else {
        fprintf(stderr, "fp4moe: unknown backend '%s' (expected auto, cpu or cuda)\n", name);
        return 1;
    }
    return 0;
}

fp4moe_context *cli_create_context(fp4moe_backend backend, int threads)
{
    fp4moe_context_options options;
    fp4moe_context_options_init(&options);
    options.backend = backend;
    options.num_threads = threads;
    fp4moe_context *ctx = NULL;
    fp4moe_status status = fp4moe_context_create(&options, &ctx);
    if (status != FP4MOE_SUCCESS) {
        fprintf(stderr, "fp4moe: cannot create the %s backend: %s\n",
                backend == FP4MOE_BACKEND_CUDA ? "cuda" : backend == FP4MOE_BACKEND_CPU ? "cpu" : "auto",
                fp4moe_status_string(status));
        return NULL;
    }
    return ctx;
}

void *cli_aligned_alloc(size_t size)
{
    size_t rounded = ((size ? size : 1) + 255) / 256 * 256;
    return aligned_alloc(256, rounded);
}

double cli_now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int cli_parse_int(const char *text, long long min, long long max, long long *out)
{
    char *end = NULL;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || v < min || v > max) return 1;
    *out = v;
    return 0;
}
