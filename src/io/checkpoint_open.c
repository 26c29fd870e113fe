/* Opening a checkpoint from the file system (a folder or one file) and the read-only queries of
 * the public API: summary, problems, layers. */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/context.h"
#include "io/checkpoint.h"

int ckpt_read_text_file(const char *path, size_t max_bytes, char **text, size_t *len, char *err,
                        size_t err_bytes)
{
    *text = NULL;
    *len = 0;
    if (err_bytes > 0) err[0] = '\0';
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        if (errno == ENOENT) return 1;
        snprintf(err, err_bytes, "%s: %s", path, strerror(errno));
        return -1;
    }
    char *buf = malloc(max_bytes + 1);
    size_t n = buf != NULL ? fread(buf, 1, max_bytes + 1, f) : 0;
    int failed = buf == NULL || ferror(f);
    fclose(f);
    if (failed || n > max_bytes) {
        snprintf(err, err_bytes, "%s: %s", path,
                 buf == NULL ? "out of memory" : failed ? "read error" : "file too large");
        free(buf);
        return -1;
    }
    buf[n] = '\0';
    *text = buf;
    *len = n;
    return 0;
}

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

static int compare_strings(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static char *join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 1;
    char *p = malloc(n);
    if (p != NULL) snprintf(p, n, "%s%s", dir, name);
    return p;
}

/* Shard file names of a folder without an index: every *.safetensors file, sorted. */
static int list_shards(const char *dir, char ***names, int *count, char *err, size_t err_bytes)
{
    DIR *d = opendir(dir);
    if (d == NULL) {
        snprintf(err, err_bytes, "%s: %s", dir, strerror(errno));
        return -1;
    }
    int capacity = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (!ends_with(e->d_name, ".safetensors") || e->d_name[0] == '.') continue;
        if (*count == capacity) {
            capacity = capacity ? 2 * capacity : 8;
            char **grown = capacity <= CKPT_MAX_SHARDS ? realloc(*names, (size_t)capacity * sizeof(char *)) : NULL;
            if (grown == NULL) break;
            *names = grown;
        }
        if (((*names)[*count] = join("", e->d_name)) == NULL) break;
        (*count)++;
    }
    closedir(d);
    if (e != NULL) {
        snprintf(err, err_bytes, "%s: out of memory listing the shards", dir);
        return -1;
    }
    if (*count == 0) {
        snprintf(err, err_bytes, "%s: no .safetensors file", dir);
        return -1;
    }
    qsort(*names, (size_t)*count, sizeof(char *), compare_strings);
    return 0;
}

static int open_from_path(fp4moe_checkpoint *ckpt, const char *path, char *err, size_t err_bytes)
{
    struct stat sb;
    if (stat(path, &sb) != 0) {
        snprintf(err, err_bytes, "%s: %s", path, strerror(errno));
        return -1;
    }
    ckpt_index index;
    memset(&index, 0, sizeof index);
    int have_index = 0;
    char *config = NULL, *quant = NULL;
    size_t config_len = 0, quant_len = 0;
    int rc = -1;
    if (S_ISDIR(sb.st_mode)) {
        ckpt->dir = join(path, ends_with(path, "/") ? "" : "/");
        if (ckpt->dir == NULL) goto oom;
        char *index_path = join(ckpt->dir, "model.safetensors.index.json");
        if (index_path == NULL) goto oom;
        char *text = NULL;
        size_t len = 0;
        int r = ckpt_read_text_file(index_path, CKPT_MAX_INDEX_BYTES, &text, &len, err, err_bytes);
        if (r == 0) {
            r = ckpt_parse_index(text, len, &index, err, err_bytes);
            if (r != 0) {
                /* Name the file: the parser only knows its role. */
                char inner[400];
                snprintf(inner, sizeof inner, "%s", err);
                snprintf(err, err_bytes, "%s%s", ckpt->dir, inner);
            }
            have_index = r == 0;
        }
        free(text);
        free(index_path);
        if (r < 0) goto done;
        if (have_index) {
            ckpt->shard_names = calloc((size_t)index.shard_count + 1, sizeof(char *));
            if (ckpt->shard_names == NULL) goto oom;
            for (int s = 0; s < index.shard_count; s++) {
                if ((ckpt->shard_names[s] = join("", index.shard_names[s])) == NULL) goto oom;
                ckpt->shard_count = s + 1;
            }
        } else if (list_shards(ckpt->dir, &ckpt->shard_names, &ckpt->shard_count, err, err_bytes)) {
            goto done;
        }
    } else {
        const char *slash = strrchr(path, '/');
        size_t dir_len = slash != NULL ? (size_t)(slash - path) + 1 : 0;
        ckpt->dir = malloc(dir_len + 3);
        ckpt->shard_names = malloc(sizeof(char *));
        if (ckpt->dir == NULL || ckpt->shard_names == NULL) goto oom;
        memcpy(ckpt->dir, path, dir_len);
        ckpt->dir[dir_len] = '\0';
        if (dir_len == 0) strcpy(ckpt->dir, "./");
        if ((ckpt->shard_names[0] = join("", path + dir_len)) == NULL) goto oom;
        ckpt->shard_count = 1;
    }
    ckpt->shards = calloc((size_t)ckpt->shard_count, sizeof(st_file *));
    if (ckpt->shards == NULL) goto oom;
    for (int s = 0; s < ckpt->shard_count; s++) {
        char *shard_path = join(ckpt->dir, ckpt->shard_names[s]);
        if (shard_path == NULL) goto oom;
        int r = st_open(shard_path, &ckpt->shards[s], err, err_bytes);
        free(shard_path);
        if (r != 0) goto done;
    }
    char *config_path = join(ckpt->dir, "config.json");
    char *quant_path = join(ckpt->dir, "hf_quant_config.json");
    int rc1 = config_path ? ckpt_read_text_file(config_path, CKPT_MAX_CONFIG_BYTES, &config, &config_len, err, err_bytes) : -1;
    int rc2 = rc1 >= 0 && quant_path ? ckpt_read_text_file(quant_path, CKPT_MAX_CONFIG_BYTES, &quant, &quant_len, err, err_bytes) : -1;
    free(config_path);
    free(quant_path);
    if (rc1 < 0 || rc2 < 0) {
        if (err_bytes > 0 && err[0] == '\0') snprintf(err, err_bytes, "out of memory");
        goto done;
    }
    if (ckpt_assemble(ckpt, config, config_len, quant, quant_len, have_index ? &index : NULL, err,
                      err_bytes) != 0) {
        if (strncmp(err, "config.json", 11) == 0 || strncmp(err, "hf_quant_config.json", 20) == 0) {
            char inner[400];
            snprintf(inner, sizeof inner, "%s", err);
            snprintf(err, err_bytes, "%s%s", ckpt->dir, inner);
        }
        goto done;
    }
    rc = 0;
    goto done;
oom:
    snprintf(err, err_bytes, "out of memory opening %s", path);
done:
    free(config);
    free(quant);
    ckpt_index_free(&index);
    return rc;
}

fp4moe_status fp4moe_checkpoint_open(fp4moe_context *ctx, const char *path, fp4moe_checkpoint **out)
{
    static const char fn[] = "fp4moe_checkpoint_open";
    fp4moe_clear_error(ctx);
    if (out == NULL) return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: out is NULL", fn);
    *out = NULL;
    if (path == NULL) return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: path is NULL", fn);
    fp4moe_checkpoint *ckpt = calloc(1, sizeof *ckpt);
    if (ckpt == NULL) return fp4moe_fail(ctx, FP4MOE_ERROR_OUT_OF_MEMORY, "%s: out of memory", fn);
    char err[FP4MOE_MESSAGE_BYTES - 32];
    err[0] = '\0';
    if (open_from_path(ckpt, path, err, sizeof err) != 0) {
        ckpt_free(ckpt);
        return fp4moe_fail(ctx, strstr(err, "out of memory") ? FP4MOE_ERROR_OUT_OF_MEMORY
                                                                : FP4MOE_ERROR_CORRUPT_DATA,
                           "%s: %s", fn, err);
    }
    *out = ckpt;
    return FP4MOE_SUCCESS;
}

void fp4moe_checkpoint_close(fp4moe_checkpoint *ckpt)
{
    ckpt_free(ckpt);
}

fp4moe_status fp4moe_checkpoint_get_summary(const fp4moe_checkpoint *ckpt,
                                            fp4moe_checkpoint_summary *out)
{
    if (ckpt == NULL || out == NULL) return FP4MOE_ERROR_INVALID_ARGUMENT;
    out->model_type = ckpt->model.model_type;
    out->quant_algo = ckpt->quant.quant_algo;
    out->quant_source = ckpt->quant.source;
    out->group_size = ckpt->quant.group_size;
    out->num_shards = ckpt->shard_count;
    out->num_tensors = ckpt->entry_count;
    out->num_layers = ckpt->layer_count;
    out->num_problems = ckpt->problem_count;
    out->num_exclude_modules = ckpt->quant.exclude_count;
    return FP4MOE_SUCCESS;
}

const char *fp4moe_checkpoint_problem(const fp4moe_checkpoint *ckpt, int32_t index)
{
    if (ckpt == NULL || index < 0 || index >= ckpt->problem_count) return NULL;
    return ckpt->problems[index];
}

const char *fp4moe_checkpoint_exclude_module(const fp4moe_checkpoint *ckpt, int32_t index)
{
    if (ckpt == NULL || index < 0 || index >= ckpt->quant.exclude_count) return NULL;
    return ckpt->quant.exclude_modules[index];
}

fp4moe_status fp4moe_checkpoint_get_layer(fp4moe_context *ctx, const fp4moe_checkpoint *ckpt,
                                          int32_t index, fp4moe_checkpoint_layer_info *out)
{
    static const char fn[] = "fp4moe_checkpoint_get_layer";
    fp4moe_clear_error(ctx);
    if (ckpt == NULL || out == NULL)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: %s is NULL", fn,
                           ckpt == NULL ? "ckpt" : "out");
    if (index < 0 || index >= ckpt->layer_count)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: index %d outside [0, %d)", fn,
                           (int)index, ckpt->layer_count);
    const ckpt_layer *L = &ckpt->layers[index];
    memset(out, 0, sizeof *out);
    out->layer = L->layer;
    out->prefix = L->prefix;
    out->naming = !L->gated ? "up_down_proj" : L->naming == CKPT_NAMING_W ? "w1_w3_w2" : "gate_up_down_proj";
    out->config = L->config;
    out->quantized = L->quantized;
    out->weight_dtype = L->weight_dtype;
    out->has_input_scales = L->has_input_scales;
    out->split_gate_up_scale = L->split_gate_up_scale;
    out->has_router = L->router != NULL;
    out->router_dtype = L->router != NULL ? L->router->dtype : FP4MOE_DTYPE_F32;
    out->has_routing_bias = L->bias != NULL;
    out->num_problems = L->num_problems;
    return FP4MOE_SUCCESS;
}

fp4moe_status fp4moe_checkpoint_find_layer(fp4moe_context *ctx, const fp4moe_checkpoint *ckpt,
                                           int64_t layer, int32_t *index)
{
    static const char fn[] = "fp4moe_checkpoint_find_layer";
    fp4moe_clear_error(ctx);
    if (ckpt == NULL || index == NULL)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "%s: %s is NULL", fn,
                           ckpt == NULL ? "ckpt" : "index");
    for (int i = 0; i < ckpt->layer_count; i++) {
        if (ckpt->layers[i].layer == layer) {
            *index = i;
            return FP4MOE_SUCCESS;
        }
    }
    char list[256] = "";
    size_t n = 0;
    for (int i = 0; i < ckpt->layer_count && n + 24 < sizeof list; i++)
        n += (size_t)snprintf(list + n, sizeof list - n, "%s%lld", i ? "," : "", (long long)ckpt->layers[i].layer);
    return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                       "%s: no MoE layer %lld in the checkpoint (MoE layers: %s)", fn, (long long)layer,
                       ckpt->layer_count ? list : "none");
}
