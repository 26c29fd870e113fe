/* Internals of the checkpoint reader (include/fp4moe_checkpoint.h), shared by src/io/checkpoint_*.c:
 * the parsed configuration files, the shard set with its name lookup, the MoE layers found, and
 * the problems list. Everything parses from memory first, so the fuzz target reaches the same
 * code as the files do. */
#ifndef FP4MOE_IO_CHECKPOINT_H
#define FP4MOE_IO_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "fp4moe.h"
#include "fp4moe_checkpoint.h"
#include "io/safetensors.h"

/* config.json and hf_quant_config.json are kilobytes; an index of a 671B model is ~10 MB. */
#define CKPT_MAX_CONFIG_BYTES ((size_t)16 << 20)
#define CKPT_MAX_INDEX_BYTES ((size_t)256 << 20)
#define CKPT_MAX_NAME 512
#define CKPT_MAX_SHARDS 100000
#define CKPT_MAX_PROBLEMS 10000
#define CKPT_MAX_EXPERTS 65536

/* ------------------------------------------------------------------ config.json */
typedef struct ckpt_model_config {
    int present;
    char model_type[64];
    int64_t num_experts;           /* num_experts / n_routed_experts / num_local_experts; -1 absent */
    int64_t top_k;                 /* num_experts_per_tok; -1 absent */
    int64_t hidden_size;           /* -1 absent */
    int64_t moe_intermediate_size; /* moe_intermediate_size (or intermediate_size for Mixtral) */
    int norm_topk_prob;            /* -1 absent, else 0/1 */
    int64_t n_group, topk_group;   /* -1 absent */
    double routed_scaling_factor;  /* NaN absent */
    char scoring_func[32];         /* "" absent */
    char topk_method[32];
    char hidden_act[32];           /* mlp_hidden_act (Nemotron-H) takes precedence */
    /* quantization_config inside config.json */
    int has_quantization_config;
} ckpt_model_config;

/* ------------------------------------------------------------------ quantisation config */
typedef struct ckpt_quant_config {
    int present;
    char source[48];     /* "hf_quant_config.json" or "config.json quantization_config" */
    char quant_algo[48]; /* as written, upper-cased */
    int64_t group_size;  /* 0 absent */
    char **exclude_modules;
    int exclude_count;
    /* MIXED_PRECISION: module name -> algorithm */
    char **layer_names;
    char **layer_algos;
    int layer_count;
} ckpt_quant_config;

/* 0 on success. text need not be NUL-terminated. The outputs are reset first. */
int ckpt_parse_model_config(const char *text, size_t len, ckpt_model_config *model,
                            ckpt_quant_config *quant, char *err, size_t err_bytes);
/* hf_quant_config.json: {"quantization": {"quant_algo", "group_size", "exclude_modules",
 * "quantized_layers"}} */
int ckpt_parse_quant_config(const char *text, size_t len, ckpt_quant_config *quant, char *err,
                            size_t err_bytes);
void ckpt_quant_config_free(ckpt_quant_config *quant);
/* Parses a JSON object with bounded memory; NULL with err naming `what` otherwise. */
struct cJSON;
struct cJSON *ckpt_parse_json(const char *text, size_t len, const char *what, char *err,
                              size_t err_bytes);
/* 1 when module (e.g. "model.layers.0.mlp.gate") matches an exclude_modules pattern ('*' any). */
int ckpt_is_excluded(const ckpt_quant_config *quant, const char *module);
int ckpt_glob_match(const char *pattern, const char *text);

/* ------------------------------------------------------------------ index + shards */
typedef struct ckpt_index {
    char **tensor_names; /* weight_map keys */
    int *tensor_shard;   /* index into shard_names */
    int64_t tensor_count;
    char **shard_names;  /* distinct file names (no directories) */
    int shard_count;
} ckpt_index;

int ckpt_parse_index(const char *text, size_t len, ckpt_index *index, char *err, size_t err_bytes);
void ckpt_index_free(ckpt_index *index);

typedef struct ckpt_entry {
    const char *name;
    const st_tensor *tensor;
    int shard;
} ckpt_entry;

/* ------------------------------------------------------------------ MoE layers */
typedef enum ckpt_proj { CKPT_GATE = 0, CKPT_UP = 1, CKPT_DOWN = 2 } ckpt_proj;
typedef enum ckpt_naming {
    CKPT_NAMING_PROJ = 0, /* gate_proj / up_proj / down_proj */
    CKPT_NAMING_W = 1     /* w1 / w3 / w2 */
} ckpt_naming;

typedef struct ckpt_layer {
    char prefix[CKPT_MAX_NAME]; /* "model.layers.3.mlp" */
    int64_t layer;
    ckpt_naming naming;
    int gated;
    int64_t num_experts; /* max expert id + 1 seen in names */
    int64_t hidden, inter;
    int quantized;
    fp4moe_dtype weight_dtype;
    int has_input_scales;
    int split_gate_up_scale;
    const st_tensor *router;
    const st_tensor *bias;
    int num_problems;
    fp4moe_config config; /* derived from config.json + shapes */
} ckpt_layer;

/* Parses "<prefix>.experts.<j>.<proj>.<param>": 1 when name has that form (param one of weight,
 * weight_scale, weight_scale_2, input_scale), with the prefix length, expert id and parts. */
typedef enum ckpt_param { CKPT_WEIGHT = 0, CKPT_WEIGHT_SCALE, CKPT_WEIGHT_SCALE_2, CKPT_INPUT_SCALE } ckpt_param;
int ckpt_parse_expert_name(const char *name, size_t *prefix_len, int64_t *expert, ckpt_proj *proj,
                           ckpt_naming *naming, ckpt_param *param);
/* The tensor name of expert j's projection parameter in a layer (returns 0, or -1 if too long). */
int ckpt_expert_tensor_name(char *out, size_t out_bytes, const ckpt_layer *layer, int64_t expert,
                            ckpt_proj proj, ckpt_param param);

struct fp4moe_checkpoint {
    char *dir; /* the folder (with a trailing '/'), "" for in-memory checkpoints */
    st_file **shards;
    char **shard_names;
    int shard_count;
    ckpt_entry *entries; /* sorted by name */
    int64_t entry_count;
    ckpt_model_config model;
    ckpt_quant_config quant;
    ckpt_layer *layers;
    int layer_count;
    char **problems;
    int problem_count;
    int problems_dropped;
};

/* Builds a checkpoint from parsed parts (takes ownership of shards and shard_names, even on
 * failure). config/quant texts may be NULL. index may be NULL: then every tensor of every shard
 * is in, and a name in two shards is an error. Then finds and checks the layers. */
int ckpt_assemble(fp4moe_checkpoint *ckpt, const char *config_text, size_t config_len,
                  const char *quant_text, size_t quant_len, const ckpt_index *index, char *err,
                  size_t err_bytes);
const st_tensor *ckpt_find(const fp4moe_checkpoint *ckpt, const char *name);
/* Records a problem (printf-style); keeps the first CKPT_MAX_PROBLEMS. -1 when out of memory. */
int ckpt_problem(fp4moe_checkpoint *ckpt, const char *format, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
/* Finds the MoE layers among the entries and checks them (checkpoint_layers.c). */
int ckpt_find_layers(fp4moe_checkpoint *ckpt, char *err, size_t err_bytes);
/* Routing and activation of a layer from config.json (checkpoint_layers.c). */
void ckpt_derive_config(const ckpt_model_config *model, ckpt_layer *layer);
void ckpt_free(fp4moe_checkpoint *ckpt);

/* Reads a whole small file (JSON) into a NUL-terminated malloc'd buffer; 1 when absent (err
 * empty), -1 on error (err set), 0 on success. */
int ckpt_read_text_file(const char *path, size_t max_bytes, char **text, size_t *len, char *err,
                        size_t err_bytes);

/* Measured activation scales (checkpoint_calibrate.c): per layer index of ckpt->layers, FC1's
 * input_scale and FC2's per expert (NULL for layers already quantised). */
typedef struct ckpt_calibration {
    float *fc1;
    float **down;
    int layer_count;
} ckpt_calibration;
int ckpt_calibrate(const fp4moe_checkpoint *ckpt, const char *path, ckpt_calibration *out, char *err,
                   size_t err_bytes);
void ckpt_calibration_free(ckpt_calibration *calibration);

/* ModelOpt's NVFP4 weight quantiser on a float matrix [rows, cols] (cols % 16 == 0), data possibly
 * unaligned: weight_scale_2 = amax / (6*448); per block of 16 s = e4m3(block_amax / (6 *
 * weight_scale_2)) (1.0 for an all-zero block); q = e2m1(x / (s * weight_scale_2)). Fills
 * packed [rows, cols/2], scales [rows, cols/16], *ws2 and the error figures. -1 when a value is
 * not finite. */
int ckpt_quantize_matrix(const void *data, fp4moe_dtype dtype, int64_t rows, int64_t cols,
                         uint8_t *packed, uint8_t *scales, float *ws2, double *amax,
                         double *rel_l2_error, double *max_abs_error);

/* checkpoint_export.c. out_dir ends with '/'. in_config_path: the input's config.json, copied
 * with a quantization_config when it exists (NULL: none). */
int ckpt_write_quant_configs(const char *out_dir, const char *in_config_path,
                             const char *const *exclude, int exclude_count, char *err,
                             size_t err_bytes);
int ckpt_write_index(const char *path, const char *const *names, const char *const *shards,
                     int64_t count, uint64_t total_bytes, char *err, size_t err_bytes);

/* Element i of a float tensor (F32/F16/BF16) whose data may be unaligned. */
float ckpt_load_float(const void *data, fp4moe_dtype dtype, int64_t i);

#endif
