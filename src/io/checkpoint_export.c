/* The JSON files written beside a quantised checkpoint: hf_quant_config.json, config.json with
 * its quantization_config, and model.safetensors.index.json. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "io/checkpoint.h"

static int write_json(const char *path, cJSON *root, char *err, size_t err_bytes)
{
    char *text = cJSON_Print(root);
    if (text == NULL) {
        snprintf(err, err_bytes, "%s: out of memory", path);
        return -1;
    }
    FILE *f = fopen(path, "wb");
    int ok = f != NULL && fputs(text, f) >= 0 && fputc('\n', f) != EOF;
    if (f != NULL && fclose(f) != 0) ok = 0;
    free(text);
    if (!ok) snprintf(err, err_bytes, "%s: cannot write", path);
    return ok ? 0 : -1;
}

/* The quantisation block shared by both files. */
static cJSON *quant_block(const char *const *exclude, int exclude_count, int with_method)
{
    cJSON *q = cJSON_CreateObject();
    if (q == NULL) return NULL;
    int ok = 1;
    if (with_method) ok &= cJSON_AddStringToObject(q, "quant_method", "modelopt") != NULL;
    ok &= cJSON_AddStringToObject(q, "quant_algo", "NVFP4") != NULL;
    ok &= cJSON_AddNullToObject(q, "kv_cache_quant_algo") != NULL;
    ok &= cJSON_AddNumberToObject(q, "group_size", 16) != NULL;
    cJSON *list = cJSON_AddArrayToObject(q, "exclude_modules");
    ok &= list != NULL;
    for (int i = 0; ok && i < exclude_count; i++) {
        cJSON *s = cJSON_CreateString(exclude[i]);
        ok &= s != NULL && cJSON_AddItemToArray(list, s);
    }
    if (!ok) {
        cJSON_Delete(q);
        return NULL;
    }
    return q;
}

int ckpt_write_quant_configs(const char *out_dir, const char *in_config_path,
                             const char *const *exclude, int exclude_count, char *err,
                             size_t err_bytes)
{
    char path[4096];
    cJSON *root = cJSON_CreateObject();
    cJSON *producer = cJSON_AddObjectToObject(root, "producer");
    cJSON *q = quant_block(exclude, exclude_count, 0);
    int ok = root != NULL && producer != NULL && q != NULL &&
             cJSON_AddStringToObject(producer, "name", "fp4moe") != NULL &&
             cJSON_AddStringToObject(producer, "version", "0.1.0") != NULL;
    if (ok) {
        cJSON_AddItemToObject(root, "quantization", q);
        q = NULL;
    }
    cJSON_Delete(q);
    snprintf(path, sizeof path, "%shf_quant_config.json", out_dir);
    int rc = ok ? write_json(path, root, err, err_bytes) : -1;
    if (!ok) snprintf(err, err_bytes, "hf_quant_config.json: out of memory");
    cJSON_Delete(root);
    if (rc != 0 || in_config_path == NULL) return rc;

    /* config.json: the input's, with quantization_config (what newer exports carry) set. */
    char *text = NULL;
    size_t len = 0;
    int r = ckpt_read_text_file(in_config_path, CKPT_MAX_CONFIG_BYTES, &text, &len, err, err_bytes);
    if (r != 0) {
        free(text);
        return r < 0 ? -1 : 0;
    }
    cJSON *config = ckpt_parse_json(text, len, in_config_path, err, err_bytes);
    free(text);
    if (config == NULL) return -1;
    cJSON_DeleteItemFromObjectCaseSensitive(config, "quantization_config");
    q = quant_block(exclude, exclude_count, 1);
    if (q == NULL || !cJSON_AddItemToObject(config, "quantization_config", q)) {
        cJSON_Delete(q);
        cJSON_Delete(config);
        snprintf(err, err_bytes, "config.json: out of memory");
        return -1;
    }
    snprintf(path, sizeof path, "%sconfig.json", out_dir);
    rc = write_json(path, config, err, err_bytes);
    cJSON_Delete(config);
    return rc;
}

int ckpt_write_index(const char *path, const char *const *names, const char *const *shards,
                     int64_t count, uint64_t total_bytes, char *err, size_t err_bytes)
{
    cJSON *root = cJSON_CreateObject();
    cJSON *meta = cJSON_AddObjectToObject(root, "metadata");
    cJSON *map = cJSON_AddObjectToObject(root, "weight_map");
    int ok = root != NULL && meta != NULL && map != NULL &&
             cJSON_AddNumberToObject(meta, "total_size", (double)total_bytes) != NULL;
    for (int64_t i = 0; ok && i < count; i++) ok = cJSON_AddStringToObject(map, names[i], shards[i]) != NULL;
    int rc = ok ? write_json(path, root, err, err_bytes) : -1;
    if (!ok) snprintf(err, err_bytes, "%s: out of memory", path);
    cJSON_Delete(root);
    return rc;
}
