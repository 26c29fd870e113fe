/* fp4moe info: what a checkpoint holds (MoE layers, shapes, formats, routing attributes from
 * config.json, the quantisation config) and every inconsistency found, by tensor name. Exits 1
 * when there are problems, so scripts can gate on it. */
#include <stdio.h>
#include <string.h>

#include "commands.h"
#include "fp4moe_checkpoint.h"
#include "io/layer_json.h"
#include "io/safetensors.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: fp4moe info DIR|FILE\n"
            "Lists the MoE layers of a Hugging Face checkpoint folder (config.json,\n"
            "hf_quant_config.json, safetensors shards with or without an index) or of one\n"
            ".safetensors file: shapes, weight format (NVFP4 as ModelOpt exports it, or float),\n"
            "routing attributes from config.json, the quantisation config, and every problem\n"
            "found, by tensor name. Exit status 1 when there are problems.\n");
}

static void print_layer(const fp4moe_checkpoint_layer_info *li)
{
    const fp4moe_config *c = &li->config;
    const char *act = activation_name(c->activation);
    printf("layer %lld (%s): %lld experts, top-k %s%d, hidden %lld, intermediate %lld, %s, %s\n",
           (long long)li->layer, li->prefix, (long long)c->num_experts,
           c->top_k ? "" : "unknown ", c->top_k, (long long)c->hidden_size,
           (long long)c->intermediate_size, act ? act : "unsupported activation", li->naming);
    if (li->quantized)
        printf("  weights: NVFP4 (U8 values, F8_E4M3 block scales, F32 weight_scale_2)%s%s\n",
               li->has_input_scales ? ", input_scale: yes (W4A4 possible)" : ", input_scale: no",
               li->split_gate_up_scale ? ", gate/up weight_scale_2 differ (kept per half)" : "");
    else
        printf("  weights: %s, not quantised (fp4moe quantize makes NVFP4)\n", st_dtype_name(li->weight_dtype));
    printf("  routing: %s", routing_name(c->routing));
    if (c->routing == FP4MOE_ROUTING_DEEPSEEK_V3)
        printf(" (n_group %d, topk_group %d, norm_topk_prob %s, routed_scaling_factor %g)", c->n_group,
               c->topk_group, c->norm_topk_prob ? "true" : "false", (double)c->routed_scaling_factor);
    printf("\n  router: %s%s%s, e_score_correction_bias: %s\n", li->has_router ? li->prefix : "none",
           li->has_router ? ".gate.weight " : "", li->has_router ? st_dtype_name(li->router_dtype) : "",
           li->has_routing_bias ? "yes" : "no");
    if (li->num_problems) printf("  problems: %d (listed below)\n", li->num_problems);
}

int cmd_info(int argc, char **argv)
{
    if (argc == 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
        usage(stdout);
        return 0;
    }
    if (argc != 2) {
        usage(stderr);
        return 2;
    }
    fp4moe_context *ctx = cli_create_context(FP4MOE_BACKEND_CPU, 1);
    if (ctx == NULL) return 1;
    fp4moe_checkpoint *ckpt = NULL;
    if (fp4moe_checkpoint_open(ctx, argv[1], &ckpt) != FP4MOE_SUCCESS) {
        fprintf(stderr, "fp4moe info: %s\n", fp4moe_last_error(ctx));
        fp4moe_context_destroy(ctx);
        return 1;
    }
    fp4moe_checkpoint_summary s;
    fp4moe_checkpoint_get_summary(ckpt, &s);
    printf("checkpoint: %s (%d shard%s, %lld tensors)\n", argv[1], s.num_shards,
           s.num_shards == 1 ? "" : "s", (long long)s.num_tensors);
    printf("model_type: %s\n", s.model_type[0] ? s.model_type : "unknown (no config.json)");
    if (s.quant_algo[0]) {
        printf("quantization: %s (%s)", s.quant_algo, s.quant_source);
        if (s.group_size) printf(", group_size %lld", (long long)s.group_size);
        printf(", exclude_modules: %d", s.num_exclude_modules);
        for (int i = 0; i < s.num_exclude_modules && i < 6; i++)
            printf("%s%s", i ? ", " : " (", fp4moe_checkpoint_exclude_module(ckpt, i));
        printf("%s\n", s.num_exclude_modules > 6 ? ", ...)" : s.num_exclude_modules ? ")" : "");
    } else {
        printf("quantization: none declared\n");
    }
    printf("MoE layers: %d\n", s.num_layers);
    for (int i = 0; i < s.num_layers; i++) {
        fp4moe_checkpoint_layer_info li;
        if (fp4moe_checkpoint_get_layer(ctx, ckpt, i, &li) == FP4MOE_SUCCESS) print_layer(&li);
    }
    printf("problems: %d\n", s.num_problems);
    for (int i = 0; i < s.num_problems; i++) printf("  %s\n", fp4moe_checkpoint_problem(ckpt, i));
    fp4moe_checkpoint_close(ckpt);
    fp4moe_context_destroy(ctx);
    return s.num_problems > 0 ? 1 : 0;
}
