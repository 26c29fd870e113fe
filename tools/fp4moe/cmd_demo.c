/* fp4moe demo: the Qwen3-30B-A3B MoE layer on random weights quantised to NVFP4, run on the
 * best backend, timed, and checked against the float64 reference (tests/ref). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commands.h"
#include "presets.h"
#include "ref/ref_moe.h"
#include "synthetic.h"

typedef struct demo_options {
    fp4moe_backend backend;
    long long tokens;
    long long repeat;
    long long threads;
    const char *preset;
} demo_options;

static int parse(int argc, char **argv, demo_options *o)
{
    o->backend = FP4MOE_BACKEND_AUTO;
    o->tokens = 16;
    o->repeat = 20;
    o->threads = 0;
    o->preset = "qwen3-30b-a3b";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--help") == 0) {
            printf("usage: fp4moe demo [--backend auto|cpu|cuda] [--tokens N] [--repeat N]\n"
                   "                   [--threads N] [--preset NAME]\n"
                   "Builds the preset's layer (default qwen3-30b-a3b) from random weights quantised\n"
                   "to NVFP4, runs N tokens (default 16), prints the time per call and the relative\n"
                   "L2 error against the float64 reference.\n");
            exit(0);
        }
        if (v == NULL) {
            fprintf(stderr, "fp4moe demo: %s needs a value\n", a);
            return 2;
        }
        if (strcmp(a, "--backend") == 0) {
            if (cli_parse_backend(v, &o->backend)) return 2;
        } else if (strcmp(a, "--tokens") == 0) {
            if (cli_parse_int(v, 1, 1 << 20, &o->tokens)) goto bad;
        } else if (strcmp(a, "--repeat") == 0) {
            if (cli_parse_int(v, 1, 1000000, &o->repeat)) goto bad;
        } else if (strcmp(a, "--threads") == 0) {
            if (cli_parse_int(v, 0, 4096, &o->threads)) goto bad;
        } else if (strcmp(a, "--preset") == 0) {
            o->preset = v;
        } else {
            fprintf(stderr, "fp4moe demo: unknown option %s\n", a);
            return 2;
        }
        i++;
        continue;
    bad:
        fprintf(stderr, "fp4moe demo: bad value '%s' for %s\n", v, a);
        return 2;
    }
    return 0;
}

static int compare_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int cmd_demo(int argc, char **argv)
{
    demo_options o;
    int rc = parse(argc, argv, &o);
    if (rc) return rc;
    preset p;
    if (preset_find(o.preset, &p)) {
        fprintf(stderr, "fp4moe demo: unknown preset '%s'\n", o.preset);
        return 2;
    }
    fp4moe_config cfg = p.cfg;
    if (cfg.max_tokens < o.tokens) cfg.max_tokens = o.tokens;
    fp4moe_context *ctx = cli_create_context(o.backend, (int)o.threads);
    if (ctx == NULL) return 1;
    printf("fp4moe %d: %s layer E=%lld k=%d H=%lld I=%lld, NVFP4 weights, %lld tokens\n",
           fp4moe_version(), p.name, (long long)cfg.num_experts, cfg.top_k,
           (long long)cfg.hidden_size, (long long)cfg.intermediate_size, o.tokens);
    printf("backend: %s\n", fp4moe_context_description(ctx));

    double t0 = cli_now_seconds();
    synthetic_layer layer;
    if (synthetic_layer_create(&cfg, p.has_routing_bias, p.has_biases, SYNTHETIC_QUANTISED, 42,
                               &layer)) {
        fp4moe_context_destroy(ctx);
        return 1;
    }
    fp4moe_plan *plan = NULL;
    fp4moe_status st = fp4moe_plan_create(ctx, &cfg, &layer.weights, &plan);
    double t1 = cli_now_seconds();
    const int64_t t = o.tokens, h = cfg.hidden_size, e = cfg.num_experts;
    float *x = malloc((size_t)(t * h) * sizeof(float));
    float *logits = malloc((size_t)(t * e) * sizeof(float));
    float *out = malloc((size_t)(t * h) * sizeof(float));
    double *ref = malloc((size_t)(t * h) * sizeof(double));
    double *times = malloc((size_t)o.repeat * sizeof(double));
    size_t ws_bytes = 0;
    void *ws = NULL;
    rc = 1;
    if (st != FP4MOE_SUCCESS) {
        fprintf(stderr, "fp4moe demo: plan creation failed: %s\n", fp4moe_last_error(ctx));
        goto done;
    }
    if (!x || !logits || !out || !ref || !times) {
        fprintf(stderr, "fp4moe demo: out of memory\n");
        goto done;
    }
    printf("weights: random N(0, 1/sqrt(K)) quantised to NVFP4 and planned in %.2f s\n", t1 - t0);
    synthetic_fill_normal(x, t * h, 1.0f, 7);
    synthetic_fill_normal(logits, t * e, 2.0f, 11);
    if (fp4moe_plan_workspace_size(plan, t, &ws_bytes) != FP4MOE_SUCCESS ||
        (ws = cli_aligned_alloc(ws_bytes)) == NULL) {
        fprintf(stderr, "fp4moe demo: workspace: %s\n", fp4moe_last_error(ctx));
        goto done;
    }
    fp4moe_forward_args args;
    fp4moe_forward_args_init(&args);
    args.num_tokens = t;
    args.hidden_states = x;
    args.router_logits = logits;
    args.output = out;
    for (long long r = -2; r < o.repeat; r++) { /* two warm-up calls */
        double s = cli_now_seconds();
        st = fp4moe_forward(plan, &args, ws, ws_bytes, NULL);
        if (st != FP4MOE_SUCCESS) {
            fprintf(stderr, "fp4moe demo: forward failed: %s\n", fp4moe_last_error(ctx));
            goto done;
        }
        if (r >= 0) times[r] = cli_now_seconds() - s;
    }
    qsort(times, (size_t)o.repeat, sizeof(double), compare_double);
    double median = times[o.repeat / 2];

    ref_layer rl;
    memset(&rl, 0, sizeof rl);
    rl.cfg = cfg;
    rl.w = layer.weights;
    ref_args ra;
    memset(&ra, 0, sizeof ra);
    ra.num_tokens = t;
    ra.hidden_states = x;
    ra.hidden_dtype = FP4MOE_DTYPE_F32;
    ra.router_logits = logits;
    ra.router_logits_dtype = FP4MOE_DTYPE_F32;
    ra.finalize = 1;
    ra.output_dtype = FP4MOE_DTYPE_F32;
    if (ref_forward(&rl, &ra, ref, NULL, NULL, NULL) != 0) {
        fprintf(stderr, "fp4moe demo: the float64 reference failed\n");
        goto done;
    }
    double num = 0, den = 0;
    for (int64_t i = 0; i < t * h; i++) {
        double d = (double)out[i] - ref[i];
        num += d * d;
        den += ref[i] * ref[i];
    }
    double rel = isnan(num) ? INFINITY : sqrt(num / (den > 0 ? den : 1));
    printf("time per call: %.3f ms (median of %lld, %lld tokens)\n", median * 1e3, o.repeat, o.tokens);
    printf("relative L2 error vs float64 reference: %.2e (%s)\n", rel,
           rel < 1e-5 ? "ok: < 1e-5" : "FAILED: >= 1e-5");
    rc = rel < 1e-5 ? 0 : 1;
done:
    free(ws);
    free(x);
    free(logits);
    free(out);
    free(ref);
    free(times);
    fp4moe_plan_destroy(plan);
    synthetic_layer_free(&layer);
    fp4moe_context_destroy(ctx);
    return rc;
}
