/* fp4moe run: one MoE layer on tensors read from a safetensors file, the result written to
 * another (output [T,H] F32, topk_ids [T,k] I32, topk_weights [T,k] F32).
 *
 * Every input is checked by name, dtype and shape before the library sees it, so a wrong file
 * gets a message naming the tensor, not a library error. Tensors are copied out of the mapping
 * (which may be unaligned) into 256-byte aligned buffers, and to the device for the CUDA
 * backend (through the library's fp4moe_buffer_* API). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commands.h"
#include "fp4moe_checkpoint.h"
#include "io/layer_json.h"
#include "io/safetensors.h"

#define CONFIG_MAX_BYTES (16 << 20)
#define MAX_OWNED 48

typedef struct run_options {
    const char *config_path;
    const char *tensors_path;
    const char *out_path;
    const char *checkpoint_path; /* with layer: the layer's weights and routing from a checkpoint */
    long long layer;
    fp4moe_precision precision;
    fp4moe_backend backend;
    long long repeat;
    long long threads;
} run_options;

static void usage(FILE *out)
{
    fprintf(out,
            "usage: fp4moe run --config layer.json --tensors in.safetensors --out out.safetensors\n"
            "       fp4moe run --checkpoint DIR --layer L --tensors in.safetensors --out out.safetensors\n"
            "                  [--precision w4a16|w4a4]\n"
            "                  [--backend auto|cpu|cuda] [--repeat N] [--threads N]\n"
            "With --checkpoint, the weights, routing bias and layer attributes come from the MoE\n"
            "layer L of an NVFP4 checkpoint (see fp4moe info) and the tensors file needs only\n"
            "hidden_states; without router_logits (or topk_ids + topk_weights) the logits are\n"
            "computed from hidden_states and the router weight, and written as router_logits.\n"
            "Runs one layer. Inputs by name: hidden_states [T,H] (F32/F16/BF16); router_logits\n"
            "[T,E] (F32/F16/BF16) or topk_ids [T,k] I32 + topk_weights [T,k]; w1 [E_loc,N1,H/2]\n"
            "U8, w1_scale [E_loc,N1,H/16] F8_E4M3, w1_global_scale [E_loc] F32, w2 [E_loc,H,I/2]\n"
            "U8, w2_scale [E_loc,H,I/16] F8_E4M3, w2_global_scale [E_loc] F32; optional\n"
            "routing_bias [E], w1_global_scale_half2 [E_loc], b1 [E_loc,N1], b2 [E_loc,H],\n"
            "a1_global_scale, a2_global_scale, fc2_input_fp8_scale, swiglu_alpha, swiglu_beta,\n"
            "swiglu_limit [E_loc], per_token_scale [T] (all F32). Writes output [T,H] F32,\n"
            "topk_ids [T,k] I32, topk_weights [T,k] F32. --repeat N times N calls and prints\n"
            "the median.\n");
}

/* 0 to run, -1 after --help, 2 for a usage error. */
static int parse_options(int argc, char **argv, run_options *o)
{
    memset(o, 0, sizeof *o);
    o->backend = FP4MOE_BACKEND_AUTO;
    o->repeat = 1;
    o->layer = -1;
    o->precision = FP4MOE_PRECISION_W4A16;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return -1;
        }
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (v == NULL) {
            fprintf(stderr, "fp4moe run: %s needs a value\n", a);
            return 2;
        }
        i++;
        if (strcmp(a, "--config") == 0) o->config_path = v;
        else if (strcmp(a, "--tensors") == 0) o->tensors_path = v;
        else if (strcmp(a, "--out") == 0) o->out_path = v;
        else if (strcmp(a, "--checkpoint") == 0) o->checkpoint_path = v;
        else if (strcmp(a, "--layer") == 0) {
            if (cli_parse_int(v, 0, (1ll << 40), &o->layer)) goto bad;
        } else if (strcmp(a, "--precision") == 0) {
            if (precision_from_name(v, &o->precision)) goto bad;
        }
        else if (strcmp(a, "--backend") == 0) {
            if (cli_parse_backend(v, &o->backend)) return 2;
        } else if (strcmp(a, "--repeat") == 0) {
            if (cli_parse_int(v, 1, 1000000, &o->repeat)) goto bad;
        } else if (strcmp(a, "--threads") == 0) {
            if (cli_parse_int(v, 0, 4096, &o->threads)) goto bad;
        } else {
            fprintf(stderr, "fp4moe run: unknown option %s\n", a);
            usage(stderr);
            return 2;
        }
        continue;
    bad:
        fprintf(stderr, "fp4moe run: bad value '%s' for %s\n", v, a);
        return 2;
    }
    if (o->checkpoint_path != NULL) {
        if (o->layer < 0 || o->config_path != NULL || o->tensors_path == NULL || o->out_path == NULL) {
            fprintf(stderr, "fp4moe run: --checkpoint needs --layer, --tensors and --out (and no --config)\n");
            usage(stderr);
            return 2;
        }
        return 0;
    }
    if (o->config_path == NULL || o->tensors_path == NULL || o->out_path == NULL) {
        fprintf(stderr, "fp4moe run: --config, --tensors and --out are required\n");
        usage(stderr);
        return 2;
    }
    return 0;
}

static int read_config(const char *path, fp4moe_config *cfg)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        perror(path);
        return 1;
    }
    char *text = malloc(CONFIG_MAX_BYTES);
    size_t n = text != NULL ? fread(text, 1, CONFIG_MAX_BYTES, f) : 0;
    int too_big = text != NULL && n == CONFIG_MAX_BYTES;
    int failed = text == NULL || ferror(f);
    fclose(f);
    char err[512];
    int rc = 1;
    if (failed) fprintf(stderr, "fp4moe run: %s: cannot read\n", path);
    else if (too_big) fprintf(stderr, "fp4moe run: %s: larger than %d bytes\n", path, CONFIG_MAX_BYTES);
    else if (layer_config_from_json(text, n, cfg, err, sizeof err) != 0)
        fprintf(stderr, "fp4moe run: %s: %s\n", path, err);
    else rc = 0;
    free(text);
    return rc;
}

/* Checked, aligned host copies of tensors; freed together. */
typedef struct loader {
    const st_file *file;
    const char *path;
    void *owned[MAX_OWNED];
    int owned_count;
    int failed;
} loader;

static void loader_free(loader *l)
{
    for (int i = 0; i < l->owned_count; i++) free(l->owned[i]);
    l->owned_count = 0;
}

static void *loader_keep(loader *l, size_t bytes)
{
    void *p = l->owned_count < MAX_OWNED ? cli_aligned_alloc(bytes) : NULL;
    if (p == NULL) {
        fprintf(stderr, "fp4moe run: out of memory (%zu bytes)\n", bytes);
        l->failed = 1;
        return NULL;
    }
    l->owned[l->owned_count++] = p;
    return p;
}

/* Loads `name` when its dtype is one of allowed[0..n) and its shape is `shape`; NULL when it is
 * absent (an error when required) or wrong (always an error). *dtype_out gets the dtype. */
static void *load(loader *l, const char *name, int required, const fp4moe_dtype *allowed, int n,
                  int ndim, const int64_t *shape, fp4moe_dtype *dtype_out)
{
    const st_tensor *t = st_find(l->file, name);
    char err[512];
    if (t == NULL) {
        if (required) {
            fprintf(stderr, "fp4moe run: %s: missing tensor '%s' (expected shape [", l->path, name);
            for (int d = 0; d < ndim; d++) fprintf(stderr, "%s%lld", d ? "," : "", (long long)shape[d]);
            fprintf(stderr, "] %s)\n", st_dtype_name(allowed[0]));
            l->failed = 1;
        }
        return NULL;
    }
    fp4moe_dtype dtype = allowed[0];
    for (int i = 0; i < n; i++)
        if (t->dtype_known && t->dtype == allowed[i]) dtype = allowed[i];
    if (st_expect(t, dtype, ndim, shape, err, sizeof err) != 0) {
        fprintf(stderr, "fp4moe run: %s", err);
        if (n > 1) {
            fprintf(stderr, " (dtype one of");
            for (int i = 0; i < n; i++) fprintf(stderr, " %s", st_dtype_name(allowed[i]));
            fprintf(stderr, ")");
        }
        fprintf(stderr, "\n");
        l->failed = 1;
        return NULL;
    }
    void *copy = loader_keep(l, t->bytes);
    if (copy != NULL && t->bytes > 0) memcpy(copy, t->data, t->bytes);
    if (dtype_out != NULL) *dtype_out = dtype;
    return copy;
}

static const fp4moe_dtype F32_ONLY[] = {FP4MOE_DTYPE_F32};
static const fp4moe_dtype FLOATS[] = {FP4MOE_DTYPE_F32, FP4MOE_DTYPE_F16, FP4MOE_DTYPE_BF16};
static const fp4moe_dtype U8_ONLY[] = {FP4MOE_DTYPE_U8};
static const fp4moe_dtype E4M3_ONLY[] = {FP4MOE_DTYPE_E4M3};
static const fp4moe_dtype I32_ONLY[] = {FP4MOE_DTYPE_I32};

/* Where forward's buffers live: the host for the CPU backend, device copies for CUDA (through
 * the library's backend-agnostic buffer API). */
typedef struct placement {
    fp4moe_context *ctx;
    int cuda;
    void *device_buffers[16];
    int count;
    int failed;
} placement;

/* A backend buffer of `bytes`, filled from host when host is not NULL; NULL on failure. */
static void *backend_buffer(placement *p, const void *host, size_t bytes)
{
    void *d = NULL;
    if (p->count >= 16) {
        fprintf(stderr, "fp4moe run: too many device buffers\n");
    } else if (fp4moe_buffer_alloc(p->ctx, bytes, &d) != FP4MOE_SUCCESS ||
               (host != NULL && fp4moe_buffer_upload(p->ctx, d, host, bytes) != FP4MOE_SUCCESS)) {
        fprintf(stderr, "fp4moe run: device buffer of %zu bytes: %s\n", bytes,
                fp4moe_last_error(p->ctx));
        fp4moe_buffer_free(p->ctx, d);
        d = NULL;
    } else {
        p->device_buffers[p->count++] = d;
        return d;
    }
    p->failed = 1;
    return NULL;
}

static void *place(placement *p, const void *host, size_t bytes)
{
    if (!p->cuda || host == NULL) return (void *)host;
    return backend_buffer(p, host, bytes);
}

/* Uninitialised memory where forward computes (the CUDA workspace); NULL on failure. */
static void *place_empty(placement *p, void *host_workspace, size_t bytes)
{
    return p->cuda ? backend_buffer(p, NULL, bytes) : host_workspace;
}

static int fetch(const placement *p, void *host, const void *placed, size_t bytes)
{
    if (!p->cuda || bytes == 0) return 0;
    if (fp4moe_buffer_download(p->ctx, host, placed, bytes) != FP4MOE_SUCCESS) {
        fprintf(stderr, "fp4moe run: copying %zu bytes from the device: %s\n", bytes,
                fp4moe_last_error(p->ctx));
        return 1;
    }
    return 0;
}

static void placement_free(placement *p)
{
    for (int i = 0; i < p->count; i++) fp4moe_buffer_free(p->ctx, p->device_buffers[i]);
    p->count = 0;
}

static int compare_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static float to_f32(const void *base, fp4moe_dtype dtype, size_t i)
{
    uint16_t bits;
    switch (dtype) {
    case FP4MOE_DTYPE_F16: memcpy(&bits, (const char *)base + 2 * i, 2); return fp4moe_f16_to_float(bits);
    case FP4MOE_DTYPE_BF16: memcpy(&bits, (const char *)base + 2 * i, 2); return fp4moe_bf16_to_float(bits);
    default: return ((const float *)base)[i];
    }
}

/* Everything after the configuration: inputs, plan, forward calls, output file. With a
 * checkpoint, `plan` is the layer's (owned from here on) and the weights are not read from file. */
static int run_layer(const run_options *o, fp4moe_context *ctx, const fp4moe_config *cfg,
                     const st_file *file, fp4moe_plan *given_plan, const fp4moe_checkpoint *ckpt)
{
    const int64_t e = cfg->num_experts, k = cfg->top_k, h = cfg->hidden_size;
    const int64_t i_size = cfg->intermediate_size;
    const int64_t e_loc = cfg->local_num_experts ? cfg->local_num_experts : e - cfg->local_expert_offset;
    const int64_t n1 = fp4moe_config_fc1_rows(cfg);
    loader l = {.file = file, .path = o->tensors_path};
    placement p = {.ctx = ctx, .cuda = fp4moe_context_backend(ctx) == FP4MOE_BACKEND_CUDA};
    fp4moe_plan *plan = given_plan;
    int rc = 1;

    const st_tensor *hs = st_find(file, "hidden_states");
    const int64_t t_count = hs != NULL && hs->ndim == 2 ? hs->shape[0] : 0;
    if (hs != NULL && t_count < 1) {
        fprintf(stderr, "fp4moe run: tensor 'hidden_states': expected shape [T,%lld] with T >= 1\n",
                (long long)h);
        return 1;
    }
    if (t_count > cfg->max_tokens) {
        fprintf(stderr, "fp4moe run: tensor 'hidden_states' has %lld tokens, more than the "
                "config's max_tokens %lld\n", (long long)t_count, (long long)cfg->max_tokens);
        return 1;
    }
    const int64_t s_tk[2] = {t_count, h}, s_te[2] = {t_count, e}, s_tkk[2] = {t_count, k};
    const int64_t s_t[1] = {t_count}, s_e[1] = {e}, s_el[1] = {e_loc};
    const int64_t s_w1[3] = {e_loc, n1, h / 2}, s_w1s[3] = {e_loc, n1, h / 16};
    const int64_t s_w2[3] = {e_loc, h, i_size / 2}, s_w2s[3] = {e_loc, h, i_size / 16};
    const int64_t s_b1[2] = {e_loc, n1}, s_b2[2] = {e_loc, h};

    fp4moe_forward_args args;
    fp4moe_forward_args_init(&args);
    args.num_tokens = t_count;
    void *hidden = load(&l, "hidden_states", 1, FLOATS, 3, 2, s_tk, &args.hidden_dtype);
    const int has_logits = st_find(file, "router_logits") != NULL;
    const int has_ids = st_find(file, "topk_ids") != NULL || st_find(file, "topk_weights") != NULL;
    if (has_logits && has_ids) {
        fprintf(stderr, "fp4moe run: %s: give router_logits or topk_ids + topk_weights, not both\n",
                o->tensors_path);
        l.failed = 1;
    }
    void *logits = NULL, *ids = NULL, *weights_in = NULL;
    const int router_from_checkpoint = ckpt != NULL && !has_ids && !has_logits;
    if (router_from_checkpoint && hidden != NULL) {
        logits = loader_keep(&l, (size_t)(t_count * e) * sizeof(float));
        args.router_logits_dtype = FP4MOE_DTYPE_F32;
        if (logits != NULL &&
            fp4moe_checkpoint_router_logits(ctx, ckpt, o->layer, t_count, hidden, args.hidden_dtype,
                                            logits) != FP4MOE_SUCCESS) {
            fprintf(stderr, "fp4moe run: router logits: %s\n", fp4moe_last_error(ctx));
            l.failed = 1;
        }
    } else if (!has_ids && !router_from_checkpoint)
        logits = load(&l, "router_logits", 1, FLOATS, 3, 2, s_te, &args.router_logits_dtype);
    else {
        ids = load(&l, "topk_ids", 1, I32_ONLY, 1, 2, s_tkk, NULL);
        weights_in = load(&l, "topk_weights", 1, FLOATS, 3, 2, s_tkk, &args.topk_weights_dtype);
    }
    float *per_token = load(&l, "per_token_scale", 0, F32_ONLY, 1, 1, s_t, NULL);

    fp4moe_weights w;
    memset(&w, 0, sizeof w);
    if (given_plan == NULL) {
        w.w1 = load(&l, "w1", 1, U8_ONLY, 1, 3, s_w1, NULL);
        w.w1_scale = load(&l, "w1_scale", 1, E4M3_ONLY, 1, 3, s_w1s, NULL);
        w.w1_global_scale = load(&l, "w1_global_scale", 1, F32_ONLY, 1, 1, s_el, NULL);
        w.w1_global_scale_half2 = load(&l, "w1_global_scale_half2", 0, F32_ONLY, 1, 1, s_el, NULL);
        w.w2 = load(&l, "w2", 1, U8_ONLY, 1, 3, s_w2, NULL);
        w.w2_scale = load(&l, "w2_scale", 1, E4M3_ONLY, 1, 3, s_w2s, NULL);
        w.w2_global_scale = load(&l, "w2_global_scale", 1, F32_ONLY, 1, 1, s_el, NULL);
        w.w1_scale_layout = FP4MOE_SCALE_LINEAR;
        w.w2_scale_layout = FP4MOE_SCALE_LINEAR;
        w.b1 = load(&l, "b1", 0, F32_ONLY, 1, 2, s_b1, NULL);
        w.b2 = load(&l, "b2", 0, F32_ONLY, 1, 2, s_b2, NULL);
        w.routing_bias = load(&l, "routing_bias", 0, F32_ONLY, 1, 1, s_e, NULL);
        w.a1_global_scale = load(&l, "a1_global_scale", cfg->precision == FP4MOE_PRECISION_W4A4,
                                 F32_ONLY, 1, 1, s_el, NULL);
        w.a2_global_scale = load(&l, "a2_global_scale", cfg->precision == FP4MOE_PRECISION_W4A4,
                                 F32_ONLY, 1, 1, s_el, NULL);
        w.fc2_input_fp8_scale = load(&l, "fc2_input_fp8_scale", cfg->fc2_input_fp8, F32_ONLY, 1, 1,
                                     s_el, NULL);
        w.swiglu_alpha = load(&l, "swiglu_alpha", 0, F32_ONLY, 1, 1, s_el, NULL);
        w.swiglu_beta = load(&l, "swiglu_beta", 0, F32_ONLY, 1, 1, s_el, NULL);
        w.swiglu_limit = load(&l, "swiglu_limit", 0, F32_ONLY, 1, 1, s_el, NULL);
    }
    if (l.failed) goto done;

    /* A misspelt optional tensor would otherwise be silently left out. */
    static const char *const KNOWN[] = {
        "hidden_states", "router_logits", "topk_ids", "topk_weights", "per_token_scale", "w1",
        "w1_scale", "w1_global_scale", "w1_global_scale_half2", "w2", "w2_scale",
        "w2_global_scale", "b1", "b2", "routing_bias", "a1_global_scale", "a2_global_scale",
        "fc2_input_fp8_scale", "swiglu_alpha", "swiglu_beta", "swiglu_limit"};
    for (int i = 0; i < st_count(file); i++) {
        const char *name = st_get(file, i)->name;
        size_t j = 0;
        while (j < sizeof KNOWN / sizeof KNOWN[0] && strcmp(KNOWN[j], name) != 0) j++;
        /* With a checkpoint only the inputs (the first five names) are read. */
        if (j == sizeof KNOWN / sizeof KNOWN[0] || (given_plan != NULL && j >= 5))
            fprintf(stderr, "fp4moe run: warning: ignoring tensor '%s'\n", name);
    }

    if (plan == NULL && fp4moe_plan_create(ctx, cfg, &w, &plan) != FP4MOE_SUCCESS) {
        fprintf(stderr, "fp4moe run: plan: %s\n", fp4moe_last_error(ctx));
        goto done;
    }
    size_t workspace_bytes = 0;
    if (fp4moe_plan_workspace_size(plan, t_count, &workspace_bytes) != FP4MOE_SUCCESS) {
        fprintf(stderr, "fp4moe run: workspace size: %s\n", fp4moe_last_error(ctx));
        goto done;
    }
    const size_t out_bytes = (size_t)(t_count * h) * sizeof(float);
    const size_t tk = (size_t)(t_count * k);
    float *output = loader_keep(&l, out_bytes);
    int32_t *ids_out = loader_keep(&l, tk * sizeof(int32_t));
    float *weights_out = loader_keep(&l, tk * sizeof(float));
    void *workspace = p.cuda ? NULL : loader_keep(&l, workspace_bytes);
    double *times = loader_keep(&l, (size_t)o->repeat * sizeof(double));
    if (l.failed) goto done;
    workspace = place_empty(&p, workspace, workspace_bytes);
    const size_t hidden_bytes = (size_t)(t_count * h) * st_dtype_size(args.hidden_dtype);
    args.hidden_states = place(&p, hidden, hidden_bytes);
    args.router_logits = place(&p, logits, (size_t)(t_count * e) * st_dtype_size(args.router_logits_dtype));
    args.topk_ids = place(&p, ids, tk * sizeof(int32_t));
    args.topk_weights = place(&p, weights_in, tk * st_dtype_size(args.topk_weights_dtype));
    args.per_token_scale = place(&p, per_token, (size_t)t_count * sizeof(float));
    args.output = place(&p, output, out_bytes);
    args.output_dtype = FP4MOE_DTYPE_F32;
    if (logits != NULL) {
        args.topk_ids_out = place(&p, ids_out, tk * sizeof(int32_t));
        args.topk_weights_out = place(&p, weights_out, tk * sizeof(float));
    }
    if (p.failed) goto done;

    for (long long r = 0; r < o->repeat; r++) {
        double start = cli_now_seconds();
        fp4moe_status status = logits != NULL
                                   ? fp4moe_forward(plan, &args, workspace, workspace_bytes, NULL)
                                   : fp4moe_forward_routed(plan, &args, workspace, workspace_bytes, NULL);
        if (status == FP4MOE_SUCCESS && fp4moe_synchronize(ctx, NULL) != FP4MOE_SUCCESS) {
            fprintf(stderr, "fp4moe run: synchronising: %s\n", fp4moe_last_error(ctx));
            goto done;
        }
        times[r] = cli_now_seconds() - start;
        if (status != FP4MOE_SUCCESS) {
            fprintf(stderr, "fp4moe run: forward: %s: %s\n", fp4moe_status_string(status),
                    fp4moe_last_error(ctx));
            goto done;
        }
    }
    if (fetch(&p, output, args.output, out_bytes)) goto done;
    if (logits != NULL) {
        if (fetch(&p, ids_out, args.topk_ids_out, tk * sizeof(int32_t)) ||
            fetch(&p, weights_out, args.topk_weights_out, tk * sizeof(float)))
            goto done;
    } else {
        /* Routed: the choice was the caller's, echoed so both paths write the same tensors. */
        memcpy(ids_out, ids, tk * sizeof(int32_t));
        for (size_t j = 0; j < tk; j++) weights_out[j] = to_f32(weights_in, args.topk_weights_dtype, j);
    }

    st_writer *writer = st_writer_create();
    char err[512];
    if (writer == NULL || st_writer_add(writer, "output", FP4MOE_DTYPE_F32, 2, s_tk, output) ||
        st_writer_add(writer, "topk_ids", FP4MOE_DTYPE_I32, 2, s_tkk, ids_out) ||
        st_writer_add(writer, "topk_weights", FP4MOE_DTYPE_F32, 2, s_tkk, weights_out) ||
        (router_from_checkpoint &&
         st_writer_add(writer, "router_logits", FP4MOE_DTYPE_F32, 2, s_te, logits))) {
        fprintf(stderr, "fp4moe run: out of memory preparing %s\n", o->out_path);
        st_writer_destroy(writer);
        goto done;
    }
    int write_failed = st_writer_write(writer, o->out_path, err, sizeof err);
    st_writer_destroy(writer);
    if (write_failed) {
        fprintf(stderr, "fp4moe run: %s\n", err);
        goto done;
    }
    qsort(times, (size_t)o->repeat, sizeof(double), compare_double);
    printf("fp4moe run: backend %s, T=%lld, %s, median %.3f ms over %lld call%s\n",
           fp4moe_context_description(ctx), (long long)t_count,
           router_from_checkpoint ? "logits from the checkpoint's router"
           : logits != NULL      ? "router logits"
                                 : "pre-routed", 1e3 * 0.5 * (times[(o->repeat - 1) / 2] + times[o->repeat / 2]),
           o->repeat, o->repeat == 1 ? "" : "s");
    rc = 0;
done:
    fp4moe_plan_destroy(plan);
    placement_free(&p);
    loader_free(&l);
    return rc;
}

/* The --checkpoint mode: the layer's plan from the checkpoint, then the common path. */
static int run_checkpoint(const run_options *o)
{
    fp4moe_context *ctx = cli_create_context(o->backend, (int)o->threads);
    if (ctx == NULL) return 1;
    fp4moe_checkpoint *ckpt = NULL;
    fp4moe_plan *plan = NULL;
    st_file *file = NULL;
    char err[512];
    int rc = 1;
    fp4moe_checkpoint_plan_options po;
    fp4moe_checkpoint_plan_options_init(&po);
    po.precision = o->precision;
    fp4moe_config cfg;
    if (fp4moe_checkpoint_open(ctx, o->checkpoint_path, &ckpt) != FP4MOE_SUCCESS ||
        fp4moe_checkpoint_plan_create(ctx, ckpt, o->layer, &po, &plan) != FP4MOE_SUCCESS ||
        fp4moe_plan_get_config(plan, &cfg) != FP4MOE_SUCCESS) {
        fprintf(stderr, "fp4moe run: %s\n", fp4moe_last_error(ctx));
        goto done;
    }
    if (st_open(o->tensors_path, &file, err, sizeof err) != 0) {
        fprintf(stderr, "fp4moe run: %s\n", err);
        goto done;
    }
    rc = run_layer(o, ctx, &cfg, file, plan, ckpt);
    plan = NULL; /* run_layer destroyed it */
done:
    fp4moe_plan_destroy(plan);
    st_close(file);
    fp4moe_checkpoint_close(ckpt);
    fp4moe_context_destroy(ctx);
    return rc;
}

int cmd_run(int argc, char **argv)
{
    run_options o;
    int rc = parse_options(argc, argv, &o);
    if (rc != 0) return rc < 0 ? 0 : rc;
    if (o.checkpoint_path != NULL) return run_checkpoint(&o);
    fp4moe_config cfg;
    if (read_config(o.config_path, &cfg) != 0) return 1;
    fp4moe_context *ctx = cli_create_context(o.backend, (int)o.threads);
    if (ctx == NULL) return 1;
    if (fp4moe_config_validate(ctx, &cfg) != FP4MOE_SUCCESS) {
        fprintf(stderr, "fp4moe run: %s: %s\n", o.config_path, fp4moe_last_error(ctx));
        fp4moe_context_destroy(ctx);
        return 1;
    }
    st_file *file = NULL;
    char err[512];
    if (st_open(o.tensors_path, &file, err, sizeof err) != 0) {
        fprintf(stderr, "fp4moe run: %s\n", err);
        fp4moe_context_destroy(ctx);
        return 1;
    }
    rc = run_layer(&o, ctx, &cfg, file, NULL, NULL);
    st_close(file);
    fp4moe_context_destroy(ctx);
    return rc;
}
