/* The CPU backend: weights repacked once at plan creation (cpu_repack.c), routing per token,
 * then the experts chunk by chunk of tokens (cpu_experts.c), with OpenMP threads and the SIMD
 * kernels CPUID allows (cpu_dispatch.c). */
/* madvise (Linux) for transparent huge pages on the repacked weights. */
#define _DEFAULT_SOURCE
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../format/format.h"
#include "../route/route.h"
#include "cpu_backend.h"
#include "cpu_experts.h"

static size_t round64(size_t n)
{
    return (n + 63) / 64 * 64;
}

#define HUGE_PAGE_BYTES ((size_t)2 << 20)

/* The weights are streamed once per call at one token: 2 MB pages spare the TLB misses and
 * let the hardware prefetchers run past 4 KB boundaries. Only a hint: without it (other OS,
 * THP off) the memory is ordinary pages. */
static uint8_t *alloc_weight_storage(size_t bytes)
{
    size_t rounded = (bytes + HUGE_PAGE_BYTES - 1) / HUGE_PAGE_BYTES * HUGE_PAGE_BYTES;
    uint8_t *p = (uint8_t *)aligned_alloc(HUGE_PAGE_BYTES, rounded);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (p != NULL) (void)madvise(p, rounded, MADV_HUGEPAGE);
#endif
    return p;
}

static void cpu_release(fp4moe_plan *plan)
{
    cpu_state *st = (cpu_state *)plan->backend_state;
    if (st == NULL) return;
    free(st->storage);
    free(st->fc1);
    free(st->fc2);
    free(st);
    plan->backend_state = NULL;
}

static fp4moe_status cpu_prepare(fp4moe_plan *plan)
{
    const int64_t e_loc = plan->e_loc, n1 = plan->n1;
    const int64_t h = plan->cfg.hidden_size, inter = plan->cfg.intermediate_size;
    cpu_state *st = (cpu_state *)calloc(1, sizeof *st);
    if (st == NULL) return fp4moe_fail(plan->ctx, FP4MOE_ERROR_OUT_OF_MEMORY, "cpu backend state");
    plan->backend_state = st;
    st->kernels = cpu_kernels_for(cpu_isa_selected());
    for (int c = 0; c < 256; c++)
        st->scale_lut[c] = e4m3_to_float((uint8_t)c);

    const size_t c1 = round64(cpu_packed_code_bytes(n1, h)),
                 s1 = round64(cpu_packed_scale_bytes(n1, h));
    const size_t c2 = round64(cpu_packed_code_bytes(h, inter));
    const size_t s2 = round64(cpu_packed_scale_bytes(h, inter));
    const size_t per_expert = c1 + s1 + c2 + s2;
    st->fc1 = (cpu_packed_matrix *)calloc((size_t)e_loc, sizeof *st->fc1);
    st->fc2 = (cpu_packed_matrix *)calloc((size_t)e_loc, sizeof *st->fc2);
    st->storage = alloc_weight_storage(per_expert * (size_t)e_loc);
    if (st->fc1 == NULL || st->fc2 == NULL || st->storage == NULL) {
        cpu_release(plan);
        return fp4moe_fail(plan->ctx, FP4MOE_ERROR_OUT_OF_MEMORY,
                           "cpu backend: %zu bytes of repacked weights",
                           per_expert * (size_t)e_loc);
    }
    const int64_t w1_bytes = n1 * h / 2, w1_scale_bytes = n1 * h / 16;
    const int64_t w2_bytes = h * inter / 2, w2_scale_bytes = h * inter / 16;
#pragma omp parallel for schedule(dynamic, 1) num_threads(plan->ctx->num_threads)
    for (int64_t e = 0; e < e_loc; e++) {
        uint8_t *base = st->storage + (size_t)e * per_expert;
        cpu_packed_init(&st->fc1[e], n1, h, base, base + c1);
        cpu_packed_init(&st->fc2[e], h, inter, base + c1 + s1, base + c1 + s1 + c2);
        cpu_repack_matrix(plan->w.w1 + e * w1_bytes, plan->w.w1_scale + e * w1_scale_bytes,
                          &st->fc1[e]);
        cpu_repack_matrix(plan->w.w2 + e * w2_bytes, plan->w.w2_scale + e * w2_scale_bytes,
                          &st->fc2[e]);
    }
    /* Only the repacked copy stays resident (cpu_export_matrix rebuilds the canonical one). */
    plan_drop_matrices(plan);
    return FP4MOE_SUCCESS;
}

/* The canonical bytes of one expert matrix stack, from the repacked copy. */
static void cpu_export_matrix(const fp4moe_plan *plan, int which, uint8_t *dst)
{
    const cpu_state *st = (const cpu_state *)plan->backend_state;
    const int64_t n1 = plan->n1, h = plan->cfg.hidden_size, inter = plan->cfg.intermediate_size;
    const int fc2 = which == PLAN_MATRIX_W2 || which == PLAN_MATRIX_W2_SCALE;
    const int scales = which == PLAN_MATRIX_W1_SCALE || which == PLAN_MATRIX_W2_SCALE;
    const int64_t rows = fc2 ? h : n1, cols = fc2 ? inter : h;
    const size_t code_bytes = (size_t)(rows * cols / 2), scale_bytes = (size_t)(rows * cols / 16);
    for (int64_t e = 0; e < plan->e_loc; e++) {
        const cpu_packed_matrix *m = fc2 ? &st->fc2[e] : &st->fc1[e];
        cpu_unpack_matrix(m, scales ? NULL : dst + (size_t)e * code_bytes,
                          scales ? dst + (size_t)e * scale_bytes : NULL);
    }
}

static size_t cpu_workspace_size(const fp4moe_plan *plan, int64_t num_tokens)
{
    return cpu_workspace_bytes(plan, num_tokens);
}

static route_params routing_params(const fp4moe_plan *plan)
{
    route_params p;
    p.method = plan->cfg.routing;
    p.num_experts = plan->cfg.num_experts;
    p.top_k = plan->cfg.top_k;
    p.n_group = plan->cfg.n_group;
    p.topk_group = plan->cfg.topk_group;
    p.norm_topk_prob = plan->cfg.norm_topk_prob;
    p.routed_scaling_factor = plan->cfg.routed_scaling_factor;
    p.bias = plan->w.routing_bias;
    return p;
}

/* Routes every token, in parallel; scratch: [threads][E + route_scratch_floats(E)]. */
static void route_all(const fp4moe_plan *plan, int64_t num_tokens, const void *logits,
                      fp4moe_dtype dtype, int32_t *ids, float *weights, float *scratch)
{
    const route_params params = routing_params(plan);
    const int64_t e = plan->cfg.num_experts, k = plan->cfg.top_k;
    const int64_t per_thread = e + route_scratch_floats(e);
    const size_t elt = dtype_size(dtype);
    const int threads = plan->ctx->num_threads;
    /* A few tokens route faster than a parallel region starts. */
    const int parallel = num_tokens * e >= 16384;
#pragma omp parallel num_threads(threads) if (parallel)
    {
        float *row = scratch + (int64_t)omp_get_thread_num() * per_thread;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < num_tokens; t++) {
            load_f32((const uint8_t *)logits + (size_t)(t * e) * elt, dtype, e, row);
            route_token(&params, row, ids + t * k, weights + t * k, row + e);
        }
    }
}

static fp4moe_status cpu_forward(fp4moe_plan *plan, const forward_call *call, void *workspace,
                                 size_t workspace_bytes, void *stream)
{
    (void)workspace_bytes;
    (void)stream;
    const int64_t t_total = call->num_tokens, k = plan->cfg.top_k, e = plan->cfg.num_experts;
    cpu_workspace ws;
    cpu_workspace_carve(plan, t_total, workspace, &ws);

    const int32_t *ids = ws.ids;
    if (call->topk_ids) {
        for (int64_t i = 0; i < t_total * k; i++)
            if (call->topk_ids[i] < 0 || call->topk_ids[i] >= e)
                return fp4moe_fail(plan->ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                                   "topk_ids[%lld] = %d is outside [0, E=%lld)", (long long)i,
                                   (int)call->topk_ids[i], (long long)e);
        ids = call->topk_ids;
        load_f32(call->topk_weights, call->topk_weights_dtype, t_total * k, ws.weights);
    } else {
        route_all(plan, t_total, call->router_logits, call->router_logits_dtype, ws.ids, ws.weights,
                  ws.route_scratch);
        if (call->topk_ids_out)
            memcpy(call->topk_ids_out, ws.ids, (size_t)(t_total * k) * sizeof(int32_t));
        if (call->topk_weights_out)
            memcpy(call->topk_weights_out, ws.weights, (size_t)(t_total * k) * sizeof(float));
    }
    for (int64_t t0 = 0; t0 < t_total; t0 += ws.chunk) {
        const int64_t t1 = t0 + ws.chunk < t_total ? t0 + ws.chunk : t_total;
        cpu_experts_chunk(plan, call, ids, ws.weights, t0, t1, &ws);
    }
    return FP4MOE_SUCCESS;
}

static fp4moe_status cpu_route(fp4moe_plan *plan, int64_t num_tokens, const void *logits,
                               fp4moe_dtype logits_dtype, int32_t *ids_out, float *weights_out,
                               void *workspace, size_t workspace_bytes, void *stream)
{
    (void)workspace_bytes;
    (void)stream;
    cpu_workspace ws;
    cpu_workspace_carve(plan, num_tokens, workspace, &ws);
    route_all(plan, num_tokens, logits, logits_dtype, ids_out, weights_out, ws.route_scratch);
    return FP4MOE_SUCCESS;
}

const backend_ops cpu_backend_ops = {"cpu",       cpu_prepare, cpu_release, cpu_workspace_size,
                                     cpu_forward, cpu_route,   cpu_export_matrix};
