/* The NCCL transport: an all-to-all-v as one NCCL group of point-to-point calls on the
 * caller's stream. Compiled to a stub reporting BACKEND_UNAVAILABLE when NCCL was not found at
 * configure time (FP4MOE_HAVE_NCCL unset). */
#include <string.h>

#include "../core/context.h"
#include "ep_internal.h"

#if defined(FP4MOE_HAVE_NCCL) && defined(FP4MOE_HAVE_CUDA)
#include <cuda_runtime.h>
#include <nccl.h>

/* Every peer with a non-empty block gets one ncclSend and every non-empty incoming block one
 * ncclRecv; inside one group NCCL matches them per peer in issue order and runs them
 * concurrently, self included. Bytes go as ncclUint8, so any payload layout passes. The call
 * only enqueues: the stream orders it with the kernels before and after. */
static int nccl_all_to_all_v(void *user, const void *send, const size_t *send_bytes, void *recv,
                             const size_t *recv_bytes, void *stream)
{
    ncclComm_t comm = (ncclComm_t)user;
    int size = 0;
    ncclResult_t rc = ncclCommCount(comm, &size);
    if (rc != ncclSuccess) return (int)rc;
    const uint8_t *s = (const uint8_t *)send;
    uint8_t *r = (uint8_t *)recv;
    rc = ncclGroupStart();
    if (rc != ncclSuccess) return (int)rc;
    size_t send_offset = 0, recv_offset = 0;
    for (int p = 0; p < size && rc == ncclSuccess; p++) {
        if (send_bytes[p] > 0)
            rc = ncclSend(s + send_offset, send_bytes[p], ncclUint8, p, comm, (cudaStream_t)stream);
        if (rc == ncclSuccess && recv_bytes[p] > 0)
            rc = ncclRecv(r + recv_offset, recv_bytes[p], ncclUint8, p, comm, (cudaStream_t)stream);
        send_offset += send_bytes[p];
        recv_offset += recv_bytes[p];
    }
    /* The group must be closed even after a failed call inside it. */
    const ncclResult_t end = ncclGroupEnd();
    return (int)(rc != ncclSuccess ? rc : end);
}

static const char *nccl_error_string(void *user, int code)
{
    (void)user;
    return ncclGetErrorString((ncclResult_t)code);
}

int fp4moe_ep_nccl_available(void)
{
    return 1;
}

fp4moe_status fp4moe_ep_nccl_transport(fp4moe_context *ctx, void *nccl_comm,
                                       fp4moe_ep_transport *out)
{
    if (ctx == NULL) return FP4MOE_ERROR_INVALID_ARGUMENT;
    fp4moe_clear_error(ctx);
    if (nccl_comm == NULL || out == NULL)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "ep: nccl_comm or out is NULL");
    if (ctx->backend != FP4MOE_BACKEND_CUDA)
        return fp4moe_fail(ctx, FP4MOE_ERROR_UNSUPPORTED,
                           "ep: the NCCL transport needs a CUDA context");
    ncclComm_t comm = (ncclComm_t)nccl_comm;
    int rank = 0, size = 0, device = -1;
    ncclResult_t rc = ncclCommUserRank(comm, &rank);
    if (rc == ncclSuccess) rc = ncclCommCount(comm, &size);
    if (rc == ncclSuccess) rc = ncclCommCuDevice(comm, &device);
    if (rc != ncclSuccess)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT, "ep: the communicator: %s",
                           ncclGetErrorString(rc));
    if (device != ctx->cuda_device)
        return fp4moe_fail(ctx, FP4MOE_ERROR_INVALID_ARGUMENT,
                           "ep: the communicator is on GPU %d, the context on GPU %d", device,
                           ctx->cuda_device);
    memset(out, 0, sizeof *out);
    out->user = nccl_comm;
    out->rank = rank;
    out->size = size;
    out->device_buffers = 1;
    out->all_to_all_v = nccl_all_to_all_v;
    out->error_string = nccl_error_string;
    return FP4MOE_SUCCESS;
}

#else

int fp4moe_ep_nccl_available(void)
{
    return 0;
}

fp4moe_status fp4moe_ep_nccl_transport(fp4moe_context *ctx, void *nccl_comm,
                                       fp4moe_ep_transport *out)
{
    (void)nccl_comm;
    if (out != NULL) memset(out, 0, sizeof *out);
    return fp4moe_fail(ctx, FP4MOE_ERROR_BACKEND_UNAVAILABLE,
                       "ep: this fp4moe was built without NCCL");
}

#endif
