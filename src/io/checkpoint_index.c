/* The shard set of a checkpoint: model.safetensors.index.json, one name lookup over all shards,
 * the problems list, and the assembly of the parsed parts (shared by the file opener and the
 * fuzz target). */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "io/checkpoint.h"
#include "io/io_error.h"

void ckpt_index_free(ckpt_index *x)
{
    for (int64_t i = 0; i < x->tensor_count; i++) free(x->tensor_names[i]);
    for (int i = 0; i < x->shard_count; i++) free(x->shard_names[i]);
    free(x->tensor_names);
    free(x->tensor_shard);
    free(x->shard_names);
    memset(x, 0, sizeof *x);
}

/* A shard is named relative to the folder: no directories, so an index cannot reach outside. */
static int valid_shard_name(const char *s)
{
    size_t n = strlen(s);
    return n > 0 && n < CKPT_MAX_NAME && strchr(s, '/') == NULL && strchr(s, '\\') == NULL &&
           strcmp(s, ".") != 0 && strcmp(s, "..") != 0;
}

static int compare_strings(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int ckpt_parse_index(const char *text, size_t len, ckpt_index *x, char *err, size_t err_bytes)
{
    static const char what[] = "model.safetensors.index.json";
    memset(x, 0, sizeof *x);
    cJSON *root = ckpt_parse_json(text, len, what, err, err_bytes);
    if (root == NULL) return -1;
    int rc = -1;
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!cJSON_IsObject(map)) {
        io_fail(-1, err, err_bytes, "%s: no \"weight_map\" object", what);
        goto done;
    }
    int n = cJSON_GetArraySize(map);
    x->tensor_names = calloc((size_t)n + 1, sizeof(char *));
    x->tensor_shard = calloc((size_t)n + 1, sizeof(int));
    char **files = calloc((size_t)n + 1, sizeof(char *)); /* borrowed from the JSON */
    if (x->tensor_names == NULL || x->tensor_shard == NULL || files == NULL) {
        free(files);
        io_fail(-1, err, err_bytes, "%s: out of memory", what);
        goto done;
    }
    const cJSON *item;
    int count = 0;
    cJSON_ArrayForEach(item, map) {
        if (item->string == NULL || !cJSON_IsString(item) || item->valuestring == NULL ||
            !valid_shard_name(item->valuestring)) {
            io_fail(-1, err, err_bytes, "%s: weight_map entry '%.200s' must name a file of the folder",
                 what, item->string ? item->string : "");
            free(files);
            goto done;
        }
        size_t name_len = strlen(item->string) + 1;
        if ((x->tensor_names[count] = malloc(name_len)) == NULL) {
            free(files);
            io_fail(-1, err, err_bytes, "%s: out of memory", what);
            goto done;
        }
        memcpy(x->tensor_names[count], item->string, name_len);
        files[count] = item->valuestring;
        x->tensor_count = ++count;
    }
    /* Distinct shard names, sorted, then each tensor's shard by binary search. */
    char **sorted = calloc((size_t)n + 1, sizeof(char *));
    x->shard_names = calloc((size_t)n + 1, sizeof(char *));
    if (sorted == NULL || x->shard_names == NULL) {
        free(sorted);
        free(files);
        io_fail(-1, err, err_bytes, "%s: out of memory", what);
        goto done;
    }
    memcpy(sorted, files, (size_t)count * sizeof(char *));
    qsort(sorted, (size_t)count, sizeof(char *), compare_strings);
    int shards = 0;
    for (int i = 0; i < count; i++) {
        if (shards > 0 && strcmp(sorted[i], x->shard_names[shards - 1]) == 0) continue;
        if (shards >= CKPT_MAX_SHARDS) break;
        size_t l = strlen(sorted[i]) + 1;
        if ((x->shard_names[shards] = malloc(l)) == NULL) break;
        memcpy(x->shard_names[shards], sorted[i], l);
        x->shard_count = ++shards;
    }
    free(sorted);
    int ok = 1;
    for (int i = 0; i < count && ok; i++) {
        char **hit = bsearch(&files[i], x->shard_names, (size_t)shards, sizeof(char *), compare_strings);
        if (hit == NULL) ok = 0;
        else x->tensor_shard[i] = (int)(hit - x->shard_names);
    }
    free(files);
    if (!ok) {
        io_fail(-1, err, err_bytes, "%s: out of memory or more than %d shards", what, CKPT_MAX_SHARDS);
        goto done;
    }
    rc = 0;
done:
    if (rc != 0) ckpt_index_free(x);
    cJSON_Delete(root);
    return rc;
}

int ckpt_problem(fp4moe_checkpoint *ckpt, const char *format, ...)
{
    if (ckpt->problem_count >= CKPT_MAX_PROBLEMS) {
        ckpt->problems_dropped++;
        return 0;
    }
    char buf[1024];
    va_list ap;
    va_start(ap, format);
    vsnprintf(buf, sizeof buf, format, ap);
    va_end(ap);
    if (ckpt->problem_count % 64 == 0) {
        char **grown = realloc(ckpt->problems, (size_t)(ckpt->problem_count + 64) * sizeof(char *));
        if (grown == NULL) return -1;
        ckpt->problems = grown;
    }
    size_t n = strlen(buf) + 1;
    char *copy = malloc(n);
    if (copy == NULL) return -1;
    memcpy(copy, buf, n);
    ckpt->problems[ckpt->problem_count++] = copy;
    return 0;
}

static int compare_entries(const void *a, const void *b)
{
    return strcmp(((const ckpt_entry *)a)->name, ((const ckpt_entry *)b)->name);
}

const st_tensor *ckpt_find(const fp4moe_checkpoint *ckpt, const char *name)
{
    ckpt_entry key = {.name = name};
    const ckpt_entry *hit = bsearch(&key, ckpt->entries, (size_t)ckpt->entry_count,
                                    sizeof(ckpt_entry), compare_entries);
    return hit != NULL ? hit->tensor : NULL;
}

static const ckpt_entry *find_entry(const fp4moe_checkpoint *ckpt, const char *name)
{
    ckpt_entry key = {.name = name};
    return bsearch(&key, ckpt->entries, (size_t)ckpt->entry_count, sizeof(ckpt_entry),
                   compare_entries);
}

/* Index and shards must agree: a tensor listed but absent, or in another shard, or present but
 * not listed, is a problem a loader following the index would trip over. */
static int check_index(fp4moe_checkpoint *ckpt, const ckpt_index *index)
{
    for (int64_t i = 0; i < index->tensor_count; i++) {
        const ckpt_entry *e = find_entry(ckpt, index->tensor_names[i]);
        const char *listed = index->shard_names[index->tensor_shard[i]];
        if (e == NULL) {
            if (ckpt_problem(ckpt, "index: tensor '%.300s' is listed in '%.200s' but no shard has it",
                             index->tensor_names[i], listed))
                return -1;
        } else if (strcmp(ckpt->shard_names[e->shard], listed) != 0) {
            if (ckpt_problem(ckpt, "index: tensor '%.300s' is listed in '%.200s' but lies in '%.200s'",
                             index->tensor_names[i], listed, ckpt->shard_names[e->shard]))
                return -1;
        }
    }
    if (ckpt->entry_count != index->tensor_count) {
        /* Some tensor is not listed: find which, by sorting a copy of the index names. */
        char **names = malloc((size_t)index->tensor_count * sizeof(char *) + 1);
        if (names == NULL) return -1;
        memcpy(names, index->tensor_names, (size_t)index->tensor_count * sizeof(char *));
        qsort(names, (size_t)index->tensor_count, sizeof(char *), compare_strings);
        for (int64_t i = 0; i < ckpt->entry_count; i++) {
            const char *name = ckpt->entries[i].name;
            if (bsearch(&name, names, (size_t)index->tensor_count, sizeof(char *), compare_strings) == NULL &&
                ckpt_problem(ckpt, "index: tensor '%.300s' of '%.200s' is not listed in the index", name,
                             ckpt->shard_names[ckpt->entries[i].shard])) {
                free(names);
                return -1;
            }
        }
        free(names);
    }
    return 0;
}

int ckpt_assemble(fp4moe_checkpoint *ckpt, const char *config_text, size_t config_len,
                  const char *quant_text, size_t quant_len, const ckpt_index *index, char *err,
                  size_t err_bytes)
{
    if (quant_text != NULL && ckpt_parse_quant_config(quant_text, quant_len, &ckpt->quant, err, err_bytes))
        return -1;
    if (config_text != NULL) {
        /* A quantization_config in config.json is used only when there is no hf_quant_config.json. */
        ckpt_quant_config from_config;
        memset(&from_config, 0, sizeof from_config);
        if (ckpt_parse_model_config(config_text, config_len, &ckpt->model, &from_config, err, err_bytes)) {
            ckpt_quant_config_free(&from_config);
            return -1;
        }
        if (!ckpt->quant.present && from_config.present) {
            ckpt->quant = from_config;
        } else {
            if (!ckpt->quant.present && from_config.quant_algo[0]) {
                snprintf(ckpt->quant.source, sizeof ckpt->quant.source, "%s", from_config.source);
                snprintf(ckpt->quant.quant_algo, sizeof ckpt->quant.quant_algo, "%s", from_config.quant_algo);
            }
            ckpt_quant_config_free(&from_config);
        }
    } else {
        memset(&ckpt->model, 0, sizeof ckpt->model);
        ckpt->model.num_experts = ckpt->model.top_k = ckpt->model.hidden_size = -1;
        ckpt->model.moe_intermediate_size = ckpt->model.n_group = ckpt->model.topk_group = -1;
        ckpt->model.norm_topk_prob = -1;
        ckpt->model.routed_scaling_factor = NAN;
    }

    int64_t total = 0;
    for (int s = 0; s < ckpt->shard_count; s++) total += st_count(ckpt->shards[s]);
    ckpt->entries = malloc((size_t)total * sizeof(ckpt_entry) + 1);
    if (ckpt->entries == NULL) return io_fail(-1, err, err_bytes, "out of memory (%lld tensors)", (long long)total);
    for (int s = 0; s < ckpt->shard_count; s++)
        for (int i = 0; i < st_count(ckpt->shards[s]); i++) {
            const st_tensor *t = st_get(ckpt->shards[s], i);
            ckpt->entries[ckpt->entry_count++] = (ckpt_entry){t->name, t, s};
        }
    qsort(ckpt->entries, (size_t)ckpt->entry_count, sizeof(ckpt_entry), compare_entries);
    for (int64_t i = 1; i < ckpt->entry_count; i++)
        if (strcmp(ckpt->entries[i - 1].name, ckpt->entries[i].name) == 0)
            return io_fail(-1, err, err_bytes, "tensor '%.300s' is in both '%.200s' and '%.200s'",
                        ckpt->entries[i].name, ckpt->shard_names[ckpt->entries[i - 1].shard],
                        ckpt->shard_names[ckpt->entries[i].shard]);
    if (index != NULL && check_index(ckpt, index))
        return io_fail(-1, err, err_bytes, "out of memory checking the index");
    return ckpt_find_layers(ckpt, err, err_bytes);
}

void ckpt_free(fp4moe_checkpoint *ckpt)
{
    if (ckpt == NULL) return;
    for (int s = 0; s < ckpt->shard_count; s++) {
        if (ckpt->shards != NULL) st_close(ckpt->shards[s]);
        if (ckpt->shard_names != NULL) free(ckpt->shard_names[s]);
    }
    for (int i = 0; i < ckpt->problem_count; i++) free(ckpt->problems[i]);
    free(ckpt->problems);
    free(ckpt->shards);
    free(ckpt->shard_names);
    free(ckpt->entries);
    free(ckpt->layers);
    free(ckpt->dir);
    ckpt_quant_config_free(&ckpt->quant);
    free(ckpt);
}
