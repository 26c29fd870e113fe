/* Staging of the EP layer and its data movement: every buffer sized once at create for the
 * largest call, host <-> backend copies, and the exchange through the transport (staged through
 * device memory when the transport moves device buffers). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../core/context.h"
#include "ep_internal.h"

fp4moe_status ep_buffer_reserve(fp4moe_ep *ep, ep_buffer *b, size_t bytes)
{
    if (bytes <= b->capacity && b->data != NULL) return FP4MOE_SUCCESS;
    if (ep->staging_sized)
        return fp4moe_fail(ep->ctx, FP4MOE_ERROR_INTERNAL,
                           "ep: a call needs %zu bytes of a staging buffer sized at %zu bytes",
                           bytes, b->capacity);
    ep_buffer_release(ep, b);
    size_t want = bytes < 256 ? 256 : bytes;
    if (want > SIZE_MAX - 255)
        return fp4moe_fail(ep->ctx, FP4MOE_ERROR_OUT_OF_MEMORY, "ep: %zu bytes of staging", bytes);
    want = (want + 255) / 256 * 256;
    if (b->backend_memory && ep->ctx->backend == FP4MOE_BACKEND_CUDA) {
        fp4moe_status st = fp4moe_buffer_alloc(ep->ctx, want, &b->data);
        if (st != FP4MOE_SUCCESS) return st;
    } else {
        b->data = aligned_alloc(256, want);
        if (b->data == NULL)
            return fp4moe_fail(ep->ctx, FP4MOE_ERROR_OUT_OF_MEMORY,
                               "ep: cannot allocate %zu bytes of staging", want);
    }
    b->capacity = want;
    ep->allocations++;
    return FP4MOE_SUCCESS;
}

void ep_buffer_release(fp4moe_ep *ep, ep_buffer *b)
{
    if (b->data != NULL) {
        if (b->backend_memory && ep->ctx->backend == FP4MOE_BACKEND_CUDA)
            fp4moe_buffer_free(ep->ctx, b->data);
        else
            free(b->data);
    }
    b->data = NULL;
    b->capacity = 0;
}

size_t ep_allocation_count(const fp4moe_ep *ep)
{
    return ep->allocations;
}

/* The staging buffers, in one list for sizing, accounting and release. */
enum { EP_BUFFERS = 24 };
static void list_buffers(fp4moe_ep *ep, ep_buffer *all[EP_BUFFERS])
{
    ep_buffer *list[EP_BUFFERS] = {
        &ep->ids,         &ep->weights,      &ep->dest,         &ep->slot_row,
        &ep->hidden_in,   &ep->token_scale,  &ep->send,         &ep->recv,
        &ep->rows_hidden, &ep->rows_ids,     &ep->rows_ones,    &ep->rows_out,
        &ep->results,     &ep->out_host,     &ep->scratch,      &ep->dev_ids,
        &ep->dev_weights, &ep->dev_rows_hidden, &ep->dev_rows_ids, &ep->dev_rows_ones,
        &ep->dev_rows_out, &ep->dev_send,    &ep->dev_recv,     &ep->dev_result_row};
    memcpy(all, list, sizeof list);
}

/* The per-peer arrays, each `size` entries but the count messages; NULL-safe to free. */
static size_t peer_array_bytes(int size)
{
    const size_t n = (size_t)size;
    return 2 * n * (2 + n) * sizeof(int64_t) + 4 * n * sizeof(size_t) + 4 * n * sizeof(int64_t);
}

void ep_release_staging(fp4moe_ep *ep)
{
    ep_buffer *all[EP_BUFFERS];
    list_buffers(ep, all);
    for (int i = 0; i < EP_BUFFERS; i++)
        ep_buffer_release(ep, all[i]);
    void *arrays[] = {ep->received_rows_bound, ep->count_send, ep->count_recv, ep->count_bytes,
                      ep->peer_start, ep->send_rows, ep->recv_rows, ep->peer_first_row,
                      ep->send_bytes, ep->recv_bytes};
    for (size_t i = 0; i < sizeof arrays / sizeof arrays[0]; i++)
        free(arrays[i]);
}

static void *peer_array(fp4moe_ep *ep, size_t count, size_t each, int *ok)
{
    void *p = calloc(count, each);
    if (p == NULL) *ok = 0;
    else ep->allocations++;
    return p;
}

/* count * each, clearing *ok instead of wrapping. */
static size_t times(int64_t count, size_t each, int *ok)
{
    if (count < 0 || (each != 0 && (uint64_t)count > SIZE_MAX / each)) {
        *ok = 0;
        return 0;
    }
    return (size_t)count * each;
}

static size_t max3(size_t a, size_t b, size_t c)
{
    const size_t ab = a > b ? a : b;
    return ab > c ? ab : c;
}

/* Bytes of every buffer for the largest call. F32 is the widest hidden, router-weight and
 * output dtype, so the bound holds for every dtype a call may pass; each slot is one row out,
 * each received row one row in, and the expert plan runs the rows in chunks of its max_tokens. */
fp4moe_status ep_size_staging(fp4moe_ep *ep)
{
    const int size = ep->transport.size;
    const int64_t tokens = ep->cfg.max_tokens, k = ep->cfg.top_k, h = ep->cfg.hidden_size;
    const int cuda = ep->ctx->backend == FP4MOE_BACKEND_CUDA;
    int ok = 1;
    const size_t n = (size_t)size;
    ep->received_rows_bound = peer_array(ep, n, sizeof(int64_t), &ok);
    ep->count_send = peer_array(ep, n * (2 + n), sizeof(int64_t), &ok);
    ep->count_recv = peer_array(ep, n * (2 + n), sizeof(int64_t), &ok);
    ep->count_bytes = peer_array(ep, n, sizeof(size_t), &ok);
    ep->peer_start = peer_array(ep, n, sizeof(size_t), &ok);
    ep->send_rows = peer_array(ep, n, sizeof(int64_t), &ok);
    ep->recv_rows = peer_array(ep, n, sizeof(int64_t), &ok);
    ep->peer_first_row = peer_array(ep, n, sizeof(int64_t), &ok);
    ep->send_bytes = peer_array(ep, n, sizeof(size_t), &ok);
    ep->recv_bytes = peer_array(ep, n, sizeof(size_t), &ok);
    if (!ok) return fp4moe_fail(ep->ctx, FP4MOE_ERROR_OUT_OF_MEMORY, "ep: cannot allocate");

    const int64_t slots_max = tokens * k; /* both validated small by the plan's checks */
    if (ep->max_received_rows == 0) {
        if (slots_max > INT64_MAX / size)
            return fp4moe_fail(ep->ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                               "ep: max_tokens * size * top_k overflows: set "
                               "fp4moe_ep_options.max_received_rows");
        ep->max_received_rows = slots_max * size;
    }
    const int64_t rows_max = ep->max_received_rows;
    const int64_t chunk = rows_max < ep->expert_rows_max ? rows_max : ep->expert_rows_max;
    const size_t wide = sizeof(float);
    const size_t rec = fp4moe_ep_dispatch_row_bytes(ep, FP4MOE_DTYPE_F32);
    const size_t row_f32 = times(h, wide, &ok);
    const size_t slot_4 = times(slots_max, 4, &ok), slot_8 = times(slots_max, 8, &ok);
    const size_t slot_rec = times(slots_max, rec, &ok), slot_row = times(slots_max, row_f32, &ok);
    const size_t recv_4 = times(rows_max, 4, &ok), recv_rec = times(rows_max, rec, &ok);
    const size_t recv_row = times(rows_max, row_f32, &ok), chunk_4 = times(chunk, 4, &ok);
    const size_t token_row = times(tokens, row_f32, &ok), token_4 = times(tokens, 4, &ok);
    const size_t counts = n * (2 + n) * sizeof(int64_t);
    if (!ok)
        return fp4moe_fail(ep->ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                           "ep: staging for max_tokens = %lld, max_received_rows = %lld does "
                           "not fit in size_t",
                           (long long)tokens, (long long)rows_max);
    const struct {
        ep_buffer *buffer;
        size_t bytes;
        int needed;
    } plan[] = {
        {&ep->ids, slot_4, 1},
        {&ep->weights, slot_4, 1},
        {&ep->dest, slot_4, 1},
        {&ep->slot_row, slot_8, 1},
        {&ep->scratch, slot_4 > row_f32 ? slot_4 : row_f32, 1},
        {&ep->send, slot_rec, 1},
        {&ep->recv, recv_rec, 1},
        {&ep->rows_hidden, recv_row, 1},
        {&ep->rows_ids, recv_4, 1},
        {&ep->rows_ones, chunk_4, 1},
        {&ep->rows_out, recv_row, 1},
        {&ep->results, slot_row, 1},
        {&ep->hidden_in, token_row, cuda},
        {&ep->token_scale, token_4, cuda},
        {&ep->out_host, slot_row, cuda},
        {&ep->dev_ids, slot_4, cuda},
        {&ep->dev_weights, slot_4, cuda},
        {&ep->dev_rows_hidden, recv_row, cuda},
        {&ep->dev_rows_ids, recv_4, cuda},
        {&ep->dev_rows_ones, chunk_4, cuda},
        {&ep->dev_rows_out, recv_row, cuda},
        /* The device transport carries the counts, the dispatch and the return. */
        /* The device path (ep_forward.c): each slot's row among the rows of its rank. */
        {&ep->dev_result_row, slot_8, cuda && ep->transport.device_buffers},
        {&ep->dev_send, max3(counts, slot_rec, recv_row), ep->transport.device_buffers},
        {&ep->dev_recv, max3(counts, recv_rec, slot_row), ep->transport.device_buffers},
    };
    for (size_t i = 0; i < sizeof plan / sizeof plan[0]; i++) {
        if (!plan[i].needed) continue;
        const fp4moe_status st = ep_buffer_reserve(ep, plan[i].buffer, plan[i].bytes);
        if (st != FP4MOE_SUCCESS)
            return fp4moe_fail(ep->ctx, st,
                               "ep: cannot allocate the staging for max_tokens = %lld and "
                               "max_received_rows = %lld (%zu bytes for one buffer): lower "
                               "cfg.max_tokens or fp4moe_ep_options.max_received_rows",
                               (long long)tokens, (long long)rows_max, plan[i].bytes);
    }
    return FP4MOE_SUCCESS;
}

fp4moe_status fp4moe_ep_get_footprint(const fp4moe_ep *ep, fp4moe_ep_footprint *out)
{
    if (ep == NULL || out == NULL) return FP4MOE_ERROR_INVALID_ARGUMENT;
    memset(out, 0, sizeof *out);
    ep_buffer *all[EP_BUFFERS];
    list_buffers((fp4moe_ep *)ep, all);
    const int cuda = ep->ctx->backend == FP4MOE_BACKEND_CUDA;
    out->max_received_rows = ep->max_received_rows;
    out->host_staging_bytes = peer_array_bytes(ep->transport.size);
    for (int i = 0; i < EP_BUFFERS; i++) {
        if (all[i]->backend_memory && cuda)
            out->device_staging_bytes += all[i]->capacity;
        else
            out->host_staging_bytes += all[i]->capacity;
    }
    out->workspace_bytes = ep->route_workspace_bytes + ep->expert_workspace_bytes;
    return FP4MOE_SUCCESS;
}

fp4moe_status ep_to_host(fp4moe_ep *ep, void *host, const void *src, size_t bytes, void *stream)
{
    if (bytes == 0 || host == src) return FP4MOE_SUCCESS;
    if (ep->ctx->backend != FP4MOE_BACKEND_CUDA) {
        memcpy(host, src, bytes);
        return FP4MOE_SUCCESS;
    }
    fp4moe_status st = fp4moe_synchronize(ep->ctx, stream);
    if (st != FP4MOE_SUCCESS) return st;
    return fp4moe_buffer_download(ep->ctx, host, src, bytes);
}

fp4moe_status ep_from_host(fp4moe_ep *ep, void *dst, const void *host, size_t bytes)
{
    if (bytes == 0 || dst == host) return FP4MOE_SUCCESS;
    if (ep->ctx->backend != FP4MOE_BACKEND_CUDA) {
        memcpy(dst, host, bytes);
        return FP4MOE_SUCCESS;
    }
    fp4moe_status st = fp4moe_buffer_upload(ep->ctx, dst, host, bytes);
    /* A pageable upload may still be in flight when cudaMemcpy returns; work queued next on a
     * non-blocking stream would not wait for it, so wait here (legacy default stream). */
    if (st == FP4MOE_SUCCESS) st = fp4moe_synchronize(ep->ctx, NULL);
    return st;
}

static fp4moe_status transport_failed(fp4moe_ep *ep, int code)
{
    const fp4moe_ep_transport *t = &ep->transport;
    const char *why = t->error_string ? t->error_string(t->user, code) : NULL;
    return fp4moe_fail(ep->ctx, FP4MOE_ERROR_INTERNAL, "ep: transport all_to_all_v failed: %d (%s)",
                       code, why ? why : "no description");
}

fp4moe_status ep_exchange(fp4moe_ep *ep, const void *send, const size_t *send_bytes, void *recv,
                          const size_t *recv_bytes, void *stream)
{
    const fp4moe_ep_transport *t = &ep->transport;
    size_t send_total = 0, recv_total = 0;
    for (int p = 0; p < t->size; p++) {
        send_total += send_bytes[p];
        recv_total += recv_bytes[p];
    }
    if (!t->device_buffers) {
        const int code = t->all_to_all_v(t->user, send, send_bytes, recv, recv_bytes, stream);
        return code ? transport_failed(ep, code) : FP4MOE_SUCCESS;
    }
    fp4moe_status st = ep_buffer_reserve(ep, &ep->dev_send, send_total);
    if (st == FP4MOE_SUCCESS) st = ep_buffer_reserve(ep, &ep->dev_recv, recv_total);
    if (st == FP4MOE_SUCCESS) st = ep_from_host(ep, ep->dev_send.data, send, send_total);
    if (st != FP4MOE_SUCCESS) return st;
    const int code =
        t->all_to_all_v(t->user, ep->dev_send.data, send_bytes, ep->dev_recv.data, recv_bytes, stream);
    if (code) return transport_failed(ep, code);
    return ep_to_host(ep, recv, ep->dev_recv.data, recv_total, stream);
}

fp4moe_status ep_exchange_device(fp4moe_ep *ep, const void *send, const size_t *send_bytes,
                                 void *recv, const size_t *recv_bytes, void *stream)
{
    const fp4moe_ep_transport *t = &ep->transport;
    const int code = t->all_to_all_v(t->user, send, send_bytes, recv, recv_bytes, stream);
    return code ? transport_failed(ep, code) : FP4MOE_SUCCESS;
}
