/* Staging buffers and data movement of the EP layer: growable host and backend buffers, host
 * <-> backend copies, and the exchange through the transport (staged through device memory when
 * the transport moves device buffers). */
#include <stdlib.h>
#include <string.h>

#include "../core/context.h"
#include "ep_internal.h"

fp4moe_status ep_buffer_reserve(fp4moe_ep *ep, ep_buffer *b, size_t bytes)
{
    if (bytes <= b->capacity && b->data != NULL) return FP4MOE_SUCCESS;
    ep_buffer_release(ep, b);
    /* Grow by half again so that slowly rising sizes do not reallocate every call. */
    size_t want = bytes + bytes / 2;
    if (want < 256) want = 256;
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
