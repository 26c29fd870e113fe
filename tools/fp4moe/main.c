/* fp4moe: run, benchmark and inspect NVFP4 MoE layers. */
#include <stdio.h>
#include <string.h>

#include "commands.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: fp4moe <command> [options]\n"
            "commands:\n"
            "  demo     run the Qwen3-30B-A3B MoE layer on random NVFP4 weights, check and time it\n"
            "  run      run one layer on tensors from a safetensors file (--config --tensors --out)\n"
            "  bench    time model presets over a token sweep (table or --json)\n"
            "  info     list the MoE layers, formats and problems of a checkpoint\n"
            "  quantize quantise a checkpoint's float experts to NVFP4 (ModelOpt layout)\n"
            "  version  print the library version\n"
            "'fp4moe <command> --help' describes a command's options.\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "demo") == 0) return cmd_demo(argc - 1, argv + 1);
    if (strcmp(cmd, "run") == 0) return cmd_run(argc - 1, argv + 1);
    if (strcmp(cmd, "bench") == 0) return cmd_bench(argc - 1, argv + 1);
    if (strcmp(cmd, "info") == 0) return cmd_info(argc - 1, argv + 1);
    if (strcmp(cmd, "quantize") == 0) return cmd_quantize(argc - 1, argv + 1);
    if (strcmp(cmd, "version") == 0) {
        int v = fp4moe_version();
        printf("fp4moe %d.%d.%d\n", v / 10000, v / 100 % 100, v % 100);
        return 0;
    }
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0) {
        usage(stdout);
        return 0;
    }
    fprintf(stderr, "fp4moe: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
}
