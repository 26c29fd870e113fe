/* One expert-parallel forward call (docs/EP.md): route, count, dispatch, compute, return,
 * combine, over staging buffers sized at create (nothing here allocates: ep_buffer_reserve only
 * checks). The bookkeeping (which rank, which row) is made on the host from the routed ids.
 * The rows themselves move on the device (ep_device.h: pack, the transport, unpack, combine)
 * when the backend is CUDA, the transport takes device buffers and the dispatched row is the
 * hidden row as given (W4A16 without the router weight on the input); otherwise the host
 * packs, unpacks and combines (on CUDA the inputs downloaded once, the output uploaded once).
 *
 * Exactness: the expert computes each received row as the plain layer computes that (token,
 * slot) (same input bits, same expert, FP32 output), and the combine below is the CPU
 * backend's finalize (cpu_experts.c, finalize_token) operation for operation: FP32
 * sum = w0*y0, then sum = sum + wj*yj in slot order, then p*sum, then one rounding. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../core/context.h"
#include "../format/format.h"
#include "ep_device.h"
#include "ep_internal.h"

/* The count message, the same to every peer: whether this rank is fine, its hidden dtype, then
 * the rows it sends to each rank. Every rank thus sees every rank's row counts and reaches the
 * same verdict on every check, the bound on received rows included. */
enum { COUNT_OK, COUNT_DTYPE, COUNT_ROWS_TO };

typedef struct call_state {
    const fp4moe_forward_args *args;
    int routed;
    int64_t t, k, h;
    fp4moe_dtype dtype; /* the hidden dtype of the rows this rank computes */
    const uint8_t *hidden;       /* host [T, H] */
    const float *token_scale;    /* host [T] or NULL */
    int32_t *ids;                /* host [T*k] */
    float *weights;              /* host [T*k] FP32 */
    int32_t *dest;               /* [T*k] rank of each slot's expert */
    int64_t *slot_row;           /* [T*k] position of the slot in its rank's rows */
    int64_t *send_rows, *recv_rows; /* [size] */
    size_t *send_bytes, *recv_bytes; /* [size] */
    int64_t total_recv;
    int device;                  /* the device path (see the top of this file) */
    const void *dev_hidden;      /* device path: [T, H], the caller's */
    const int32_t *dev_ids;      /* device path: [T*k] */
    const float *dev_weights;    /* device path: [T*k] FP32 */
} call_state;

size_t fp4moe_ep_dispatch_row_bytes(const fp4moe_ep *ep, fp4moe_dtype hidden_dtype)
{
    if (ep == NULL || dtype_size(hidden_dtype) == 0 || hidden_dtype == FP4MOE_DTYPE_I32 ||
        hidden_dtype == FP4MOE_DTYPE_U8 || hidden_dtype == FP4MOE_DTYPE_E4M3)
        return 0;
    const int64_t h = ep->cfg.hidden_size;
    const size_t payload = ep->cfg.precision == FP4MOE_PRECISION_W4A4
                               ? ep_w4a4_payload_bytes(h, hidden_dtype)
                               : (size_t)h * dtype_size(hidden_dtype);
    return sizeof(int32_t) + payload;
}

static int is_activation_dtype(fp4moe_dtype d)
{
    return d == FP4MOE_DTYPE_F32 || d == FP4MOE_DTYPE_F16 || d == FP4MOE_DTYPE_BF16;
}

static fp4moe_status check_args(fp4moe_ep *ep, const fp4moe_forward_args *a, int routed)
{
    fp4moe_context *ctx = ep->ctx;
    const fp4moe_status bad = FP4MOE_ERROR_INVALID_ARGUMENT;
    if (a == NULL) return fp4moe_fail(ctx, bad, "ep: args is NULL");
    if (a->num_tokens < 0 || a->num_tokens > ep->cfg.max_tokens)
        return fp4moe_fail(ctx, bad, "ep: num_tokens = %lld must be in [0, max_tokens = %lld]",
                           (long long)a->num_tokens, (long long)ep->cfg.max_tokens);
    if (!is_activation_dtype(a->hidden_dtype))
        return fp4moe_fail(ctx, bad, "ep: hidden_dtype = %d must be F32, F16 or BF16",
                           (int)a->hidden_dtype);
    if (a->output_dtype != FP4MOE_DTYPE_F32 && a->output_dtype != a->hidden_dtype)
        return fp4moe_fail(ctx, bad, "ep: output_dtype = %s must be F32 or the hidden dtype (%s)",
                           dtype_name(a->output_dtype), dtype_name(a->hidden_dtype));
    if (a->skip_finalize != 0 && a->skip_finalize != 1)
        return fp4moe_fail(ctx, bad, "ep: skip_finalize = %d must be 0 or 1", a->skip_finalize);
    if (a->num_tokens == 0) return FP4MOE_SUCCESS;
    if (a->hidden_states == NULL) return fp4moe_fail(ctx, bad, "ep: hidden_states is NULL");
    if (a->output == NULL) return fp4moe_fail(ctx, bad, "ep: output is NULL");
    if (routed) {
        if (a->topk_ids == NULL || a->topk_weights == NULL)
            return fp4moe_fail(ctx, bad, "ep: topk_ids or topk_weights is NULL");
        if (!is_activation_dtype(a->topk_weights_dtype))
            return fp4moe_fail(ctx, bad, "ep: topk_weights_dtype = %d must be F32, F16 or BF16",
                               (int)a->topk_weights_dtype);
    } else {
        if (a->router_logits == NULL) return fp4moe_fail(ctx, bad, "ep: router_logits is NULL");
        if (!is_activation_dtype(a->router_logits_dtype))
            return fp4moe_fail(ctx, bad, "ep: router_logits_dtype = %d must be F32, F16 or BF16",
                               (int)a->router_logits_dtype);
    }
    return FP4MOE_SUCCESS;
}

#define TRY(expr)                                                                                  \
    do {                                                                                           \
        fp4moe_status try_status_ = (expr);                                                        \
        if (try_status_ != FP4MOE_SUCCESS) return try_status_;                                     \
    } while (0)

/* Ids and FP32 weights of this rank's tokens on the host; hidden states and per-token scales
 * readable on the host. */
static fp4moe_status load_inputs(fp4moe_ep *ep, call_state *cs, void *stream)
{
    const fp4moe_forward_args *a = cs->args;
    const int64_t slots = cs->t * cs->k;
    const int cuda = ep->ctx->backend == FP4MOE_BACKEND_CUDA;
    TRY(ep_buffer_reserve(ep, &ep->ids, (size_t)slots * sizeof(int32_t)));
    TRY(ep_buffer_reserve(ep, &ep->weights, (size_t)slots * sizeof(float)));
    cs->ids = ep->ids.data;
    cs->weights = ep->weights.data;
    if (cs->routed) {
        TRY(ep_to_host(ep, cs->ids, a->topk_ids, (size_t)slots * sizeof(int32_t), stream));
        const size_t wbytes = (size_t)slots * dtype_size(a->topk_weights_dtype);
        TRY(ep_buffer_reserve(ep, &ep->scratch, wbytes));
        TRY(ep_to_host(ep, ep->scratch.data, a->topk_weights, wbytes, stream));
        load_f32(ep->scratch.data, a->topk_weights_dtype, slots, cs->weights);
        for (int64_t s = 0; s < slots; s++)
            if (cs->ids[s] < 0 || cs->ids[s] >= ep->cfg.num_experts)
                return fp4moe_fail(ep->ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                                   "ep: topk_ids[%lld] = %d is not in [0, num_experts = %lld)",
                                   (long long)s, cs->ids[s], (long long)ep->cfg.num_experts);
        if (cs->device) { /* the caller's ids; the weights as FP32 */
            TRY(ep_buffer_reserve(ep, &ep->dev_weights, (size_t)slots * sizeof(float)));
            TRY(ep_from_host(ep, ep->dev_weights.data, cs->weights, (size_t)slots * sizeof(float)));
            cs->dev_ids = a->topk_ids;
            cs->dev_weights = ep->dev_weights.data;
        }
    } else {
        int32_t *ids_out = cs->ids;
        float *weights_out = cs->weights;
        if (cuda) {
            TRY(ep_buffer_reserve(ep, &ep->dev_ids, (size_t)slots * sizeof(int32_t)));
            TRY(ep_buffer_reserve(ep, &ep->dev_weights, (size_t)slots * sizeof(float)));
            ids_out = ep->dev_ids.data;
            weights_out = ep->dev_weights.data;
        }
        TRY(fp4moe_route(ep->route_plan, cs->t, a->router_logits, a->router_logits_dtype, ids_out,
                         weights_out, ep->route_workspace, ep->route_workspace_bytes, stream));
        cs->dev_ids = ids_out;
        cs->dev_weights = weights_out;
        TRY(ep_to_host(ep, cs->ids, ids_out, (size_t)slots * sizeof(int32_t), stream));
        TRY(ep_to_host(ep, cs->weights, weights_out, (size_t)slots * sizeof(float), stream));
        if (a->topk_ids_out)
            TRY(ep_from_host(ep, a->topk_ids_out, cs->ids, (size_t)slots * sizeof(int32_t)));
        if (a->topk_weights_out)
            TRY(ep_from_host(ep, a->topk_weights_out, cs->weights, (size_t)slots * sizeof(float)));
    }
    const size_t hidden_bytes = (size_t)(cs->t * cs->h) * dtype_size(cs->dtype);
    cs->hidden = a->hidden_states;
    cs->token_scale = a->per_token_scale;
    cs->dev_hidden = a->hidden_states;
    if (cuda && !cs->device) {
        TRY(ep_buffer_reserve(ep, &ep->hidden_in, hidden_bytes));
        TRY(ep_to_host(ep, ep->hidden_in.data, a->hidden_states, hidden_bytes, stream));
        cs->hidden = ep->hidden_in.data;
        if (a->per_token_scale) {
            TRY(ep_buffer_reserve(ep, &ep->token_scale, (size_t)cs->t * sizeof(float)));
            TRY(ep_to_host(ep, ep->token_scale.data, a->per_token_scale,
                           (size_t)cs->t * sizeof(float), stream));
            cs->token_scale = ep->token_scale.data;
        }
    }
    return FP4MOE_SUCCESS;
}

/* Each slot's rank and its position among the rows sent there: (token, slot) order. */
static fp4moe_status assign_slots(fp4moe_ep *ep, call_state *cs)
{
    const int64_t slots = cs->t * cs->k;
    TRY(ep_buffer_reserve(ep, &ep->dest, (size_t)slots * sizeof(int32_t)));
    TRY(ep_buffer_reserve(ep, &ep->slot_row, (size_t)slots * sizeof(int64_t)));
    cs->dest = ep->dest.data;
    cs->slot_row = ep->slot_row.data;
    for (int p = 0; p < ep->transport.size; p++)
        cs->send_rows[p] = 0;
    for (int64_t s = 0; s < slots; s++) {
        const int32_t p = ep->owner[cs->ids[s]];
        cs->dest[s] = p;
        cs->slot_row[s] = cs->send_rows[p]++;
    }
    return FP4MOE_SUCCESS;
}

/* The count exchange, which every rank makes even when its own part failed, so that a bad
 * argument on one rank fails the call everywhere instead of leaving peers blocked. */
static fp4moe_status exchange_counts(fp4moe_ep *ep, call_state *cs, int local_ok, void *stream)
{
    const int size = ep->transport.size;
    const size_t fields = 2 + (size_t)size, bytes = fields * sizeof(int64_t);
    int64_t *send = ep->count_send, *recv = ep->count_recv;
    for (int p = 0; p < size; p++) {
        int64_t *m = send + (size_t)p * fields;
        m[COUNT_OK] = local_ok;
        m[COUNT_DTYPE] = cs->t > 0 ? (int64_t)cs->dtype : -1;
        for (int q = 0; q < size; q++)
            m[COUNT_ROWS_TO + q] = local_ok ? cs->send_rows[q] : 0;
        ep->count_bytes[p] = bytes;
    }
    TRY(ep_exchange(ep, send, ep->count_bytes, recv, ep->count_bytes, stream));
    ep->stats.count_bytes = (size_t)size * bytes;
    if (!local_ok) return FP4MOE_ERROR_INVALID_ARGUMENT; /* this rank's message stays */
    const int me = ep->transport.rank;
    int64_t common_dtype = -1; /* every rank sees every rank's dtype: the verdict is shared */
    for (int p = 0; p < size; p++) {
        const int64_t *m = recv + (size_t)p * fields;
        if (!m[COUNT_OK])
            return fp4moe_fail(ep->ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                               "ep: rank %d rejected its part of this call (see its message)", p);
        cs->recv_rows[p] = m[COUNT_ROWS_TO + me];
        if (m[COUNT_DTYPE] < 0) continue; /* no tokens on that rank */
        if (common_dtype >= 0 && m[COUNT_DTYPE] != common_dtype)
            return fp4moe_fail(ep->ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                               "ep: the ranks pass different hidden dtypes (%s on rank %d, %s on "
                               "an earlier rank)",
                               dtype_name((fp4moe_dtype)m[COUNT_DTYPE]), p,
                               dtype_name((fp4moe_dtype)common_dtype));
        common_dtype = m[COUNT_DTYPE];
    }
    /* Every rank's total against its bound, in rank order: all ranks name the same one. The
     * senders' counts are each <= max_tokens * top_k, so the sums cannot overflow. */
    for (int q = 0; q < size; q++) {
        int64_t total = 0;
        for (int p = 0; p < size; p++)
            total += recv[(size_t)p * fields + COUNT_ROWS_TO + q];
        if (total > ep->received_rows_bound[q])
            return fp4moe_fail(ep->ctx, FP4MOE_ERROR_WORKSPACE_TOO_SMALL,
                               "ep: rank %d would receive %lld rows in this call, more than its "
                               "max_received_rows = %lld (fp4moe_ep_options); nothing was sent",
                               q, (long long)total, (long long)ep->received_rows_bound[q]);
        if (q == me) cs->total_recv = total;
    }
    /* A rank without tokens computes rows in the senders' dtype. */
    if (common_dtype >= 0) cs->dtype = (fp4moe_dtype)common_dtype;
    return FP4MOE_SUCCESS;
}

/* Rows to every rank: [int32 expert id][payload], in (token, slot) order per rank. */
static fp4moe_status dispatch(fp4moe_ep *ep, call_state *cs, void *stream)
{
    const int size = ep->transport.size;
    const size_t rec = fp4moe_ep_dispatch_row_bytes(ep, cs->dtype), elt = dtype_size(cs->dtype);
    size_t send_total = 0, recv_total = 0;
    for (int p = 0; p < size; p++) {
        cs->send_bytes[p] = (size_t)cs->send_rows[p] * rec;
        cs->recv_bytes[p] = (size_t)cs->recv_rows[p] * rec;
        send_total += cs->send_bytes[p];
        recv_total += cs->recv_bytes[p];
    }
    ep->stats.dispatch_bytes_sent = send_total;
    ep->stats.dispatch_bytes_received = recv_total;
    if (cs->device) {
        /* each slot's row among all rows sent (peer by peer): its record and its result row */
        const int64_t slots = cs->t * cs->k;
        int64_t *row_index = cs->slot_row; /* rewritten in place: the host combine is not used */
        int64_t *first_row = ep->peer_first_row;
        first_row[0] = 0;
        for (int p = 1; p < size; p++)
            first_row[p] = first_row[p - 1] + cs->send_rows[p - 1];
        for (int64_t s = 0; s < slots; s++)
            row_index[s] += first_row[cs->dest[s]];
        TRY(ep_buffer_reserve(ep, &ep->dev_result_row, (size_t)slots * sizeof(int64_t)));
        TRY(ep_buffer_reserve(ep, &ep->dev_send, send_total));
        TRY(ep_buffer_reserve(ep, &ep->dev_recv, recv_total));
        TRY(ep_from_host(ep, ep->dev_result_row.data, row_index, (size_t)slots * sizeof(int64_t)));
        const int code = ep_device_pack(cs->dev_hidden, (size_t)cs->h * elt, cs->dev_ids,
                                        ep->dev_result_row.data, slots, cs->k, ep->dev_send.data,
                                        stream);
        if (code)
            return fp4moe_fail(ep->ctx, FP4MOE_ERROR_CUDA, "ep: pack kernel: %s",
                               ep_device_error_string(code));
        return ep_exchange_device(ep, ep->dev_send.data, cs->send_bytes, ep->dev_recv.data,
                                  cs->recv_bytes, stream);
    }
    TRY(ep_buffer_reserve(ep, &ep->send, send_total));
    TRY(ep_buffer_reserve(ep, &ep->recv, recv_total));
    TRY(ep_buffer_reserve(ep, &ep->scratch, (size_t)cs->h * sizeof(float)));
    uint8_t *send = ep->send.data;
    float *x = ep->scratch.data;
    size_t *start = ep->peer_start;
    start[0] = 0;
    for (int p = 1; p < size; p++)
        start[p] = start[p - 1] + cs->send_bytes[p - 1];
    const int on_input = ep->cfg.apply_router_weight_on_input;
    const int w4a4 = ep->cfg.precision == FP4MOE_PRECISION_W4A4;
    for (int64_t s = 0; s < cs->t * cs->k; s++) {
        const int64_t t = s / cs->k;
        uint8_t *r = send + start[cs->dest[s]] + (size_t)cs->slot_row[s] * rec;
        const uint8_t *row = cs->hidden + (size_t)(t * cs->h) * elt;
        memcpy(r, &cs->ids[s], sizeof(int32_t));
        uint8_t *payload = r + sizeof(int32_t);
        if (!on_input && !w4a4) { /* the row as given */
            memcpy(payload, row, (size_t)cs->h * elt);
            continue;
        }
        /* The FC1 input of the plain layer before quantisation (cpu_experts.c gather_input). */
        load_f32(row, cs->dtype, cs->h, x);
        if (on_input) {
            const float w = cs->weights[s];
            for (int64_t i = 0; i < cs->h; i++)
                x[i] = w * x[i];
            round_to_dtype(x, cs->h, cs->dtype);
        }
        if (w4a4)
            ep_w4a4_encode_row(x, cs->h, cs->dtype, &ep->w4a4_arith[cs->ids[s]], payload);
        else
            store_f32(x, cs->h, cs->dtype, payload);
    }
    return ep_exchange(ep, send, cs->send_bytes, ep->recv.data, cs->recv_bytes, stream);
}

/* The expert plan over rows [0, rows) of hidden / ids (backend memory), in chunks of its
 * max_tokens: top_k = 1, weight 1 (ones: [chunk]), finalize off, FP32 rows into out. */
static fp4moe_status run_expert_rows(fp4moe_ep *ep, const call_state *cs, const void *hidden,
                                     const int32_t *ids, const float *ones, float *out,
                                     int64_t rows, int64_t chunk, void *stream)
{
    const int64_t h = cs->h;
    const size_t elt = dtype_size(cs->dtype);
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
        fp4moe_forward_args a;
        fp4moe_forward_args_init(&a);
        a.num_tokens = rows - r0 < chunk ? rows - r0 : chunk;
        a.hidden_states = (const uint8_t *)hidden + (size_t)(r0 * h) * elt;
        a.hidden_dtype = cs->dtype;
        a.topk_ids = ids + r0;
        a.topk_weights = ones;
        a.topk_weights_dtype = FP4MOE_DTYPE_F32;
        a.output = out + r0 * h;
        a.output_dtype = FP4MOE_DTYPE_F32;
        a.skip_finalize = 1;
        TRY(fp4moe_forward_routed(ep->expert_plan, &a, ep->expert_workspace,
                                  ep->expert_workspace_bytes, stream));
    }
    return FP4MOE_SUCCESS;
}

/* The device path's compute: records unpacked on the GPU, results left in dev_rows_out. */
static fp4moe_status compute_rows_device(fp4moe_ep *ep, call_state *cs, void *stream)
{
    const int64_t rows = cs->total_recv, h = cs->h;
    const size_t rec = fp4moe_ep_dispatch_row_bytes(ep, cs->dtype), elt = dtype_size(cs->dtype);
    const int64_t chunk = rows < ep->expert_rows_max ? rows : ep->expert_rows_max;
    TRY(ep_buffer_reserve(ep, &ep->dev_rows_out, (size_t)(rows * h) * sizeof(float)));
    if (rows == 0) return FP4MOE_SUCCESS;
    TRY(ep_buffer_reserve(ep, &ep->dev_rows_hidden, (size_t)(rows * h) * elt));
    TRY(ep_buffer_reserve(ep, &ep->dev_rows_ids, (size_t)rows * sizeof(int32_t)));
    TRY(ep_buffer_reserve(ep, &ep->dev_rows_ones, (size_t)chunk * sizeof(float)));
    TRY(ep_buffer_reserve(ep, &ep->rows_ones, (size_t)chunk * sizeof(float)));
    float *ones = ep->rows_ones.data;
    for (int64_t i = 0; i < chunk; i++)
        ones[i] = 1.0f;
    TRY(ep_from_host(ep, ep->dev_rows_ones.data, ones, (size_t)chunk * sizeof(float)));
    const int code = ep_device_unpack(ep->dev_recv.data, rows, rec, (size_t)h * elt,
                                      ep->dev_rows_hidden.data, ep->dev_rows_ids.data, stream);
    if (code)
        return fp4moe_fail(ep->ctx, FP4MOE_ERROR_CUDA, "ep: unpack kernel: %s",
                           ep_device_error_string(code));
    return run_expert_rows(ep, cs, ep->dev_rows_hidden.data, ep->dev_rows_ids.data,
                           ep->dev_rows_ones.data, ep->dev_rows_out.data, rows, chunk, stream);
}

/* The plain layer on the received rows: top_k = 1, weight 1, finalize off, FP32 out. */
static fp4moe_status compute_rows(fp4moe_ep *ep, call_state *cs, void *stream)
{
    const int64_t rows = cs->total_recv, h = cs->h;
    const size_t rec = fp4moe_ep_dispatch_row_bytes(ep, cs->dtype), elt = dtype_size(cs->dtype);
    const int64_t chunk = rows < ep->expert_rows_max ? rows : ep->expert_rows_max;
    TRY(ep_buffer_reserve(ep, &ep->rows_out, (size_t)(rows * h) * sizeof(float)));
    if (rows == 0) return FP4MOE_SUCCESS;
    TRY(ep_buffer_reserve(ep, &ep->rows_hidden, (size_t)(rows * h) * elt));
    TRY(ep_buffer_reserve(ep, &ep->rows_ids, (size_t)rows * sizeof(int32_t)));
    TRY(ep_buffer_reserve(ep, &ep->rows_ones, (size_t)chunk * sizeof(float)));
    uint8_t *hidden = ep->rows_hidden.data;
    int32_t *ids = ep->rows_ids.data;
    float *ones = ep->rows_ones.data;
    const uint8_t *recv = ep->recv.data;
    const int me = ep->transport.rank;
    for (int64_t i = 0; i < rows; i++) {
        const uint8_t *r = recv + (size_t)i * rec;
        int32_t id;
        memcpy(&id, r, sizeof id);
        if (id < 0 || id >= ep->cfg.num_experts || ep->owner[id] != me)
            return fp4moe_fail(ep->ctx, FP4MOE_ERROR_INTERNAL,
                               "ep: received row %lld for expert %d, not on this rank",
                               (long long)i, id);
        ids[i] = id;
        uint8_t *dst = hidden + (size_t)(i * h) * elt;
        if (ep->cfg.precision == FP4MOE_PRECISION_W4A4) {
            if (ep_w4a4_decode_row(r + sizeof(int32_t), h, cs->dtype, &ep->w4a4_arith[id], dst))
                return fp4moe_fail(ep->ctx, FP4MOE_ERROR_INTERNAL,
                                   "ep: received row %lld does not decode to its NVFP4 codes",
                                   (long long)i);
        } else {
            memcpy(dst, r + sizeof(int32_t), (size_t)h * elt);
        }
    }
    for (int64_t i = 0; i < chunk; i++)
        ones[i] = 1.0f;

    const int cuda = ep->ctx->backend == FP4MOE_BACKEND_CUDA;
    const void *in_hidden = hidden;
    const int32_t *in_ids = ids;
    const float *in_ones = ones;
    float *out = ep->rows_out.data;
    if (cuda) {
        TRY(ep_buffer_reserve(ep, &ep->dev_rows_hidden, (size_t)(rows * h) * elt));
        TRY(ep_buffer_reserve(ep, &ep->dev_rows_ids, (size_t)rows * sizeof(int32_t)));
        TRY(ep_buffer_reserve(ep, &ep->dev_rows_ones, (size_t)chunk * sizeof(float)));
        TRY(ep_buffer_reserve(ep, &ep->dev_rows_out, (size_t)(rows * h) * sizeof(float)));
        TRY(ep_from_host(ep, ep->dev_rows_hidden.data, hidden, (size_t)(rows * h) * elt));
        TRY(ep_from_host(ep, ep->dev_rows_ids.data, ids, (size_t)rows * sizeof(int32_t)));
        TRY(ep_from_host(ep, ep->dev_rows_ones.data, ones, (size_t)chunk * sizeof(float)));
        in_hidden = ep->dev_rows_hidden.data;
        in_ids = ep->dev_rows_ids.data;
        in_ones = ep->dev_rows_ones.data;
        out = ep->dev_rows_out.data;
    }
    TRY(run_expert_rows(ep, cs, in_hidden, in_ids, in_ones, out, rows, chunk, stream));
    if (cuda)
        TRY(ep_to_host(ep, ep->rows_out.data, out, (size_t)(rows * h) * sizeof(float), stream));
    return FP4MOE_SUCCESS;
}

/* FP32 results back to the ranks that own the tokens (the reverse of dispatch). */
static fp4moe_status return_results(fp4moe_ep *ep, call_state *cs, void *stream)
{
    const int size = ep->transport.size;
    const size_t row = (size_t)cs->h * sizeof(float);
    size_t send_total = 0, recv_total = 0;
    for (int p = 0; p < size; p++) {
        cs->send_bytes[p] = (size_t)cs->recv_rows[p] * row;
        cs->recv_bytes[p] = (size_t)cs->send_rows[p] * row;
        send_total += cs->send_bytes[p];
        recv_total += cs->recv_bytes[p];
    }
    ep->stats.combine_bytes_sent = send_total;
    ep->stats.combine_bytes_received = recv_total;
    if (cs->device) { /* into dev_recv, free again since compute_rows_device unpacked it */
        TRY(ep_buffer_reserve(ep, &ep->dev_recv, recv_total));
        return ep_exchange_device(ep, ep->dev_rows_out.data, cs->send_bytes, ep->dev_recv.data,
                                  cs->recv_bytes, stream);
    }
    TRY(ep_buffer_reserve(ep, &ep->results, recv_total));
    return ep_exchange(ep, ep->rows_out.data, cs->send_bytes, ep->results.data, cs->recv_bytes,
                       stream);
}

static fp4moe_status combine(fp4moe_ep *ep, call_state *cs, void *stream)
{
    const fp4moe_forward_args *a = cs->args;
    if (cs->device) {
        const int code = ep_device_combine(ep->dev_recv.data, ep->dev_result_row.data,
                                           cs->dev_weights, cs->t, cs->k, cs->h,
                                           a->per_token_scale, a->skip_finalize, a->output,
                                           (int)a->output_dtype, stream);
        if (code)
            return fp4moe_fail(ep->ctx, FP4MOE_ERROR_CUDA, "ep: combine kernel: %s",
                               ep_device_error_string(code));
        return FP4MOE_SUCCESS;
    }
    const int size = ep->transport.size;
    const int64_t k = cs->k, h = cs->h;
    const size_t out_elt = dtype_size(a->output_dtype);
    const size_t out_bytes = (size_t)((a->skip_finalize ? cs->t * k : cs->t) * h) * out_elt;
    uint8_t *out = a->output;
    if (ep->ctx->backend == FP4MOE_BACKEND_CUDA) {
        TRY(ep_buffer_reserve(ep, &ep->out_host, out_bytes));
        out = ep->out_host.data;
    }
    TRY(ep_buffer_reserve(ep, &ep->scratch, (size_t)h * sizeof(float)));
    float *sum = ep->scratch.data;
    int64_t *first_row = ep->peer_first_row;
    first_row[0] = 0;
    for (int p = 1; p < size; p++)
        first_row[p] = first_row[p - 1] + cs->send_rows[p - 1];
    const float *results = ep->results.data;
    const int on_input = ep->cfg.apply_router_weight_on_input;
    for (int64_t t = 0; t < cs->t; t++) {
        for (int64_t j = 0; j < k; j++) {
            const int64_t s = t * k + j;
            const float *y = results + (first_row[cs->dest[s]] + cs->slot_row[s]) * h;
            if (a->skip_finalize) {
                store_f32(y, h, a->output_dtype, out + (size_t)(s * h) * out_elt);
                continue;
            }
            const float w = on_input ? 1.0f : cs->weights[s];
            if (j == 0) {
                for (int64_t i = 0; i < h; i++)
                    sum[i] = w * y[i];
            } else {
                for (int64_t i = 0; i < h; i++)
                    sum[i] = sum[i] + w * y[i];
            }
        }
        if (a->skip_finalize) continue;
        if (cs->token_scale) {
            const float p = cs->token_scale[t];
            for (int64_t i = 0; i < h; i++)
                sum[i] = p * sum[i];
        }
        store_f32(sum, h, a->output_dtype, out + (size_t)(t * h) * out_elt);
    }
    if (out != a->output) TRY(ep_from_host(ep, a->output, out, out_bytes));
    return FP4MOE_SUCCESS;
}

static fp4moe_status forward_common(fp4moe_ep *ep, const fp4moe_forward_args *args, int routed,
                                    void *stream)
{
    if (ep == NULL) return FP4MOE_ERROR_INVALID_ARGUMENT;
    fp4moe_clear_error(ep->ctx);
    const int size = ep->transport.size;
    call_state cs;
    memset(&cs, 0, sizeof cs);
    cs.args = args;
    cs.routed = routed;
    cs.k = ep->cfg.top_k;
    cs.h = ep->cfg.hidden_size;
    cs.dtype = args ? args->hidden_dtype : FP4MOE_DTYPE_F32;
    memset(&ep->stats, 0, sizeof ep->stats);
    cs.send_rows = ep->send_rows;
    cs.recv_rows = ep->recv_rows;
    cs.send_bytes = ep->send_bytes;
    cs.recv_bytes = ep->recv_bytes;
    for (int p = 0; p < size; p++)
        cs.send_rows[p] = cs.recv_rows[p] = 0;

    fp4moe_status local = check_args(ep, args, routed);
    if (local == FP4MOE_SUCCESS) {
        cs.t = args->num_tokens;
        cs.device = ep->ctx->backend == FP4MOE_BACKEND_CUDA && ep->transport.device_buffers &&
                    ep->cfg.precision != FP4MOE_PRECISION_W4A4 &&
                    !ep->cfg.apply_router_weight_on_input;
        if (cs.t > 0) local = load_inputs(ep, &cs, stream);
        if (local == FP4MOE_SUCCESS) local = assign_slots(ep, &cs);
    }
    char saved[FP4MOE_MESSAGE_BYTES];
    memcpy(saved, ep->ctx->last_error, sizeof saved);
    fp4moe_status st = exchange_counts(ep, &cs, local == FP4MOE_SUCCESS, stream);
    if (local != FP4MOE_SUCCESS)
        return fp4moe_fail(ep->ctx, local, "%s", saved); /* staging copies may have cleared it */
    if (st != FP4MOE_SUCCESS) return st;
    if ((st = dispatch(ep, &cs, stream)) != FP4MOE_SUCCESS) return st;
    /* From here every rank must take part in the return exchange whatever happens locally:
     * a failed compute returns NaN rows so that the peers' results cannot look valid. */
    fp4moe_status compute = cs.device ? compute_rows_device(ep, &cs, stream)
                                      : compute_rows(ep, &cs, stream);
    if (compute != FP4MOE_SUCCESS) {
        memcpy(saved, ep->ctx->last_error, sizeof saved);
        if (cs.device) {
            if (ep->dev_rows_out.data != NULL)
                (void)ep_device_fill_nan(ep->dev_rows_out.data, cs.total_recv * cs.h, stream);
        } else {
            float *out = ep->rows_out.data;
            for (int64_t i = 0; out != NULL && i < cs.total_recv * cs.h; i++)
                out[i] = NAN;
        }
    }
    st = return_results(ep, &cs, stream);
    if (compute != FP4MOE_SUCCESS) return fp4moe_fail(ep->ctx, compute, "%s", saved);
    if (st != FP4MOE_SUCCESS) return st;
    st = combine(ep, &cs, stream);
    ep->stats.rows_sent = cs.t * cs.k;
    ep->stats.rows_received = cs.total_recv;
    ep->stats.rows_to_self = cs.send_rows[ep->transport.rank];
    return st;
}

fp4moe_status fp4moe_ep_forward(fp4moe_ep *ep, const fp4moe_forward_args *args, void *stream)
{
    return forward_common(ep, args, 0, stream);
}

fp4moe_status fp4moe_ep_forward_routed(fp4moe_ep *ep, const fp4moe_forward_args *args,
                                       void *stream)
{
    return forward_common(ep, args, 1, stream);
}
