/* fp4moe_checkpoint_quantize: float expert weights -> NVFP4 in ModelOpt's layout and naming.
 *
 * The weight quantiser is ModelOpt's (NVFP4QTensor), not the Blackwell activation quantiser of
 * the spec's section 2: the global scale is stored as weight_scale_2 = amax / (6*448) (an FP32
 * division, not 1/g), block scales are e4m3(block_amax / (6 * weight_scale_2)) with 1.0 for an
 * all-zero block, and values are e2m1(x / (scale * weight_scale_2)). Either way the
 * dequantisation is e2m1 * e4m3 * weight_scale_2, which is what readers rely on.
 *
 * Shards are read through their mappings; the quantised tensors of one output shard are held in
 * memory until it is written (about 0.28x the BF16 shard), the other tensors are copied straight
 * from the mapping. */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/context.h"
#include "io/checkpoint.h"

void fp4moe_quantize_options_init(fp4moe_quantize_options *o)
{
    if (o != NULL) memset(o, 0, sizeof *o);
}

int ckpt_quantize_matrix(const void *data, fp4moe_dtype dtype, int64_t rows, int64_t cols,
                         uint8_t *packed, uint8_t *scales, float *ws2_out, double *amax_out,
                         double *rel_l2_error, double *max_abs_error)
{
    /* Blocks are independent: both passes are split over OpenMP threads (OMP_NUM_THREADS).
     * The codes do not depend on the split; the error sums (a report) may in the last bits. */
    const int64_t n = rows * cols, blocks = n / 16;
    const int parallel = n >= (1 << 16);
    float amax = 0.0f;
    int bad = 0;
#pragma omp parallel for if (parallel) schedule(static) reduction(max : amax) reduction(| : bad)
    for (int64_t i = 0; i < n; i++) {
        const float v = fabsf(ckpt_load_float(data, dtype, i));
        if (!isfinite(v)) bad = 1;
        else amax = v > amax ? v : amax;
    }
    if (bad) return -1;
    const float ws2 = amax > 0.0f ? amax / (6.0f * 448.0f) : 1.0f;
    double err_sq = 0, ref_sq = 0, max_err = 0;
#pragma omp parallel for if (parallel) schedule(static) reduction(+ : err_sq, ref_sq) \
    reduction(max : max_err)
    for (int64_t b = 0; b < blocks; b++) {
        float block[16];
        float bamax = 0.0f;
        for (int k = 0; k < 16; k++) {
            block[k] = ckpt_load_float(data, dtype, b * 16 + k);
            bamax = fabsf(block[k]) > bamax ? fabsf(block[k]) : bamax;
        }
        float s = bamax / (6.0f * ws2);
        if (s == 0.0f) s = 1.0f;
        const uint8_t s_code = fp4moe_float_to_e4m3(s);
        const float s_value = fp4moe_e4m3_to_float(s_code);
        const float denom = s_value * ws2;
        scales[b] = s_code;
        for (int k = 0; k < 16; k += 2) {
            uint8_t lo = denom > 0.0f ? fp4moe_float_to_e2m1(block[k] / denom) : 0;
            uint8_t hi = denom > 0.0f ? fp4moe_float_to_e2m1(block[k + 1] / denom) : 0;
            packed[b * 8 + k / 2] = (uint8_t)((lo & 15) | (hi << 4));
            for (int m = 0; m < 2; m++) {
                double deq = (double)fp4moe_e2m1_to_float(m ? hi : lo) * s_value * ws2;
                double x = block[k + m], d = fabs(deq - x);
                err_sq += d * d;
                ref_sq += x * x;
                max_err = d > max_err ? d : max_err;
            }
        }
    }
    *ws2_out = ws2;
    *amax_out = amax;
    *rel_l2_error = ref_sq > 0 ? sqrt(err_sq / ref_sq) : 0.0;
    *max_abs_error = max_err;
    return 0;
}

/* A growing list of malloc'd strings. */
typedef struct string_list {
    char **items;
    int64_t count, capacity;
} string_list;

static int list_add(string_list *l, const char *s, size_t len)
{
    if (l->count == l->capacity) {
        int64_t cap = l->capacity ? 2 * l->capacity : 64;
        char **grown = realloc(l->items, (size_t)cap * sizeof(char *));
        if (grown == NULL) return -1;
        l->items = grown;
        l->capacity = cap;
    }
    char *copy = malloc(len + 1);
    if (copy == NULL) return -1;
    memcpy(copy, s, len);
    copy[len] = '\0';
    l->items[l->count++] = copy;
    return 0;
}

static void list_free(string_list *l)
{
    for (int64_t i = 0; i < l->count; i++) free(l->items[i]);
    free(l->items);
    memset(l, 0, sizeof *l);
}

/* Everything one run needs besides the checkpoint. */
typedef struct quantize_job {
    fp4moe_context *ctx;
    const fp4moe_checkpoint *ckpt;
    const fp4moe_quantize_options *o;
    st_file *input_scales;
    ckpt_calibration calibration;
    string_list exclude;     /* modules left in float */
    string_list index_names; /* output tensor names, with index_shards */
    string_list index_shards;
    uint64_t bytes_done, bytes_total, bytes_written;
    void **owned;
    int owned_count, owned_capacity;
    char err[FP4MOE_MESSAGE_BYTES - 64];
} quantize_job;

static void *job_alloc(quantize_job *job, size_t bytes)
{
    if (job->owned_count == job->owned_capacity) {
        int cap = job->owned_capacity ? 2 * job->owned_capacity : 256;
        void **grown = realloc(job->owned, (size_t)cap * sizeof(void *));
        if (grown == NULL) return NULL;
        job->owned = grown;
        job->owned_capacity = cap;
    }
    void *p = malloc(bytes ? bytes : 1);
    if (p != NULL) job->owned[job->owned_count++] = p;
    return p;
}

static void job_release(quantize_job *job)
{
    for (int i = 0; i < job->owned_count; i++) free(job->owned[i]);
    job->owned_count = 0;
}

static float input_scale_for(const quantize_job *job, const char *name, size_t base_len,
                             size_t prefix_len, int64_t expert, ckpt_proj proj)
{
    if (job->input_scales != NULL) {
        char key[CKPT_MAX_NAME + 64];
        snprintf(key, sizeof key, "%.*sinput_scale", (int)base_len, name);
        const st_tensor *t = st_find(job->input_scales, key);
        float v;
        if (t != NULL && t->dtype_known && t->dtype == FP4MOE_DTYPE_F32 && t->bytes == 4) {
            memcpy(&v, t->data, 4);
            if (v > 0 && isfinite(v)) return v;
        }
    }
    if (job->calibration.fc1 != NULL) {
        for (int li = 0; li < job->ckpt->layer_count; li++) {
            const ckpt_layer *L = &job->ckpt->layers[li];
            if (strlen(L->prefix) == prefix_len && strncmp(L->prefix, name, prefix_len) == 0 &&
                job->calibration.down[li] != NULL && expert < L->num_experts)
                return proj == CKPT_DOWN ? job->calibration.down[li][expert] : job->calibration.fc1[li];
        }
    }
    return job->o->input_scale > 0 ? job->o->input_scale : 0.0f;
}

static int note_output(quantize_job *job, const char *name, const char *shard, uint64_t bytes)
{
    job->bytes_written += bytes;
    return list_add(&job->index_names, name, strlen(name)) || list_add(&job->index_shards, shard, strlen(shard));
}

/* One expert weight [rows, cols] -> the four ModelOpt tensors. */
static int quantize_tensor(quantize_job *job, st_writer *w, const st_tensor *t, const char *shard,
                           size_t prefix_len, int64_t expert, ckpt_proj proj)
{
    const int64_t rows = t->shape[0], cols = t->shape[1];
    if (cols % 16 != 0 || rows < 1) {
        snprintf(job->err, sizeof job->err, "tensor '%s': [%lld,%lld] cannot be quantised (columns "
                 "must be a multiple of 16)", t->name, (long long)rows, (long long)cols);
        return -1;
    }
    const size_t base_len = strlen(t->name) - strlen("weight");
    const size_t packed_bytes = (size_t)(rows * cols / 2), scale_bytes = (size_t)(rows * cols / 16);
    float *scalars = job_alloc(job, 2 * sizeof(float));
    uint8_t *packed = job_alloc(job, packed_bytes), *scales = job_alloc(job, scale_bytes);
    char *names = job_alloc(job, 4 * (base_len + 16));
    if (scalars == NULL || packed == NULL || scales == NULL || names == NULL) {
        snprintf(job->err, sizeof job->err, "out of memory quantising '%s'", t->name);
        return -1;
    }
    fp4moe_quantize_tensor_report r = {.name = t->name, .rows = rows, .cols = cols};
    if (ckpt_quantize_matrix(t->data, t->dtype, rows, cols, packed, scales, &scalars[0], &r.amax,
                             &r.rel_l2_error, &r.max_abs_error) != 0) {
        snprintf(job->err, sizeof job->err, "tensor '%s' holds a NaN or an infinity", t->name);
        return -1;
    }
    scalars[1] = input_scale_for(job, t->name, base_len, prefix_len, expert, proj);
    r.weight_scale_2 = scalars[0];
    r.input_scale = scalars[1];
    static const char *const suffix[4] = {"weight", "weight_scale", "weight_scale_2", "input_scale"};
    char *name[4];
    for (int i = 0; i < 4; i++) {
        name[i] = names + (size_t)i * (base_len + 16);
        snprintf(name[i], base_len + 16, "%.*s%s", (int)base_len, t->name, suffix[i]);
    }
    const int64_t s_packed[2] = {rows, cols / 2}, s_scales[2] = {rows, cols / 16};
    int bad = st_writer_add(w, name[0], FP4MOE_DTYPE_U8, 2, s_packed, packed) ||
              st_writer_add(w, name[1], FP4MOE_DTYPE_E4M3, 2, s_scales, scales) ||
              st_writer_add(w, name[2], FP4MOE_DTYPE_F32, 0, NULL, &scalars[0]) ||
              (scalars[1] > 0 && st_writer_add(w, name[3], FP4MOE_DTYPE_F32, 0, NULL, &scalars[1]));
    bad = bad || note_output(job, name[0], shard, packed_bytes) || note_output(job, name[1], shard, scale_bytes) ||
          note_output(job, name[2], shard, 4) || (scalars[1] > 0 && note_output(job, name[3], shard, 4));
    if (bad) {
        snprintf(job->err, sizeof job->err, "tensor '%s': cannot add the quantised tensors (a name "
                 "collides, or out of memory)", t->name);
        return -1;
    }
    if (job->o->report != NULL) job->o->report(job->o->user, &r);
    return 0;
}

static int is_float(const st_tensor *t)
{
    return t->dtype_known && (t->dtype == FP4MOE_DTYPE_F32 || t->dtype == FP4MOE_DTYPE_F16 ||
                              t->dtype == FP4MOE_DTYPE_BF16);
}

static int quantize_shard(quantize_job *job, int s, const char *out_file)
{
    const fp4moe_checkpoint *ckpt = job->ckpt;
    const st_file *f = ckpt->shards[s];
    const char *shard = ckpt->shard_names[s];
    st_writer *w = st_writer_create();
    if (w == NULL || st_writer_add_metadata(w, "format", "pt")) {
        st_writer_destroy(w);
        snprintf(job->err, sizeof job->err, "out of memory");
        return -1;
    }
    int rc = -1;
    for (int i = 0; i < st_count(f); i++) {
        const st_tensor *t = st_get(f, i);
        size_t prefix_len;
        int64_t expert;
        ckpt_proj proj;
        ckpt_naming naming;
        ckpt_param param;
        const int expert_weight = ckpt_parse_expert_name(t->name, &prefix_len, &expert, &proj, &naming, &param) &&
                                  param == CKPT_WEIGHT && is_float(t) && t->ndim == 2;
        if (expert_weight) {
            if (quantize_tensor(job, w, t, shard, prefix_len, expert, proj)) goto done;
        } else {
            if (!t->dtype_known) {
                snprintf(job->err, sizeof job->err, "tensor '%s': dtype %s cannot be copied (the "
                         "writer knows F32, F16, BF16, I32, U8, F8_E4M3)", t->name, t->dtype_name);
                goto done;
            }
            if (st_writer_add(w, t->name, t->dtype, t->ndim, t->shape, t->data) ||
                note_output(job, t->name, shard, t->bytes)) {
                snprintf(job->err, sizeof job->err, "tensor '%s': cannot copy (out of memory)", t->name);
                goto done;
            }
            /* A linear layer left in float is what exclude_modules lists (embeddings are not
             * linear layers). */
            size_t len = strlen(t->name);
            if (is_float(t) && t->ndim == 2 && len > 7 && strcmp(t->name + len - 7, ".weight") == 0 &&
                strstr(t->name, "embed") == NULL && list_add(&job->exclude, t->name, len - 7)) {
                snprintf(job->err, sizeof job->err, "out of memory");
                goto done;
            }
        }
        job->bytes_done += t->bytes;
        if (job->o->progress != NULL) job->o->progress(job->o->user, t->name, job->bytes_done, job->bytes_total);
    }
    if (st_writer_write(w, out_file, job->err, sizeof job->err) == 0) rc = 0;
done:
    st_writer_destroy(w);
    job_release(job);
    return rc;
}

typedef struct index_pair {
    char *name, *shard;
} index_pair;

static int compare_pairs(const void *a, const void *b)
{
    return strcmp(((const index_pair *)a)->name, ((const index_pair *)b)->name);
}

static char *path_join(const char *a, const char *b)
{
    size_t n = strlen(a) + strlen(b) + 1;
    char *p = malloc(n);
    if (p != NULL) snprintf(p, n, "%s%s", a, b);
    return p;
}

/* 1 when both paths exist and are the same file or folder. */
static int same_place(const char *a, const char *b)
{
    char ra[PATH_MAX], rb[PATH_MAX];
    return realpath(a, ra) != NULL && realpath(b, rb) != NULL && strcmp(ra, rb) == 0;
}

static int run(quantize_job *job, const char *in_path, const char *out_path)
{
    const fp4moe_checkpoint *ckpt = job->ckpt;
    const fp4moe_quantize_options *o = job->o;
    struct stat sb;
    const int in_dir = stat(in_path, &sb) == 0 && S_ISDIR(sb.st_mode);
    char *out_dir = NULL, *in_config = NULL, *index_in = NULL;
    int rc = -1;
    if (same_place(in_path, out_path)) {
        snprintf(job->err, sizeof job->err, "%s: the output would overwrite the input", out_path);
        return -1;
    }
    if (in_dir) {
        if (mkdir(out_path, 0777) != 0 && errno != EEXIST) {
            snprintf(job->err, sizeof job->err, "%s: %s", out_path, strerror(errno));
            return -1;
        }
        if (stat(out_path, &sb) != 0 || !S_ISDIR(sb.st_mode)) {
            snprintf(job->err, sizeof job->err, "%s: not a folder (the input is a folder)", out_path);
            return -1;
        }
        out_dir = path_join(out_path, out_path[strlen(out_path) - 1] == '/' ? "" : "/");
    } else {
        const char *slash = strrchr(out_path, '/');
        out_dir = slash != NULL ? malloc((size_t)(slash - out_path) + 2) : path_join("", "./");
        if (out_dir != NULL && slash != NULL) {
            memcpy(out_dir, out_path, (size_t)(slash - out_path) + 1);
            out_dir[slash - out_path + 1] = '\0';
        }
    }
    in_config = path_join(ckpt->dir, "config.json");
    index_in = path_join(ckpt->dir, "model.safetensors.index.json");
    if (out_dir == NULL || in_config == NULL || index_in == NULL) {
        snprintf(job->err, sizeof job->err, "out of memory");
        goto done;
    }
    const int have_index = in_dir && stat(index_in, &sb) == 0;
    const int have_config = stat(in_config, &sb) == 0 && !same_place(ckpt->dir, out_dir);
    if (o->input_scales_path != NULL && st_open(o->input_scales_path, &job->input_scales, job->err, sizeof job->err))
        goto done;
    if (o->calibration_path != NULL &&
        ckpt_calibrate(ckpt, o->calibration_path, &job->calibration, job->err, sizeof job->err))
        goto done;
    for (int64_t i = 0; i < ckpt->entry_count; i++) job->bytes_total += ckpt->entries[i].tensor->bytes;
    for (int s = 0; s < ckpt->shard_count; s++) {
        char *out_file = in_dir ? path_join(out_dir, ckpt->shard_names[s]) : path_join(out_path, "");
        if (out_file == NULL) {
            snprintf(job->err, sizeof job->err, "out of memory");
            goto done;
        }
        int r = quantize_shard(job, s, out_file);
        free(out_file);
        if (r != 0) goto done;
    }
    if (have_index) {
        char *index_out = path_join(out_dir, "model.safetensors.index.json");
        const int64_t n = job->index_names.count;
        index_pair *pairs = malloc((size_t)(n + 1) * sizeof(index_pair));
        char **names = malloc((size_t)(2 * n + 1) * sizeof(char *));
        int r = -1;
        if (index_out != NULL && pairs != NULL && names != NULL) {
            for (int64_t i = 0; i < n; i++)
                pairs[i] = (index_pair){job->index_names.items[i], job->index_shards.items[i]};
            qsort(pairs, (size_t)n, sizeof(index_pair), compare_pairs); /* as Hugging Face writes it */
            for (int64_t i = 0; i < n; i++) {
                names[i] = pairs[i].name;
                names[n + i] = pairs[i].shard;
            }
            r = ckpt_write_index(index_out, (const char *const *)names, (const char *const *)(names + n), n,
                                 job->bytes_written, job->err, sizeof job->err);
        } else {
            snprintf(job->err, sizeof job->err, "out of memory");
        }
        free(index_out);
        free(pairs);
        free(names);
        if (r != 0) goto done;
    }
    if (ckpt_write_quant_configs(out_dir, have_config ? in_config : NULL,
                                 (const char *const *)job->exclude.items, (int)job->exclude.count,
                                 job->err, sizeof job->err))
        goto done;
    rc = 0;
done:
    free(out_dir);
    free(in_config);
    free(index_in);
    return rc;
}

fp4moe_status fp4moe_checkpoint_quantize(fp4moe_context *ctx, const char *in_path,
                                         const char *out_path,
                                         const fp4moe_quantize_options *options)
{
    static const char fn[] = "fp4moe_checkpoint_quantize";
    fp4moe_clear_error(ctx);
    if (in_path == NULL || out_path == NULL || out_path[0] == '\0')
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: %s is NULL or empty", fn,
                           in_path == NULL ? "in_path" : "out_path");
    fp4moe_quantize_options defaults;
    fp4moe_quantize_options_init(&defaults);
    const fp4moe_quantize_options *o = options != NULL ? options : &defaults;
    if (!(o->input_scale >= 0) || !isfinite(o->input_scale))
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: input_scale %g must be finite and >= 0",
                           fn, (double)o->input_scale);
    fp4moe_checkpoint *ckpt = NULL;
    fp4moe_status status = fp4moe_checkpoint_open(ctx, in_path, &ckpt);
    if (status != FP4MOE_SUCCESS) return status;
    quantize_job *job = calloc(1, sizeof *job);
    if (job == NULL) {
        fp4moe_checkpoint_close(ckpt);
        return fp4moe_fail(ctx, FP4MOE_ERROR_OUT_OF_MEMORY, "%s: out of memory", fn);
    }
    job->ctx = ctx;
    job->ckpt = ckpt;
    job->o = o;
    if (run(job, in_path, out_path) != 0)
        status = fp4moe_fail(ctx, strstr(job->err, "out of memory") ? FP4MOE_ERROR_OUT_OF_MEMORY
                                                                       : FP4MOE_ERROR_INVALID_ARGUMENT,
                             "%s: %s", fn, job->err);
    job_release(job);
    free(job->owned);
    st_close(job->input_scales);
    ckpt_calibration_free(&job->calibration);
    list_free(&job->exclude);
    list_free(&job->index_names);
    list_free(&job->index_shards);
    free(job);
    fp4moe_checkpoint_close(ckpt);
    return status;
}
