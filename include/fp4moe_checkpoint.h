/*
 * fp4moe checkpoints: the MoE layers of Hugging Face folders (config.json, hf_quant_config.json,
 * safetensors shards with or without model.safetensors.index.json), as NVIDIA ModelOpt exports
 * them in NVFP4, and the quantiser that turns BF16/FP16/FP32 experts into that layout.
 *
 * Tensor names (spec section 3), per MoE layer `P` (e.g. "model.layers.3.mlp") and expert j:
 *   P.experts.j.{gate_proj,up_proj,down_proj}.{weight,weight_scale,weight_scale_2,input_scale}
 *   (or w1 = gate, w3 = up, w2 = down; Nemotron-H "backbone.layers.i.mixer" has up_proj and
 *   down_proj only: non-gated), router P.gate.weight [E, H] and P.gate.e_score_correction_bias [E].
 * NVFP4 tensors: weight U8 [out, in/2] (two E2M1 per byte, low nibble first), weight_scale
 * F8_E4M3 [out, in/16], weight_scale_2 F32 scalar (= amax / (6*448), the dequantisation global
 * scale: w = e2m1 * e4m3 * weight_scale_2), input_scale F32 scalar (= activation amax / (6*448),
 * the reciprocal of fp4moe's a1/a2 quantisation scales).
 *
 * Files are memory-mapped; a layer's tensors are copied only while a plan is created.
 * Every function reports failures through its status and fp4moe_last_error(ctx).
 */
#ifndef FP4MOE_CHECKPOINT_H
#define FP4MOE_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "fp4moe.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct fp4moe_checkpoint fp4moe_checkpoint;

/* Opens a checkpoint folder or one .safetensors file (its folder's config.json and
 * hf_quant_config.json are read when present). Finds the MoE layers and checks every tensor of
 * them; inconsistencies do not fail the open, they are listed by fp4moe_checkpoint_problem.
 * Unreadable or malformed files (safetensors, JSON) fail with a message naming the file. */
fp4moe_status fp4moe_checkpoint_open(fp4moe_context *ctx, const char *path,
                                     fp4moe_checkpoint **out);
void fp4moe_checkpoint_close(fp4moe_checkpoint *ckpt); /* NULL is a no-op */

typedef struct fp4moe_checkpoint_summary {
    const char *model_type;   /* config.json "model_type", "" when unknown */
    const char *quant_algo;   /* "NVFP4", "MIXED_PRECISION", ... or "" when unquantised */
    const char *quant_source; /* "hf_quant_config.json", "config.json quantization_config", "" */
    int64_t group_size;       /* 16 for NVFP4; 0 when not given */
    int32_t num_shards;
    int64_t num_tensors;
    int32_t num_layers;        /* MoE layers found */
    int32_t num_problems;      /* see fp4moe_checkpoint_problem */
    int32_t num_exclude_modules;
} fp4moe_checkpoint_summary;

/* Pointers stay valid while the checkpoint is open. */
fp4moe_status fp4moe_checkpoint_get_summary(const fp4moe_checkpoint *ckpt,
                                            fp4moe_checkpoint_summary *out);
/* The i-th problem ("tensor 'model.layers.0.mlp.experts.3.up_proj.weight_scale': expected shape
 * [64,8] F8_E4M3, got [64,4] F8_E4M3"), NULL when i is out of range. */
const char *fp4moe_checkpoint_problem(const fp4moe_checkpoint *ckpt, int32_t index);
/* The i-th exclude_modules pattern of the quantisation config; NULL when out of range. */
const char *fp4moe_checkpoint_exclude_module(const fp4moe_checkpoint *ckpt, int32_t index);

typedef struct fp4moe_checkpoint_layer_info {
    int64_t layer;             /* L of "...layers.L..." */
    const char *prefix;        /* tensor name prefix, e.g. "model.layers.3.mlp" */
    const char *naming;        /* "gate_up_down_proj", "w1_w3_w2" or "up_down_proj" (non-gated) */
    /* E, k, H, I, activation, routing and its attributes from config.json, as
     * fp4moe_checkpoint_plan_create uses them (top_k 0 when the config does not say). */
    fp4moe_config config;
    int32_t quantized;           /* 1: NVFP4 experts; 0: unquantised float experts */
    fp4moe_dtype weight_dtype;   /* U8 when quantized, else F32 / F16 / BF16 */
    int32_t has_input_scales;    /* every projection has input_scale: W4A4 is possible */
    int32_t split_gate_up_scale; /* some expert's gate and up weight_scale_2 differ (kept both) */
    int32_t has_router;          /* P.gate.weight [E, H] present */
    fp4moe_dtype router_dtype;
    int32_t has_routing_bias;    /* P.gate.e_score_correction_bias [E] present */
    int32_t num_problems;        /* problems found in this layer's tensors */
} fp4moe_checkpoint_layer_info;

/* index: 0 .. num_layers-1, in increasing layer number. */
fp4moe_status fp4moe_checkpoint_get_layer(fp4moe_context *ctx, const fp4moe_checkpoint *ckpt,
                                          int32_t index, fp4moe_checkpoint_layer_info *out);
/* The index of the MoE layer numbered `layer` (the L of "layers.L"), or INVALID_ARGUMENT. */
fp4moe_status fp4moe_checkpoint_find_layer(fp4moe_context *ctx, const fp4moe_checkpoint *ckpt,
                                           int64_t layer, int32_t *index);

typedef struct fp4moe_checkpoint_plan_options {
    fp4moe_precision precision; /* W4A4 needs input_scale on every projection. Default W4A16 */
    int64_t max_tokens;         /* default 16384 */
    int64_t decode_threshold;   /* default 128 (fp4moe_config_init) */
    int64_t local_expert_offset; /* expert parallelism: load experts [e0, e0 + E_loc) only */
    int64_t local_num_experts;   /* 0: all from the offset */
    fp4moe_gate_up_order gate_up_order; /* how FC1 is assembled from gate and up. GATE_UP */
    int32_t top_k;               /* overrides config.json's num_experts_per_tok when > 0 */
} fp4moe_checkpoint_plan_options;

void fp4moe_checkpoint_plan_options_init(fp4moe_checkpoint_plan_options *options);

/* A plan for the MoE layer numbered `layer`: experts of the NVFP4 checkpoint assembled into the
 * canonical layout (FC1 = gate rows then up rows; weight_scale_2 -> w*_global_scale, a differing
 * up weight_scale_2 -> w1_global_scale_half2; 1/input_scale -> a1/a2_global_scale with W4A4),
 * routing bias from e_score_correction_bias. options may be NULL (defaults). Fails when the
 * layer has problems, is not NVFP4, or config.json lacks what the layer needs (top-k). */
fp4moe_status fp4moe_checkpoint_plan_create(fp4moe_context *ctx, const fp4moe_checkpoint *ckpt,
                                            int64_t layer,
                                            const fp4moe_checkpoint_plan_options *options,
                                            fp4moe_plan **out);

/* The router of layer `layer` in FP32: weight [E, H] (out: E*H floats) and the correction bias
 * [E] (FP4MOE_ERROR_INVALID_ARGUMENT when the layer has none). */
fp4moe_status fp4moe_checkpoint_router_weight(fp4moe_context *ctx, const fp4moe_checkpoint *ckpt,
                                              int64_t layer, float *out);
fp4moe_status fp4moe_checkpoint_routing_bias(fp4moe_context *ctx, const fp4moe_checkpoint *ckpt,
                                             int64_t layer, float *out);
/* Router logits [T, E] in FP32: logits[t,e] = sum_h x[t,h] * W[e,h], summed in double and rounded
 * once (DeepSeek-V3 and Nemotron-H compute their routers in FP32 too). hidden: host [T, H]. */
fp4moe_status fp4moe_checkpoint_router_logits(fp4moe_context *ctx, const fp4moe_checkpoint *ckpt,
                                              int64_t layer, int64_t num_tokens,
                                              const void *hidden, fp4moe_dtype hidden_dtype,
                                              float *logits);

/* ------------------------------------------------------------------------------------------ */
/* Quantisation of float checkpoints into the ModelOpt NVFP4 layout                           */
/* ------------------------------------------------------------------------------------------ */
typedef struct fp4moe_quantize_tensor_report {
    const char *name;       /* the source tensor, e.g. "...experts.3.up_proj.weight" */
    int64_t rows, cols;
    double amax;
    float weight_scale_2;   /* amax / (6*448) */
    float input_scale;      /* 0 when none was written */
    double rel_l2_error;    /* ||dequant(q) - w|| / ||w|| */
    double max_abs_error;
} fp4moe_quantize_tensor_report;

typedef struct fp4moe_quantize_options {
    /* Activation scales (input_scale, = amax / (6*448)), first match wins per projection:
     * input_scales_path: a safetensors file of F32 scalars named "<module>.input_scale";
     * calibration_path: a safetensors file of sample inputs, "hidden_states" [T, H] for every
     *   layer or "<P>.hidden_states" for layer prefix P; FC1's input_scale from amax(x), FC2's
     *   from amax of the activation output of each expert over all tokens (every expert sees
     *   every token, as ModelOpt calibrates MoE layers);
     * input_scale > 0: that value for every projection. Otherwise no input_scale is written. */
    const char *input_scales_path;
    const char *calibration_path;
    float input_scale;
    /* Called after every tensor written (progress) and after every quantised one (report). */
    void (*progress)(void *user, const char *tensor, uint64_t bytes_done, uint64_t bytes_total);
    void (*report)(void *user, const fp4moe_quantize_tensor_report *report);
    void *user;
} fp4moe_quantize_options;

void fp4moe_quantize_options_init(fp4moe_quantize_options *options);

/* Quantises every expert projection weight (2-D float tensors named as above) of in_path (a
 * folder or one .safetensors file) to NVFP4 with ModelOpt's algorithm and naming; every other
 * tensor is copied unchanged. A folder gives a folder (same shard names, a new index); a file
 * gives a file. hf_quant_config.json (quant_algo NVFP4, group_size 16, exclude_modules) is
 * written beside the output, and config.json, when the input has one, with its
 * quantization_config. */
fp4moe_status fp4moe_checkpoint_quantize(fp4moe_context *ctx, const char *in_path,
                                         const char *out_path,
                                         const fp4moe_quantize_options *options);

#ifdef __cplusplus
}
#endif
#endif /* FP4MOE_CHECKPOINT_H */
