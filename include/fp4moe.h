/*
 * fp4moe: the Mixture-of-Experts layer of language models whose expert weights are NVFP4
 * (E2M1 values, one E4M3 scale per 16 values, one FP32 scale per tensor), on CPUs and GPUs.
 *
 * The function computed is specified in docs/SPEC.md (a copy of the project's contract with
 * the deviations we found in the peers' sources). In short, for every token t:
 *
 *     out[t] = per_token_scale[t] * sum_j  w[t,j] * FC2_e( act( FC1_e(x[t]) ) ),   e = id[t,j]
 *
 * over the k experts the router chose for t that live on this device.
 *
 * Ownership and threading
 *   - The caller owns every input, output and workspace buffer. A plan owns its (repacked)
 *     copy of the weights; the caller's weight buffers may be freed after fp4moe_plan_create.
 *   - A context and the plans made from it are used by one host thread at a time (like a
 *     cuBLAS handle); use one context per thread. The library has no global mutable state.
 *   - Every entry point validates its arguments and returns a status. On failure nothing
 *     outside the caller's output buffers is written, and fp4moe_last_error() on the context
 *     holds a message that names the offending argument.
 *   - Forward calls never allocate and never synchronise the host: they can be captured in a
 *     CUDA graph (CUDA backend). On the CPU backend the `stream` argument is ignored.
 *
 * Pointers passed to forward/route calls live where the plan's backend computes: host memory
 * for the CPU backend, device memory for the CUDA backend. Weights given to fp4moe_plan_create
 * are always host memory. Every tensor pointer must be aligned to its element size
 * (INVALID_ARGUMENT otherwise); workspaces to 256 bytes.
 */
#ifndef FP4MOE_H
#define FP4MOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FP4MOE_VERSION_MAJOR 0
#define FP4MOE_VERSION_MINOR 1
#define FP4MOE_VERSION_PATCH 0
/* MAJOR * 10000 + MINOR * 100 + PATCH */
#define FP4MOE_VERSION (FP4MOE_VERSION_MAJOR * 10000 + FP4MOE_VERSION_MINOR * 100 + FP4MOE_VERSION_PATCH)

/* The version of the library actually loaded (compare with FP4MOE_VERSION at run time). */
int fp4moe_version(void);

/* ------------------------------------------------------------------------------------------ */
/* Status                                                                                     */
/* ------------------------------------------------------------------------------------------ */
typedef enum fp4moe_status {
    FP4MOE_SUCCESS = 0,
    FP4MOE_ERROR_INVALID_ARGUMENT = 1,    /* a NULL, size, range, dtype or combination is wrong */
    FP4MOE_ERROR_UNSUPPORTED = 2,         /* valid, but not implemented by the chosen backend */
    FP4MOE_ERROR_OUT_OF_MEMORY = 3,       /* host or device allocation failed (plan creation) */
    FP4MOE_ERROR_WORKSPACE_TOO_SMALL = 4, /* see fp4moe_plan_workspace_size */
    FP4MOE_ERROR_CORRUPT_DATA = 5,        /* serialised bytes fail their checks */
    FP4MOE_ERROR_VERSION_MISMATCH = 6,    /* serialised by an incompatible library version */
    FP4MOE_ERROR_BACKEND_UNAVAILABLE = 7, /* e.g. CUDA asked for, no usable GPU present */
    FP4MOE_ERROR_CUDA = 8,                /* a CUDA runtime call failed; the message says which */
    FP4MOE_ERROR_INTERNAL = 9             /* a bug: please report the message */
} fp4moe_status;

/* A fixed, static description of a status code ("invalid argument", ...). Never NULL. */
const char *fp4moe_status_string(fp4moe_status status);

/* ------------------------------------------------------------------------------------------ */
/* Enumerations                                                                               */
/* ------------------------------------------------------------------------------------------ */
typedef enum fp4moe_dtype {
    FP4MOE_DTYPE_F32 = 0,
    FP4MOE_DTYPE_F16 = 1,
    FP4MOE_DTYPE_BF16 = 2,
    FP4MOE_DTYPE_I32 = 3,
    FP4MOE_DTYPE_U8 = 4,      /* packed E2M1 pairs: element 2i low nibble, 2i+1 high nibble */
    FP4MOE_DTYPE_E4M3 = 5     /* FP8 E4M3 "fn": max 448, no infinities, NaN = 0x7f/0xff */
} fp4moe_dtype;

typedef enum fp4moe_backend {
    FP4MOE_BACKEND_AUTO = 0,  /* CUDA when a usable GPU and the CUDA backend exist, else CPU */
    FP4MOE_BACKEND_CPU = 1,
    FP4MOE_BACKEND_CUDA = 2
} fp4moe_backend;

/* Activation applied to FC1's output (after its bias). Gated ones use both halves of FC1. */
typedef enum fp4moe_activation {
    FP4MOE_ACT_SWIGLU = 0,     /* gate' * sigmoid(alpha * gate') * (up' + beta), see swiglu_* */
    FP4MOE_ACT_GEGLU = 1,      /* gelu_erf(gate) * up */
    FP4MOE_ACT_GEGLU_TANH = 2, /* gelu_tanh(gate) * up */
    FP4MOE_ACT_RELU2 = 3,      /* max(x, 0)^2, non-gated (Nemotron) */
    FP4MOE_ACT_SILU = 4,       /* x * sigmoid(x), non-gated */
    FP4MOE_ACT_GELU = 5,       /* gelu_erf(x), non-gated */
    FP4MOE_ACT_IDENTITY = 6    /* x, non-gated */
} fp4moe_activation;

/* Routing methods. The values equal FlashInfer's RoutingMethodType. */
typedef enum fp4moe_routing {
    FP4MOE_ROUTING_SOFTMAX_TOPK = 0,      /* top-k of softmax(logits+bias); those values */
    FP4MOE_ROUTING_RENORMALIZE = 1,       /* top-k of logits+bias; softmax over the k */
    FP4MOE_ROUTING_DEEPSEEK_V3 = 2,       /* grouped sigmoid + bias selection, see the spec */
    FP4MOE_ROUTING_LLAMA4 = 3,            /* top-1 of logits; sigmoid weight applied on input */
    FP4MOE_ROUTING_RENORMALIZE_NAIVE = 4, /* top-k of softmax(logits+bias); divided by sum */
    FP4MOE_ROUTING_TOPK = 5,              /* top-k of logits; the logits */
    FP4MOE_ROUTING_SIGMOID_RENORM = 6,    /* top-k of sigmoid; / max(sum,1e-20) if norm_topk_prob */
    FP4MOE_ROUTING_MINIMAX2 = 7,          /* top-k of sigmoid+bias; s*scale/(sum s + 1e-20) */
    FP4MOE_ROUTING_SIGMOID = 8,           /* top-k of sigmoid; the sigmoid values */
    FP4MOE_ROUTING_TOPK_SIGMOID = 9       /* top-k of logits; sigmoid of the chosen logits */
} fp4moe_routing;

typedef enum fp4moe_precision {
    FP4MOE_PRECISION_W4A16 = 0, /* activations stay 16-bit (or FP32), weights exact, FP32 sums */
    FP4MOE_PRECISION_W4A4 = 1   /* activations NVFP4-quantised before FC1 and FC2, as Blackwell */
} fp4moe_precision;

typedef enum fp4moe_gate_up_order {
    FP4MOE_GATE_UP = 0, /* FC1 rows [0,I) are the gate, [I,2I) the up half (HF, vLLM w13) */
    FP4MOE_UP_GATE = 1  /* rows [0,I) up, [I,2I) gate (FlashInfer / TRT-LLM kernels) */
} fp4moe_gate_up_order;

typedef enum fp4moe_scale_layout {
    FP4MOE_SCALE_LINEAR = 0,       /* [rows, K/16], row-major */
    FP4MOE_SCALE_SWIZZLED_128x4 = 1 /* rows padded to 128, K/16 padded to 4, 128x4 tiles */
} fp4moe_scale_layout;

/* ------------------------------------------------------------------------------------------ */
/* Context: backend choice, threads, device, last error message                               */
/* ------------------------------------------------------------------------------------------ */
typedef struct fp4moe_context fp4moe_context;

typedef struct fp4moe_context_options {
    fp4moe_backend backend; /* default AUTO */
    int num_threads;        /* CPU threads; 0 = all available cores */
    int cuda_device;        /* CUDA device ordinal; default 0 */
} fp4moe_context_options;

void fp4moe_context_options_init(fp4moe_context_options *options);

/* options may be NULL (defaults). *out is set to NULL on failure. */
fp4moe_status fp4moe_context_create(const fp4moe_context_options *options, fp4moe_context **out);
void fp4moe_context_destroy(fp4moe_context *ctx); /* NULL is a no-op */

/* The backend this context resolved to (never AUTO). */
fp4moe_backend fp4moe_context_backend(const fp4moe_context *ctx);
/* A human-readable description of what runs, e.g. "cpu (avx2+fma+f16c, 2 threads)". */
const char *fp4moe_context_description(const fp4moe_context *ctx);

/* The message of the most recent failing call made with this context (or with a plan of it);
 * "" when none failed. Valid until the next call with the context. NULL ctx gives "". */
const char *fp4moe_last_error(const fp4moe_context *ctx);

/* Memory where the context's backend computes (host memory for the CPU backend, device memory
 * for CUDA), so that callers such as the CLI can stay backend-agnostic. Allocation happens here,
 * never inside forward calls. Copies are synchronous with respect to the host. */
fp4moe_status fp4moe_buffer_alloc(fp4moe_context *ctx, size_t bytes, void **out); /* 256-aligned */
void fp4moe_buffer_free(fp4moe_context *ctx, void *buffer);                      /* NULL no-op */
fp4moe_status fp4moe_buffer_upload(fp4moe_context *ctx, void *dst, const void *host_src,
                                   size_t bytes);
fp4moe_status fp4moe_buffer_download(fp4moe_context *ctx, void *host_dst, const void *src,
                                     size_t bytes);
/* Waits for the work queued on `stream` (CUDA) to finish; a no-op on the CPU backend. */
fp4moe_status fp4moe_synchronize(fp4moe_context *ctx, void *stream);

/* ------------------------------------------------------------------------------------------ */
/* Layer configuration                                                                        */
/* ------------------------------------------------------------------------------------------ */
/* fp4moe_config.decode_threshold: the split that follows the experts and top-k (see there). */
#define FP4MOE_DECODE_THRESHOLD_AUTO (-1)

typedef struct fp4moe_config {
    int64_t num_experts;       /* E, global */
    int32_t top_k;             /* k, 1 <= k <= min(E, 32) */
    int64_t hidden_size;       /* H, multiple of 16 */
    int64_t intermediate_size; /* I, multiple of 16 */

    fp4moe_activation activation;
    /* SwiGLU parameters (GPT-OSS): gate' = min(gate, limit), up' = clamp(up, -limit, limit),
     * out = gate' * sigmoid(alpha * gate') * (up' + beta). Defaults 1, 0, +inf. Per-expert
     * arrays in fp4moe_weights override these scalars. Ignored by other activations. */
    float swiglu_alpha;
    float swiglu_beta;
    float swiglu_limit;
    fp4moe_gate_up_order gate_up_order;

    fp4moe_routing routing;
    int32_t n_group;             /* DeepSeek-V3 groups; must divide E. Default 1 */
    int32_t topk_group;          /* groups kept, 1 <= topk_group <= n_group. Default 1 */
    int32_t norm_topk_prob;      /* sigmoid_renorm, deepseek_v3: divide by the sum. Default 1 */
    float routed_scaling_factor; /* deepseek_v3, minimax2. Default 1 */
    /* Llama4-style: the router weight multiplies the expert's input instead of its output.
     * Forced on by FP4MOE_ROUTING_LLAMA4; allowed with any method when top_k == 1. */
    int32_t apply_router_weight_on_input;

    int64_t local_expert_offset; /* e0: first global expert id on this device. Default 0 */
    int64_t local_num_experts;   /* E_loc; 0 means E - local_expert_offset. Default 0 */

    fp4moe_precision precision;
    /* FP8 down input (IMoELayer setQuantizationStatic): the activation's output is quantised
     * to E4M3 with the per-expert static scale fc2_input_fp8_scale before FC2:
     * a' = e4m3_satfinite(a * s) / s. Only with W4A16. */
    int32_t fc2_input_fp8;

    /* T <= this takes the decode path (GPU). Default FP4MOE_DECODE_THRESHOLD_AUTO: while
     * T * top_k <= 5.5 * num_experts with FP16/BF16 hidden states (at most 5.5 (token, slot)
     * rows per expert on average), <= 10 * num_experts with FP32 ones, where the H100
     * measurements cross over (docs/PERF.md, "Decode/prefill crossover") */
    int64_t decode_threshold;
    int64_t max_tokens;       /* largest T a forward call will see. Default 16384 */
} fp4moe_config;

/* Fills the defaults named above; the caller then sets at least E, k, H, I. */
void fp4moe_config_init(fp4moe_config *cfg);

/* Checks a configuration alone (no weights). FP4MOE_SUCCESS or INVALID_ARGUMENT + message. */
fp4moe_status fp4moe_config_validate(fp4moe_context *ctx, const fp4moe_config *cfg);

/* FC1's output rows: 2*I for gated activations, I otherwise. 0 for an invalid activation. */
int64_t fp4moe_config_fc1_rows(const fp4moe_config *cfg);

/* ------------------------------------------------------------------------------------------ */
/* Weights (host memory, the canonical "Linear" layout: K innermost)                          */
/* ------------------------------------------------------------------------------------------ */
typedef struct fp4moe_weights {
    /* FC1: N1 = fp4moe_config_fc1_rows(cfg) */
    const uint8_t *w1;             /* [E_loc, N1, H/2] packed E2M1 */
    const uint8_t *w1_scale;       /* [E_loc, N1, H/16] E4M3, in w1_scale_layout */
    const float *w1_global_scale;  /* [E_loc] dequantisation scale (ModelOpt weight_scale_2) */
    /* Optional [E_loc]: dequantisation scale of FC1 rows [I, 2I) when the two halves of a gated
     * FC1 were quantised with different global scales (w1_global_scale then covers [0, I)). */
    const float *w1_global_scale_half2;
    /* FC2 */
    const uint8_t *w2;            /* [E_loc, H, I/2] packed E2M1 */
    const uint8_t *w2_scale;      /* [E_loc, H, I/16] E4M3, in w2_scale_layout */
    const float *w2_global_scale; /* [E_loc] */
    fp4moe_scale_layout w1_scale_layout; /* per expert: the layout of one [N1, H/16] matrix */
    fp4moe_scale_layout w2_scale_layout;

    const float *b1;           /* optional [E_loc, N1] FP32, added to FC1's output */
    const float *b2;           /* optional [E_loc, H] FP32, added to FC2's output */
    const float *routing_bias; /* optional [E] FP32 (e_score_correction_bias), see the spec */

    /* W4A4: activation quantisation scales g = 6*448/amax (the reciprocal of ModelOpt's
     * input_scale), [E_loc] each; required with FP4MOE_PRECISION_W4A4. */
    const float *a1_global_scale;
    const float *a2_global_scale;
    /* FP8 down input: quantisation scale per expert [E_loc]; required with fc2_input_fp8. */
    const float *fc2_input_fp8_scale;

    /* Optional per-expert SwiGLU parameters [E_loc] (FlashInfer gemm1_alpha/beta/clamp_limit) */
    const float *swiglu_alpha;
    const float *swiglu_beta;
    const float *swiglu_limit;
} fp4moe_weights;

/* ------------------------------------------------------------------------------------------ */
/* Plans                                                                                      */
/* ------------------------------------------------------------------------------------------ */
typedef struct fp4moe_plan fp4moe_plan;

/* Validates cfg and weights, copies/repacks the weights for the context's backend. */
fp4moe_status fp4moe_plan_create(fp4moe_context *ctx, const fp4moe_config *cfg,
                                 const fp4moe_weights *weights, fp4moe_plan **out);
void fp4moe_plan_destroy(fp4moe_plan *plan); /* NULL is a no-op */

fp4moe_status fp4moe_plan_get_config(const fp4moe_plan *plan, fp4moe_config *out);

/* Bytes of workspace a forward or route call with num_tokens tokens needs (<= max_tokens).
 * The value for max_tokens serves every call. Workspace alignment: 256 bytes. */
fp4moe_status fp4moe_plan_workspace_size(const fp4moe_plan *plan, int64_t num_tokens,
                                         size_t *bytes);

/* ------------------------------------------------------------------------------------------ */
/* Forward                                                                                    */
/* ------------------------------------------------------------------------------------------ */
typedef struct fp4moe_forward_args {
    int64_t num_tokens;          /* T, 1 <= T <= max_tokens */
    const void *hidden_states;   /* [T, H] */
    fp4moe_dtype hidden_dtype;   /* F32, F16 or BF16 */

    /* fp4moe_forward: router logits [T, E] (F32, F16 or BF16). */
    const void *router_logits;
    fp4moe_dtype router_logits_dtype;

    /* fp4moe_forward_routed: global expert ids [T, k] (I32, each in [0, E)) and their weights
     * [T, k] (F32, F16 or BF16). Ids of experts that are not local contribute nothing. */
    const int32_t *topk_ids;
    const void *topk_weights;
    fp4moe_dtype topk_weights_dtype;

    const float *per_token_scale; /* optional [T]: multiplies each token's output */

    /* Output. Finalize on (skip_finalize == 0): [T, H], the weighted sum over the k experts.
     * Finalize off: [T*k, H], row t*k + j = FC2 output of expert id[t,j] for token t, not
     * multiplied by its router weight or per_token_scale (zeros for non-local experts); with
     * apply_router_weight_on_input the weight is already in (it scaled the input).
     * output_dtype: F32, or the hidden dtype. May alias hidden_states when finalize is on,
     * hidden_dtype == output_dtype (in place). */
    void *output;
    fp4moe_dtype output_dtype;
    int32_t skip_finalize;

    /* Optional routing replay outputs [T, k]: the chosen global ids and their weights
     * (FlashInfer's routing_replay_out). fp4moe_forward only; fp4moe_forward_routed ignores
     * them (they would echo its inputs). */
    int32_t *topk_ids_out;
    float *topk_weights_out;
} fp4moe_forward_args;

/* Zeroes the struct and sets output_dtype F32, dtypes F32; finalize on. */
void fp4moe_forward_args_init(fp4moe_forward_args *args);

/* The layer from router logits. workspace: fp4moe_plan_workspace_size bytes, 256-aligned. */
fp4moe_status fp4moe_forward(fp4moe_plan *plan, const fp4moe_forward_args *args,
                             void *workspace, size_t workspace_bytes, void *stream);

/* The layer from experts and weights chosen by the caller (topk_ids, topk_weights). */
fp4moe_status fp4moe_forward_routed(fp4moe_plan *plan, const fp4moe_forward_args *args,
                                    void *workspace, size_t workspace_bytes, void *stream);

/* Routing alone: logits [T, E] -> ids [T, k] (global ids) and weights [T, k] (F32).
 * NaN logits: selection ranks NaN below every number (ties toward the lower index); weights
 * follow the formulas, so a NaN that enters a softmax or a sum yields NaN weights. */
fp4moe_status fp4moe_route(fp4moe_plan *plan, int64_t num_tokens, const void *router_logits,
                           fp4moe_dtype router_logits_dtype, int32_t *topk_ids_out,
                           float *topk_weights_out, void *workspace, size_t workspace_bytes,
                           void *stream);

/* ------------------------------------------------------------------------------------------ */
/* Serialisation: the whole plan (every attribute, max_tokens, and the weights), versioned    */
/* and checksummed. Deserialising checks every field; bad bytes give CORRUPT_DATA.            */
/* ------------------------------------------------------------------------------------------ */
fp4moe_status fp4moe_plan_serialized_size(const fp4moe_plan *plan, size_t *bytes);
fp4moe_status fp4moe_plan_serialize(const fp4moe_plan *plan, void *buffer, size_t buffer_bytes,
                                    size_t *written);
fp4moe_status fp4moe_plan_deserialize(fp4moe_context *ctx, const void *buffer,
                                      size_t buffer_bytes, fp4moe_plan **out);

/* ------------------------------------------------------------------------------------------ */
/* NVFP4 formats (host functions; ctx may be NULL, then only the status reports a failure)    */
/* ------------------------------------------------------------------------------------------ */
float fp4moe_e2m1_to_float(uint8_t code);  /* low nibble used */
float fp4moe_e4m3_to_float(uint8_t code);  /* NaN for 0x7f and 0xff */
uint8_t fp4moe_float_to_e2m1(float x);     /* round to nearest even, saturate to +-6; NaN->+6 */
uint8_t fp4moe_float_to_e4m3(float x);     /* round to nearest even, satfinite +-448; NaN->0x7f */
float fp4moe_bf16_to_float(uint16_t bits);
uint16_t fp4moe_float_to_bf16(float x);    /* round to nearest even */
float fp4moe_f16_to_float(uint16_t bits);
uint16_t fp4moe_float_to_f16(float x);     /* round to nearest even */

/* Global quantisation scale of a tensor: g = 6*448/amax (1 when amax is 0 or not finite). */
fp4moe_status fp4moe_nvfp4_global_scale(fp4moe_context *ctx, const void *x, fp4moe_dtype dtype,
                                        int64_t count, float *global_scale);

/* Quantises a [rows, cols] matrix (cols a multiple of 16) with quantisation scale g, by the
 * Blackwell kernels' algorithm (spec section 2): packed [rows, cols/2], scales in layout
 * (linear [rows, cols/16] or swizzled, see fp4moe_scale_bytes). The dequantisation scale that
 * goes with the result is 1/g. */
fp4moe_status fp4moe_nvfp4_quantize(fp4moe_context *ctx, const void *x, fp4moe_dtype dtype,
                                    int64_t rows, int64_t cols, float global_scale,
                                    uint8_t *packed, uint8_t *scales,
                                    fp4moe_scale_layout layout);

/* v = e2m1 * e4m3 * global_dequant_scale, into FP32 [rows, cols]. */
fp4moe_status fp4moe_nvfp4_dequantize(fp4moe_context *ctx, const uint8_t *packed,
                                      const uint8_t *scales, fp4moe_scale_layout layout,
                                      int64_t rows, int64_t cols, float global_dequant_scale,
                                      float *out);

/* Quantises a stack of expert matrices [experts, rows, cols] with one global scale each
 * (from each expert's amax): packed [experts, rows, cols/2], scales per expert in layout,
 * global_dequant_out [experts] = 1/g (ModelOpt's weight_scale_2). */
fp4moe_status fp4moe_nvfp4_quantize_experts(fp4moe_context *ctx, const void *x,
                                            fp4moe_dtype dtype, int64_t experts, int64_t rows,
                                            int64_t cols, uint8_t *packed, uint8_t *scales,
                                            fp4moe_scale_layout layout,
                                            float *global_dequant_out);

/* Bytes of one [rows, cols/16] scale matrix in a layout (swizzled pads rows to 128 and scale
 * columns to 4). 0 for invalid arguments. */
size_t fp4moe_scale_bytes(int64_t rows, int64_t cols, fp4moe_scale_layout layout);

/* Converts one scale matrix of a [rows, cols] tensor between layouts (padding written as 0). */
fp4moe_status fp4moe_scales_convert(fp4moe_context *ctx, const uint8_t *in,
                                    fp4moe_scale_layout in_layout, uint8_t *out,
                                    fp4moe_scale_layout out_layout, int64_t rows, int64_t cols);

/* Offset of scale (row, scale_col) in the 128x4 swizzled layout with C = cols/16 columns. */
int64_t fp4moe_swizzled_scale_offset(int64_t row, int64_t scale_col, int64_t scale_cols);

#ifdef __cplusplus
}
#endif
#endif /* FP4MOE_H */
