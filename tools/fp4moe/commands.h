/* The fp4moe subcommands, one file each, dispatched from main.c. Each returns the process exit
 * code (0 success, 1 failure, 2 usage error) and prints its own errors to stderr. */
#ifndef FP4MOE_CLI_COMMANDS_H
#define FP4MOE_CLI_COMMANDS_H

#include "fp4moe.h"

int cmd_demo(int argc, char **argv);  /* cmd_demo.c */
int cmd_run(int argc, char **argv);   /* cmd_run.c */
int cmd_bench(int argc, char **argv); /* cmd_bench.c */
int cmd_info(int argc, char **argv);     /* cmd_info.c */
int cmd_quantize(int argc, char **argv); /* cmd_quantize.c */

/* Shared helpers (cli_common.c). */
/* "auto" | "cpu" | "cuda" -> backend; returns 0 on success. */
int cli_parse_backend(const char *name, fp4moe_backend *out);
/* Creates a context or prints why not (returns NULL). threads 0 = all cores. */
fp4moe_context *cli_create_context(fp4moe_backend backend, int threads);
/* Allocates size bytes aligned to 256 (free with free()); NULL on failure or size 0 -> 256. */
void *cli_aligned_alloc(size_t size);
/* Monotonic clock in seconds. */
double cli_now_seconds(void);
/* Parses a positive integer option value; returns 0 on success. */
int cli_parse_int(const char *text, long long min, long long max, long long *out);

#endif
