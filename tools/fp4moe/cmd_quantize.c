/* fp4moe quantize: BF16/FP16/FP32 expert weights of a checkpoint -> NVFP4 in ModelOpt's layout
 * and naming, with hf_quant_config.json beside, progress on stderr and the quantisation error
 * of every tensor on stdout. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "commands.h"
#include "fp4moe_checkpoint.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: fp4moe quantize IN OUT [--input-scale X] [--input-scales FILE]\n"
            "                       [--calibration FILE] [--quiet]\n"
            "Quantises every expert projection weight (<P>.experts.<j>.{gate,up,down}_proj.weight or\n"
            "w1/w2/w3) of IN (a checkpoint folder or one .safetensors file) to NVFP4 as ModelOpt\n"
            "exports it: weight U8 [out,in/2], weight_scale F8_E4M3 [out,in/16], weight_scale_2 F32\n"
            "(amax/(6*448)), input_scale F32. Other tensors are copied. A folder gives a folder (same\n"
            "shards, new index), a file a file; hf_quant_config.json (and config.json with its\n"
            "quantization_config) is written beside. Activation scales (input_scale):\n"
            "  --input-scales FILE  F32 scalars named <module>.input_scale\n"
            "  --calibration FILE   sample inputs: hidden_states [T,H] (or <P>.hidden_states per layer)\n"
            "  --input-scale X      one value for every projection\n"
            "without any of them no input_scale is written (W4A16 only). Prints each tensor's\n"
            "relative L2 and largest absolute quantisation error (--quiet: the summary only).\n");
}

typedef struct quantize_state {
    int quiet;
    int tty;
    double last_print;
    double start;
    int printed_progress;
    long long tensors;
    double sum_rel, max_rel;
    char worst_name[512];
} quantize_state;

static void on_progress(void *user, const char *tensor, uint64_t done, uint64_t total)
{
    quantize_state *s = user;
    double now = cli_now_seconds();
    /* Only long runs print, at most twice a second on a terminal, every 5 s in a log. */
    if (now - s->start < 1.0 || now - s->last_print < (s->tty ? 0.5 : 5.0)) return;
    s->last_print = now;
    s->printed_progress = 1;
    fprintf(stderr, "%squantize: %5.1f%% of %.2f GB, %s%s", s->tty ? "\r\033[K" : "",
            total ? 100.0 * (double)done / (double)total : 100.0, (double)total / 1e9, tensor,
            s->tty ? "" : "\n");
    fflush(stderr);
}

static void on_report(void *user, const fp4moe_quantize_tensor_report *r)
{
    quantize_state *s = user;
    s->tensors++;
    s->sum_rel += r->rel_l2_error;
    if (r->rel_l2_error >= s->max_rel) {
        s->max_rel = r->rel_l2_error;
        snprintf(s->worst_name, sizeof s->worst_name, "%s", r->name);
    }
    if (s->quiet) return;
    if (s->tty && s->printed_progress) fprintf(stderr, "\r\033[K");
    if (s->tensors == 1)
        printf("%-56s %12s %10s %12s %12s %10s %10s\n", "tensor", "shape", "amax", "weight_scale_2",
               "input_scale", "rel_l2", "max_abs");
    char shape[48];
    snprintf(shape, sizeof shape, "[%lld,%lld]", (long long)r->rows, (long long)r->cols);
    printf("%-56s %12s %10.4g %12.6g %12.6g %10.3e %10.3e\n", r->name, shape, r->amax,
           (double)r->weight_scale_2, (double)r->input_scale, r->rel_l2_error, r->max_abs_error);
}

int cmd_quantize(int argc, char **argv)
{
    fp4moe_quantize_options o;
    fp4moe_quantize_options_init(&o);
    quantize_state s;
    memset(&s, 0, sizeof s);
    const char *paths[2] = {NULL, NULL};
    int npaths = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        }
        if (strcmp(a, "--quiet") == 0) {
            s.quiet = 1;
            continue;
        }
        if (a[0] == '-' && a[1] == '-') {
            const char *v = i + 1 < argc ? argv[++i] : NULL;
            if (v == NULL) {
                fprintf(stderr, "fp4moe quantize: %s needs a value\n", a);
                return 2;
            }
            if (strcmp(a, "--input-scales") == 0) o.input_scales_path = v;
            else if (strcmp(a, "--calibration") == 0) o.calibration_path = v;
            else if (strcmp(a, "--input-scale") == 0) {
                char *end = NULL;
                o.input_scale = strtof(v, &end);
                if (end == v || *end != '\0' || !(o.input_scale > 0)) {
                    fprintf(stderr, "fp4moe quantize: bad value '%s' for --input-scale (a number > 0)\n", v);
                    return 2;
                }
            } else {
                fprintf(stderr, "fp4moe quantize: unknown option %s\n", a);
                usage(stderr);
                return 2;
            }
            continue;
        }
        if (npaths == 2) {
            fprintf(stderr, "fp4moe quantize: unexpected argument '%s'\n", a);
            return 2;
        }
        paths[npaths++] = a;
    }
    if (npaths != 2) {
        usage(stderr);
        return 2;
    }
    fp4moe_context *ctx = cli_create_context(FP4MOE_BACKEND_CPU, 0);
    if (ctx == NULL) return 1;
    s.tty = isatty(STDERR_FILENO);
    s.start = s.last_print = cli_now_seconds();
    o.progress = on_progress;
    o.report = on_report;
    o.user = &s;
    fp4moe_status status = fp4moe_checkpoint_quantize(ctx, paths[0], paths[1], &o);
    if (s.tty && s.printed_progress) fprintf(stderr, "\r\033[K");
    if (status != FP4MOE_SUCCESS) {
        fprintf(stderr, "fp4moe quantize: %s\n", fp4moe_last_error(ctx));
        fp4moe_context_destroy(ctx);
        return 1;
    }
    printf("fp4moe quantize: %lld tensors to NVFP4 in %.1f s, relative L2 error mean %.3e, max %.3e",
           s.tensors, cli_now_seconds() - s.start, s.tensors ? s.sum_rel / (double)s.tensors : 0.0,
           s.max_rel);
    if (s.tensors) printf(" (%s)", s.worst_name);
    printf("\nwrote %s\n", paths[1]);
    fp4moe_context_destroy(ctx);
    return 0;
}
