/* libFuzzer target: the checkpoint reader on arbitrary bytes. The input is split at NUL bytes
 * into config.json, hf_quant_config.json, model.safetensors.index.json and one safetensors shard
 * (any part may be empty or missing), assembled as fp4moe_checkpoint_open would from files, then
 * every layer is queried and the clean NVFP4 ones are turned into plans and routed. Beyond the
 * sanitizers' checks: errors must be NUL-terminated, problems and layers consistent. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fp4moe_checkpoint.h"
#include "io/checkpoint.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void exercise_layers(const fp4moe_checkpoint *ckpt)
{
    fp4moe_context_options options;
    fp4moe_context_options_init(&options);
    options.backend = FP4MOE_BACKEND_CPU;
    options.num_threads = 1;
    fp4moe_context *ctx = NULL;
    if (fp4moe_context_create(&options, &ctx) != FP4MOE_SUCCESS) abort();
    fp4moe_checkpoint_summary s;
    if (fp4moe_checkpoint_get_summary(ckpt, &s) != FP4MOE_SUCCESS || s.num_layers != ckpt->layer_count) abort();
    for (int i = 0; i < s.num_problems; i++)
        if (fp4moe_checkpoint_problem(ckpt, i) == NULL) abort();
    for (int i = 0; i < s.num_exclude_modules; i++)
        if (fp4moe_checkpoint_exclude_module(ckpt, i) == NULL) abort();
    for (int i = 0; i < s.num_layers; i++) {
        fp4moe_checkpoint_layer_info li;
        if (fp4moe_checkpoint_get_layer(ctx, ckpt, i, &li) != FP4MOE_SUCCESS) abort();
        int32_t found;
        if (fp4moe_checkpoint_find_layer(ctx, ckpt, li.layer, &found) != FP4MOE_SUCCESS) abort();
        fp4moe_checkpoint_plan_options po;
        fp4moe_checkpoint_plan_options_init(&po);
        po.top_k = 1;
        po.max_tokens = 2;
        fp4moe_plan *plan = NULL;
        fp4moe_status st = fp4moe_checkpoint_plan_create(ctx, ckpt, li.layer, &po, &plan);
        if (st == FP4MOE_SUCCESS && (li.num_problems != 0 || !li.quantized)) abort();
        if (st != FP4MOE_SUCCESS && (plan != NULL || fp4moe_last_error(ctx)[0] == '\0')) abort();
        if (plan != NULL && li.has_router) {
            float *hidden = calloc((size_t)li.config.hidden_size, sizeof(float));
            float *logits = malloc((size_t)li.config.num_experts * sizeof(float));
            if (hidden != NULL && logits != NULL) {
                hidden[0] = 1.0f;
                if (fp4moe_checkpoint_router_logits(ctx, ckpt, li.layer, 1, hidden, FP4MOE_DTYPE_F32,
                                                    logits) != FP4MOE_SUCCESS)
                    abort();
            }
            free(hidden);
            free(logits);
        }
        fp4moe_plan_destroy(plan);
    }
    fp4moe_context_destroy(ctx);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *part[4] = {NULL, NULL, NULL, NULL};
    size_t len[4] = {0, 0, 0, 0};
    size_t start = 0;
    for (int p = 0; p < 4 && start <= size; p++) {
        const uint8_t *nul = p < 3 ? memchr(data + start, 0, size - start) : NULL;
        size_t end = nul != NULL ? (size_t)(nul - data) : size;
        part[p] = (const char *)data + start;
        len[p] = end - start;
        start = end + 1;
        if (nul == NULL) break;
    }
    fp4moe_checkpoint *ckpt = calloc(1, sizeof *ckpt);
    if (ckpt == NULL) return 0;
    char err[256];
    err[0] = '\0';
    ckpt->shards = calloc(1, sizeof(st_file *));
    ckpt->shard_names = calloc(1, sizeof(char *));
    static const char shard_name[] = "model.safetensors";
    if (ckpt->shards == NULL || ckpt->shard_names == NULL) {
        ckpt_free(ckpt);
        return 0;
    }
    ckpt_index index;
    memset(&index, 0, sizeof index);
    int have_index = part[2] != NULL && len[2] > 0;
    int rc = 0;
    /* Without a fourth part the checkpoint has no shard: the configuration files alone. */
    if (part[3] != NULL) {
        if ((ckpt->shard_names[0] = malloc(sizeof shard_name)) == NULL) {
            ckpt_free(ckpt);
            return 0;
        }
        memcpy(ckpt->shard_names[0], shard_name, sizeof shard_name);
        ckpt->shard_count = 1;
        rc = st_parse(part[3], len[3], &ckpt->shards[0], err, sizeof err);
    }
    if (rc == 0 && have_index) rc = ckpt_parse_index(part[2], len[2], &index, err, sizeof err);
    if (rc == 0)
        rc = ckpt_assemble(ckpt, len[0] ? part[0] : NULL, len[0], part[1] && len[1] ? part[1] : NULL,
                           len[1], have_index ? &index : NULL, err, sizeof err);
    if (rc != 0 && memchr(err, '\0', sizeof err) == NULL) abort();
    if (rc == 0) exercise_layers(ckpt);
    /* The glob matcher on the config's patterns against the layer prefixes. */
    for (int i = 0; rc == 0 && i < ckpt->quant.exclude_count; i++)
        for (int k = 0; k < ckpt->layer_count; k++) (void)ckpt_is_excluded(&ckpt->quant, ckpt->layers[k].prefix);
    ckpt_index_free(&index);
    ckpt_free(ckpt);
    return 0;
}
