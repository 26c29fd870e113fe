/* The CPU backend's private state and the expert pipeline of one chunk of tokens
 * (gather -> FC1 -> activation -> FC2 -> finalize), shared by cpu_backend.c and cpu_experts.c. */
#ifndef FP4MOE_CPU_EXPERTS_H
#define FP4MOE_CPU_EXPERTS_H

#include <stdatomic.h>

#include "../core/plan.h"
#include "cpu_kernels.h"

/* Tokens are processed in chunks so that the workspace stays bounded (it holds per-(token,
 * slot) rows of FP32 activations); 512 tokens keep every expert's weights reused by many
 * tokens while re-reading them costs a few percent at most. */
#define CPU_TOKEN_CHUNK 512
/* Row tiles per work item: 16 tiles = 64 rows, enough items to balance two or more threads at
 * one token, large enough that the per-item cost is amortised. */
#define CPU_TILES_PER_ITEM 16

typedef struct cpu_state {
    const cpu_kernels *kernels;
    float scale_lut[256];   /* E4M3 code -> value */
    cpu_packed_matrix *fc1; /* [E_loc] */
    cpu_packed_matrix *fc2; /* [E_loc] */
    uint8_t *storage;       /* every expert's codes and scales, one allocation */
} cpu_state;

/* One unit of FC work: row tiles [tile_begin, tile_end) of a local expert. */
typedef struct cpu_work_item {
    int32_t expert;
    int32_t tile_begin;
    int32_t tile_end;
} cpu_work_item;

/* The workspace of a call, carved at 64-byte boundaries. */
typedef struct cpu_workspace {
    int32_t *ids;              /* [T*k] routed ids (when routing) */
    float *weights;            /* [T*k] FP32 router weights */
    float *route_scratch;      /* [threads][E + route_scratch_floats(E)] */
    int64_t *expert_offsets;   /* [E_loc + 1] sorted positions of each local expert */
    int32_t *entries;          /* [chunk*k] (token - t0) * k + slot, sorted by expert, stable */
    int32_t *positions;        /* [chunk*k] sorted position of (token - t0, slot), -1 non-local */
    cpu_work_item *items1;     /* [max_items1] FC1 work */
    cpu_work_item *items2;     /* [max_items2] FC2 work */
    atomic_int *fc1_pending;   /* [E_loc] FC1 items of the expert not finished */
    atomic_int *fc2_pending;   /* [E_loc] FC2 items of the expert not finished */
    atomic_int *token_pending; /* [chunk] local slots of the token whose FC2 is not finished */
    float *x;                  /* [chunk*k][x_stride] FC1 inputs */
    float *h;                  /* [chunk*k][n1] FC1 outputs, then FC2 inputs before quantisation */
    float *c;                  /* [chunk*k][c_stride] FC2 inputs */
    float *y;                  /* [chunk*k][H] FC2 outputs; finalize sums in place */
    int64_t x_stride, c_stride, chunk;
} cpu_workspace;

/* Bytes of the workspace for T tokens, and the carving of a buffer of that size. */
size_t cpu_workspace_bytes(const fp4moe_plan *plan, int64_t num_tokens);
void cpu_workspace_carve(const fp4moe_plan *plan, int64_t num_tokens, void *base,
                         cpu_workspace *ws);

/* Runs the experts for tokens [t0, t1) (t1 - t0 <= ws->chunk) given routed ids and FP32
 * weights of the whole call, writing those tokens' output rows. */
void cpu_experts_chunk(const fp4moe_plan *plan, const forward_call *call, const int32_t *ids,
                       const float *weights, int64_t t0, int64_t t1, cpu_workspace *ws);

/* The activation of one FC1 output row h[n1] into u[I] (in place allowed: u == h). */
void cpu_activation_row(const fp4moe_plan *plan, int64_t expert, const float *h, float *u);

#endif
