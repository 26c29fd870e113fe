/* Creating the expert-parallel layer: this rank's plans and all of its staging (forward calls
 * never allocate), then one collective round in which the ranks check that they describe the
 * same layer and tile [0, E) with their experts and learn each other's bound on received rows,
 * and a second one (W4A4) in which they learn every expert's input scale, which a sender needs
 * to quantise a row for the expert that will compute it. */
#include <stdlib.h>
#include <string.h>

#include "../core/context.h"
#include "ep_device.h"
#include "ep_internal.h"

/* What every rank tells every other at create. */
enum {
    META_OK,
    META_E0,
    META_E_LOC,
    META_E,
    META_K,
    META_H,
    META_I,
    META_PRECISION,
    META_ON_INPUT,
    META_ROUTING,
    META_ACTIVATION,
    META_MAX_RECEIVED_ROWS,
    META_FIELDS
};

/* Routing needs the routing parameters and the global bias, not the experts: a plan with one
 * all-zero 16x16 expert serves fp4moe_route on every backend at negligible memory. */
static fp4moe_status create_route_plan(fp4moe_ep *ep, const fp4moe_weights *weights)
{
    fp4moe_config c = ep->cfg;
    c.hidden_size = 16;
    c.intermediate_size = 16;
    c.activation = FP4MOE_ACT_IDENTITY;
    c.precision = FP4MOE_PRECISION_W4A16;
    c.fc2_input_fp8 = 0;
    c.local_expert_offset = 0;
    c.local_num_experts = 1;
    static const uint8_t zeros[16 * 8];
    static const float one = 1.0f;
    fp4moe_weights w;
    memset(&w, 0, sizeof w);
    w.w1 = zeros;
    w.w1_scale = zeros;
    w.w1_global_scale = &one;
    w.w2 = zeros;
    w.w2_scale = zeros;
    w.w2_global_scale = &one;
    w.routing_bias = weights->routing_bias;
    return fp4moe_plan_create(ep->ctx, &c, &w, &ep->route_plan);
}

/* The experts run on received rows, each one (token, slot) with its own expert: a plan with
 * top_k = 1 says exactly "one row, one expert, weight 1". The router weight (or, with
 * apply_router_weight_on_input, its product with the input, formed by the sender) and the
 * per-token scale are applied where the token lives. */
static fp4moe_status create_expert_plan(fp4moe_ep *ep, const fp4moe_weights *weights)
{
    fp4moe_config c = ep->cfg;
    c.top_k = 1;
    c.routing = FP4MOE_ROUTING_TOPK;
    c.n_group = 1;
    c.topk_group = 1;
    c.apply_router_weight_on_input = 0;
    fp4moe_weights w = *weights;
    w.routing_bias = NULL;
    ep->expert_rows_max = c.max_tokens;
    return fp4moe_plan_create(ep->ctx, &c, &w, &ep->expert_plan);
}

static fp4moe_status alloc_workspace(fp4moe_ep *ep, fp4moe_plan *plan, int64_t tokens,
                                     void **out, size_t *bytes)
{
    fp4moe_status st = fp4moe_plan_workspace_size(plan, tokens, bytes);
    if (st == FP4MOE_SUCCESS) st = fp4moe_buffer_alloc(ep->ctx, *bytes ? *bytes : 256, out);
    return st;
}

static fp4moe_status setup_local(fp4moe_ep *ep, const fp4moe_config *cfg,
                                 const fp4moe_weights *weights, const fp4moe_ep_options *options)
{
    if (cfg == NULL || weights == NULL)
        return fp4moe_fail(ep->ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "ep: cfg or weights is NULL");
    if (options != NULL) {
        if (options->max_received_rows < 0)
            return fp4moe_fail(ep->ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                               "ep: max_received_rows = %lld must be >= 0 (0: the worst case)",
                               (long long)options->max_received_rows);
        ep->max_received_rows = options->max_received_rows;
    }
    fp4moe_status st = plan_normalise_config(ep->ctx, cfg, &ep->cfg);
    if (st != FP4MOE_SUCCESS) return st;
    if (ep->transport.device_buffers && ep->ctx->backend != FP4MOE_BACKEND_CUDA)
        return fp4moe_fail(ep->ctx, FP4MOE_ERROR_UNSUPPORTED,
                           "ep: the transport moves device memory, the context is not CUDA");
    if ((st = create_route_plan(ep, weights)) != FP4MOE_SUCCESS) return st;
    if ((st = create_expert_plan(ep, weights)) != FP4MOE_SUCCESS) return st;
    if ((st = alloc_workspace(ep, ep->route_plan, ep->cfg.max_tokens, &ep->route_workspace,
                              &ep->route_workspace_bytes)) != FP4MOE_SUCCESS)
        return st;
    if ((st = alloc_workspace(ep, ep->expert_plan, ep->expert_rows_max, &ep->expert_workspace,
                              &ep->expert_workspace_bytes)) != FP4MOE_SUCCESS)
        return st;
    ep->owner = malloc((size_t)ep->cfg.num_experts * sizeof *ep->owner);
    if (ep->owner == NULL)
        return fp4moe_fail(ep->ctx, FP4MOE_ERROR_OUT_OF_MEMORY, "ep: cannot allocate owner");
    if (ep->cfg.precision == FP4MOE_PRECISION_W4A4) {
        ep->a1_global_all = malloc((size_t)ep->cfg.num_experts * sizeof(float));
        ep->w4a4_arith = malloc((size_t)ep->cfg.num_experts * sizeof *ep->w4a4_arith);
        if (ep->a1_global_all == NULL || ep->w4a4_arith == NULL)
            return fp4moe_fail(ep->ctx, FP4MOE_ERROR_OUT_OF_MEMORY, "ep: cannot allocate scales");
    }
    return ep_size_staging(ep);
}

/* Every rank sees every record, so every rank reaches the same verdict. */
static fp4moe_status check_agreement(fp4moe_ep *ep, const int64_t *meta)
{
    const int size = ep->transport.size;
    static const int agree[] = {META_E, META_K, META_H, META_I, META_PRECISION, META_ON_INPUT,
                                META_ROUTING, META_ACTIVATION};
    static const char *const names[] = {"num_experts", "top_k", "hidden_size",
                                        "intermediate_size", "precision",
                                        "apply_router_weight_on_input", "routing", "activation"};
    for (int p = 0; p < size; p++)
        if (!meta[p * META_FIELDS + META_OK])
            return fp4moe_fail(ep->ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                               "ep: rank %d failed to create its part", p);
    for (int p = 1; p < size; p++)
        for (size_t f = 0; f < sizeof agree / sizeof agree[0]; f++)
            if (meta[p * META_FIELDS + agree[f]] != meta[agree[f]])
                return fp4moe_fail(ep->ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                                   "ep: rank %d has %s = %lld, rank 0 has %lld", p, names[f],
                                   (long long)meta[p * META_FIELDS + agree[f]],
                                   (long long)meta[agree[f]]);
    int64_t next = 0;
    for (int p = 0; p < size; p++) {
        if (meta[p * META_FIELDS + META_E0] != next)
            return fp4moe_fail(ep->ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                               "ep: rank %d's experts start at %lld, expected %lld (the ranks' "
                               "ranges must tile [0, num_experts) in rank order)",
                               p, (long long)meta[p * META_FIELDS + META_E0], (long long)next);
        next += meta[p * META_FIELDS + META_E_LOC];
    }
    if (next != meta[META_E])
        return fp4moe_fail(ep->ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                           "ep: the ranks hold %lld experts, num_experts = %lld", (long long)next,
                           (long long)meta[META_E]);
    return FP4MOE_SUCCESS;
}

/* Sends the same bytes to every rank; receives each rank's block of recv_each[p] bytes. */
static fp4moe_status broadcast_each(fp4moe_ep *ep, const void *block, size_t block_bytes,
                                    void *recv, const size_t *recv_each, void *stream)
{
    const int size = ep->transport.size;
    uint8_t *send = malloc(block_bytes * (size_t)size + 1);
    size_t *send_bytes = malloc((size_t)size * sizeof *send_bytes);
    fp4moe_status st = FP4MOE_SUCCESS;
    if (send == NULL || send_bytes == NULL) {
        st = fp4moe_fail(ep->ctx, FP4MOE_ERROR_OUT_OF_MEMORY, "ep: cannot allocate");
    } else {
        for (int p = 0; p < size; p++) {
            memcpy(send + (size_t)p * block_bytes, block, block_bytes);
            send_bytes[p] = block_bytes;
        }
        st = ep_exchange(ep, send, send_bytes, recv, recv_each, stream);
    }
    free(send);
    free(send_bytes);
    return st;
}

/* Every expert's W4A4 quantiser arithmetic as the expert backend computes it, so that W4A4
 * dispatch makes the codes of the single-device layer (on CUDA: rcp.approx, measured once). */
static fp4moe_status build_w4a4_arith(fp4moe_ep *ep)
{
    const int64_t experts = ep->cfg.num_experts;
    for (int64_t e = 0; e < experts; e++)
        ep_w4a4_cpu_arith(ep->a1_global_all[e], &ep->w4a4_arith[e]);
    if (ep->ctx->backend != FP4MOE_BACKEND_CUDA) return FP4MOE_SUCCESS;
    float rcp6 = 0.0f, *table = malloc((size_t)experts * 256 * sizeof(float));
    if (table == NULL) return fp4moe_fail(ep->ctx, FP4MOE_ERROR_OUT_OF_MEMORY, "ep: cannot allocate");
    const int code = ep_device_w4a4_reciprocals(ep->a1_global_all, experts, &rcp6, table);
    if (code == 0)
        for (int64_t e = 0; e < experts; e++) {
            ep->w4a4_arith[e].rcp6 = rcp6;
            memcpy(ep->w4a4_arith[e].out_scale, table + e * 256, sizeof ep->w4a4_arith[e].out_scale);
        }
    free(table);
    if (code != 0)
        return fp4moe_fail(ep->ctx, FP4MOE_ERROR_CUDA, "ep: W4A4 reciprocals on the GPU: %s",
                           ep_device_error_string(code));
    return FP4MOE_SUCCESS;
}

static fp4moe_status exchange_metadata(fp4moe_ep *ep, int local_ok, const fp4moe_weights *weights,
                                       void *stream)
{
    const int size = ep->transport.size;
    int64_t mine[META_FIELDS];
    const fp4moe_config *c = &ep->cfg;
    mine[META_OK] = local_ok;
    mine[META_E0] = c->local_expert_offset;
    mine[META_E_LOC] = c->local_num_experts;
    mine[META_E] = c->num_experts;
    mine[META_K] = c->top_k;
    mine[META_H] = c->hidden_size;
    mine[META_I] = c->intermediate_size;
    mine[META_PRECISION] = c->precision;
    mine[META_ON_INPUT] = c->apply_router_weight_on_input;
    mine[META_ROUTING] = c->routing;
    mine[META_ACTIVATION] = c->activation;
    mine[META_MAX_RECEIVED_ROWS] = ep->max_received_rows;
    int64_t *meta = malloc((size_t)size * sizeof mine);
    size_t *recv_bytes = malloc((size_t)size * sizeof *recv_bytes);
    fp4moe_status st = FP4MOE_SUCCESS;
    if (meta == NULL || recv_bytes == NULL) {
        /* Cannot take part: the peers will see a transport error or wait; nothing better. */
        st = fp4moe_fail(ep->ctx, FP4MOE_ERROR_OUT_OF_MEMORY, "ep: cannot allocate");
        goto done;
    }
    for (int p = 0; p < size; p++)
        recv_bytes[p] = sizeof mine;
    if ((st = broadcast_each(ep, mine, sizeof mine, meta, recv_bytes, stream)) != FP4MOE_SUCCESS)
        goto done;
    if (!local_ok) { /* keep this rank's own message */
        st = FP4MOE_ERROR_INVALID_ARGUMENT;
        goto done;
    }
    if ((st = check_agreement(ep, meta)) != FP4MOE_SUCCESS) goto done;
    for (int p = 0; p < size; p++) {
        const int64_t e0 = meta[p * META_FIELDS + META_E0], n = meta[p * META_FIELDS + META_E_LOC];
        for (int64_t e = e0; e < e0 + n; e++)
            ep->owner[e] = p;
        ep->received_rows_bound[p] = meta[p * META_FIELDS + META_MAX_RECEIVED_ROWS];
        recv_bytes[p] = (size_t)n * sizeof(float);
    }
    if (ep->a1_global_all != NULL) {
        st = broadcast_each(ep, weights->a1_global_scale,
                            (size_t)c->local_num_experts * sizeof(float), ep->a1_global_all,
                            recv_bytes, stream);
        if (st == FP4MOE_SUCCESS) st = build_w4a4_arith(ep);
    }
done:
    free(meta);
    free(recv_bytes);
    return st;
}

fp4moe_status fp4moe_ep_create(fp4moe_context *ctx, const fp4moe_config *cfg,
                               const fp4moe_weights *weights,
                               const fp4moe_ep_transport *transport, void *stream,
                               fp4moe_ep **out)
{
    return fp4moe_ep_create_with_options(ctx, cfg, weights, transport, NULL, stream, out);
}

fp4moe_status fp4moe_ep_create_with_options(fp4moe_context *ctx, const fp4moe_config *cfg,
                                            const fp4moe_weights *weights,
                                            const fp4moe_ep_transport *transport,
                                            const fp4moe_ep_options *options, void *stream,
                                            fp4moe_ep **out)
{
    if (ctx == NULL) return FP4MOE_ERROR_INVALID_ARGUMENT;
    fp4moe_clear_error(ctx);
    const fp4moe_status bad = FP4MOE_ERROR_INVALID_ARGUMENT;
    if (out == NULL) return fp4moe_fail(ctx, bad, "ep: out is NULL");
    *out = NULL;
    if (transport == NULL || transport->all_to_all_v == NULL)
        return fp4moe_fail(ctx, bad, "ep: transport or its all_to_all_v is NULL");
    if (transport->size < 1 || transport->rank < 0 || transport->rank >= transport->size)
        return fp4moe_fail(ctx, bad, "ep: transport rank %d, size %d: need 0 <= rank < size",
                           transport->rank, transport->size);
    fp4moe_ep *ep = calloc(1, sizeof *ep);
    if (ep == NULL) return fp4moe_fail(ctx, FP4MOE_ERROR_OUT_OF_MEMORY, "ep: cannot allocate");
    ep->ctx = ctx;
    ep->transport = *transport;
    ep_buffer *device_side[] = {&ep->dev_ids, &ep->dev_weights, &ep->dev_rows_hidden,
                                &ep->dev_rows_ids, &ep->dev_rows_ones, &ep->dev_rows_out,
                                &ep->dev_send, &ep->dev_recv, &ep->dev_result_row};
    for (size_t i = 0; i < sizeof device_side / sizeof device_side[0]; i++)
        device_side[i]->backend_memory = 1;

    fp4moe_status local = setup_local(ep, cfg, weights, options);
    char saved[FP4MOE_MESSAGE_BYTES];
    memcpy(saved, ctx->last_error, sizeof saved);
    fp4moe_status st = exchange_metadata(ep, local == FP4MOE_SUCCESS, weights, stream);
    if (local != FP4MOE_SUCCESS) st = fp4moe_fail(ctx, local, "%s", saved); /* staging clears it */
    if (st != FP4MOE_SUCCESS) {
        fp4moe_ep_destroy(ep); /* makes no call that touches the message */
        return st;
    }
    ep->staging_sized = 1;
    *out = ep;
    return FP4MOE_SUCCESS;
}

void fp4moe_ep_destroy(fp4moe_ep *ep)
{
    if (ep == NULL) return;
    ep_release_staging(ep);
    fp4moe_buffer_free(ep->ctx, ep->route_workspace);
    fp4moe_buffer_free(ep->ctx, ep->expert_workspace);
    fp4moe_plan_destroy(ep->route_plan);
    fp4moe_plan_destroy(ep->expert_plan);
    free(ep->owner);
    free(ep->a1_global_all);
    free(ep->w4a4_arith);
    free(ep);
}

fp4moe_status fp4moe_ep_last_stats(const fp4moe_ep *ep, fp4moe_ep_stats *out)
{
    if (ep == NULL || out == NULL) return FP4MOE_ERROR_INVALID_ARGUMENT;
    *out = ep->stats;
    return FP4MOE_SUCCESS;
}
