/* The float64 reference of the whole NVFP4 MoE layer, written to be obviously right rather than
 * fast: its own number-format codecs, sort-based routing, and the numerics contract of
 * docs/DESIGN.md ("The function, exactly") evaluated in double precision. It shares no code with
 * src/ (only the public header's structs), so a bug in the library cannot hide in both.
 *
 * Where the contract rounds (the 16-bit FC2 input, E4M3 FP8 down input, the W4A4 activation
 * quantiser) the reference rounds too; the value it rounds came from a float64 sum while the
 * library's came from an FP32 sum, so the two can land on different sides of a rounding
 * boundary. The reference counts the roundings whose input lies within a relative distance
 * REF_NEAR_TIE_REL of a boundary (ref_stats.near_ties): with none, the library must agree to
 * FP32 accuracy; with some, a test may allow for one quantum per near tie. A 16-bit activation
 * output u very near a tie can also move the quantised FC2 input (E4M3, NVFP4) by a whole step:
 * such cascades count as near ties of that step (run_expert's second pass with those u flipped). */
#ifndef FP4MOE_TESTS_REF_MOE_H
#define FP4MOE_TESTS_REF_MOE_H

#include <stdint.h>

#include "fp4moe.h"
#include "testing.h"

/* An FP32 dot product of K terms carries a relative error of a few 1e-7 (blocked sums); a
 * rounding whose input is closer than this to a boundary may legitimately go either way. */
#define REF_NEAR_TIE_REL 4e-6

/* A layer: configuration plus host pointers to canonical weights with LINEAR scales. The
 * config is the caller's (not normalised): local_num_experts 0 means E, LLAMA4 forces
 * apply_router_weight_on_input, as the header documents. */
typedef struct ref_layer {
    fp4moe_config cfg;
    fp4moe_weights w;
    void *owned[24]; /* allocations of ref_layer_generate, freed by ref_layer_free */
    int num_owned;
} ref_layer;

typedef struct ref_args {
    int64_t num_tokens;
    const void *hidden_states; /* [T, H] */
    fp4moe_dtype hidden_dtype;
    /* exactly one of: router logits [T, E] ... */
    const void *router_logits;
    fp4moe_dtype router_logits_dtype;
    /* ... or caller-chosen ids [T, k] and weights [T, k] */
    const int32_t *topk_ids;
    const void *topk_weights;
    fp4moe_dtype topk_weights_dtype;
    const float *per_token_scale; /* optional [T] */
    int finalize;                 /* 1: out [T, H]; 0: out [T*k, H] */
    fp4moe_dtype output_dtype;    /* F32 (kept in double) or 16-bit (rounded to it) */
} ref_args;

/* Roundings of values that carry FP32 rounding error in the library, and how many of them were
 * near a boundary (see the file comment). A block-scale near tie of the NVFP4 quantiser counts
 * 16 (it moves the whole block). */
typedef struct ref_tie_counter {
    int64_t near_ties;
    int64_t total;
    double jump_sq; /* sum over near ties of (jump / typical magnitude of the row)^2 */
} ref_tie_counter;

typedef struct ref_stats {
    ref_tie_counter inner;  /* 16-bit FC2 input, FP8 down input, W4A4 quantiser, on-input product */
    ref_tie_counter output; /* rounding of a 16-bit output */
} ref_stats;

/* Decoders and RNE encoders of the formats, on doubles. ref_round_* return the representable
 * value nearest to x (ties to even): e2m1 saturates at +-6, e4m3 saturates at +-448, f16
 * overflows to inf, bf16 as IEEE. */
double ref_e2m1_value(uint8_t code);
double ref_e4m3_value(uint8_t code); /* NaN for 0x7f, 0xff */
double ref_bf16_value(uint16_t bits);
double ref_f16_value(uint16_t bits);
double ref_round_e2m1(double x);
double ref_round_e4m3(double x);
double ref_round_bf16(double x);
double ref_round_f16(double x);
uint8_t ref_encode_e2m1(double x); /* of an already representable value */
uint8_t ref_encode_e4m3(double x); /* of an already representable value */
uint16_t ref_encode_bf16(double x); /* rounds (RNE) */
uint16_t ref_encode_f16(double x);  /* rounds (RNE) */

/* Element i of a F32/F16/BF16 array as double; rounds a double to a dtype (F32: to float). */
double ref_load(const void *data, fp4moe_dtype dtype, int64_t i);
void ref_store(void *data, fp4moe_dtype dtype, int64_t i, double value);
double ref_round_dtype(double x, fp4moe_dtype dtype);
size_t ref_dtype_bytes(fp4moe_dtype dtype);

/* The spec's NVFP4 activation quantiser (section 2, steps 1-4) on one row of FP32 values, in
 * FP32 arithmetic with IEEE division for rcp: out[i] = e2m1(q) * e4m3(s), without 1/g.
 * ties (may be NULL) counts values near a rounding boundary. */
void ref_nvfp4_fake_quantize(const float *x, int64_t cols, float g, double *out,
                             ref_tie_counter *ties);

/* Routing of T tokens (spec section 4): ids [T, k] in selection order, weights [T, k]. */
int ref_route(const ref_layer *layer, int64_t num_tokens, const void *logits,
              fp4moe_dtype logits_dtype, int32_t *ids, double *weights);

/* The layer. out: [T, H] (finalize) or [T*k, H]; ids_out / weights_out (optional, [T, k]): the
 * routing used. stats may be NULL. Returns 0, or -1 on allocation failure / bad arguments. */
int ref_forward(const ref_layer *layer, const ref_args *args, double *out, int32_t *ids_out,
                double *weights_out, ref_stats *stats);

/* FC1 rows (2I gated, I otherwise) and E_loc of a config. */
int64_t ref_fc1_rows(const fp4moe_config *cfg);
int64_t ref_local_experts(const fp4moe_config *cfg);

/* ------------------------------------------------------------------ random layers (ref_layer_gen.c) */
typedef struct ref_gen_options {
    int biases;            /* random b1, b2 */
    int routing_bias;      /* random e_score_correction_bias */
    int half2_scale;       /* gated FC1 halves quantised with separate global scales */
    int per_expert_swiglu; /* random per-expert alpha/beta/limit arrays */
} ref_gen_options;

/* Random FP32 weights N(0, 1/sqrt(K)) quantised to NVFP4 by the spec's algorithm (own
 * quantiser), linear scales; W4A4 and FP8 scales set to 1 until ref_layer_calibrate. Returns 0
 * on success; on failure nothing is left allocated. */
int ref_layer_generate(ref_layer *layer, const fp4moe_config *cfg, const ref_gen_options *opt,
                       testing_rng *rng);
/* Realistic activation scales from a calibration batch (FP32 hidden [T, H]): per local expert,
 * a1 = 6*448/amax(x), a2 = 6*448/amax(act output) over all tokens (as if every token visited
 * every expert), fc2_input_fp8_scale = 448/amax(act output). */
int ref_layer_calibrate(ref_layer *layer, const float *hidden, int64_t num_tokens);
void ref_layer_free(ref_layer *layer);
/* The weights of experts [e0, ...) of a layer (an expert-parallel rank's slice): every
 * per-expert array advanced by e0 experts (pointer offsets, no copy); routing_bias (global)
 * unchanged. ref_weights_slice does it for any weights of configuration c. */
fp4moe_weights ref_weights_slice(const fp4moe_config *c, const fp4moe_weights *all, int64_t e0);
fp4moe_weights ref_layer_slice_weights(const ref_layer *layer, int64_t e0);

/* n values N(0, stddev) (never exactly zero), rounded to dtype, into data (dtype layout). */
void ref_random_fill(testing_rng *rng, void *data, fp4moe_dtype dtype, int64_t n, double stddev);

#endif
