/* The plan: a validated configuration, the owned canonical copy of the weights, and the
 * backend's private state. Shared by plan.c, serialize.c and the backends. */
#ifndef FP4MOE_CORE_PLAN_H
#define FP4MOE_CORE_PLAN_H

#include "context.h"
#include "fp4moe.h"

/* Owned copies of the weights in the canonical layout with LINEAR scales. Optional tensors
 * are NULL when absent. The per-expert SwiGLU arrays are always present (filled from the
 * configuration's scalars when the caller gave none), so backends read one place. */
typedef struct plan_weights {
    uint8_t *w1;        /* [E_loc, N1, H/2] */
    uint8_t *w1_scale;  /* [E_loc, N1, H/16] linear */
    float *w1_global;   /* [E_loc] dequant scale of rows [0, I) (all rows when no half2) */
    float *w1_global_half2; /* [E_loc] dequant scale of rows [I, 2I); equals w1_global if absent */
    uint8_t *w2;        /* [E_loc, H, I/2] */
    uint8_t *w2_scale;  /* [E_loc, H, I/16] linear */
    float *w2_global;   /* [E_loc] */
    float *b1;          /* optional [E_loc, N1] */
    float *b2;          /* optional [E_loc, H] */
    float *routing_bias;        /* optional [E] */
    float *a1_global;           /* [E_loc] when W4A4 */
    float *a2_global;           /* [E_loc] when W4A4 */
    float *fc2_input_fp8_scale; /* [E_loc] when fc2_input_fp8 */
    float *swiglu_alpha;        /* [E_loc] always */
    float *swiglu_beta;         /* [E_loc] always */
    float *swiglu_limit;        /* [E_loc] always */
    /* w1 and w2 point at the caller's codes for the duration of fp4moe_plan_create (backends
     * that keep only their own layout repack straight from them): never freed here. */
    int codes_borrowed;
} plan_weights;

struct backend_ops;

struct fp4moe_plan {
    fp4moe_context *ctx;
    fp4moe_config cfg; /* normalised: local_num_experts set, llama4 => apply on input */
    int64_t e_loc;     /* cfg.local_num_experts */
    int64_t n1;        /* FC1 rows: 2I gated, I otherwise */
    int gated;         /* activation uses gate and up halves */
    plan_weights w;
    /* Set by a backend whose prepare freed w.w1, w1_scale, w2 and w2_scale (it keeps only its
     * own layout; ops->export_matrix gives them back, e.g. for serialisation). */
    int matrices_in_backend;
    const struct backend_ops *ops;
    void *backend_state; /* owned by ops */
};

/* A forward call after plan.c validated the arguments. Exactly one of router_logits and
 * topk_ids is set. Pointers live where the backend computes. */
typedef struct forward_call {
    int64_t num_tokens;
    const void *hidden_states;
    fp4moe_dtype hidden_dtype;
    const void *router_logits;
    fp4moe_dtype router_logits_dtype;
    const int32_t *topk_ids;
    const void *topk_weights;
    fp4moe_dtype topk_weights_dtype;
    const float *per_token_scale;
    void *output;
    fp4moe_dtype output_dtype;
    int finalize;
    int32_t *topk_ids_out;
    float *topk_weights_out;
} forward_call;

/* What a backend implements. Workspace pointers are 256-byte aligned and at least
 * workspace_size(plan, num_tokens) bytes long (plan.c checks). */
typedef struct backend_ops {
    const char *name;
    /* Builds backend_state from plan->w (repacking, uploads). */
    fp4moe_status (*prepare)(fp4moe_plan *plan);
    void (*release)(fp4moe_plan *plan);
    size_t (*workspace_size)(const fp4moe_plan *plan, int64_t num_tokens);
    fp4moe_status (*forward)(fp4moe_plan *plan, const forward_call *call, void *workspace,
                             size_t workspace_bytes, void *stream);
    fp4moe_status (*route)(fp4moe_plan *plan, int64_t num_tokens, const void *logits,
                           fp4moe_dtype logits_dtype, int32_t *ids_out, float *weights_out,
                           void *workspace, size_t workspace_bytes, void *stream);
    /* For backends that drop plan->w's expert matrices after prepare (matrices_in_backend):
     * writes one of them (PLAN_MATRIX_*) in the canonical layout, linear scales; else NULL. */
    void (*export_matrix)(const fp4moe_plan *plan, int which, uint8_t *dst);
} backend_ops;

enum { PLAN_MATRIX_W1, PLAN_MATRIX_W1_SCALE, PLAN_MATRIX_W2, PLAN_MATRIX_W2_SCALE };

/* Validates a configuration; on success writes the normalised copy to out (may be NULL). */
fp4moe_status plan_normalise_config(fp4moe_context *ctx, const fp4moe_config *in,
                                    fp4moe_config *out);
/* 1 when the method accepts a routing bias (spec section 4). */
int plan_routing_takes_bias(fp4moe_routing routing);

/* Builds a plan from a normalised config and owned weights (takes ownership of *w on success
 * and on failure). Used by plan_create and by deserialisation. */
fp4moe_status plan_assemble(fp4moe_context *ctx, const fp4moe_config *cfg, plan_weights *w,
                            fp4moe_plan **out);
void plan_weights_free(plan_weights *w);
/* For a backend's prepare once it holds its own layout: releases w1, w1_scale, w2 and w2_scale
 * (owned or borrowed) and sets matrices_in_backend (ops->export_matrix gives them back). */
void plan_drop_matrices(fp4moe_plan *plan);

/* Element counts of the weight tensors, for copy, serialisation and checks. */
int64_t plan_w1_bytes(const fp4moe_config *cfg);       /* E_loc * N1 * H/2 */
int64_t plan_w1_scale_bytes(const fp4moe_config *cfg); /* E_loc * N1 * H/16 */
int64_t plan_w2_bytes(const fp4moe_config *cfg);       /* E_loc * H * I/2 */
int64_t plan_w2_scale_bytes(const fp4moe_config *cfg); /* E_loc * H * I/16 */

#endif
