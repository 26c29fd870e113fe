/*
 * fp4moe expert parallelism: the MoE layer with its experts sharded across ranks (one rank per
 * GPU, or several CPU ranks in one process), results equal bit for bit to the layer computed on
 * one device. docs/EP.md describes the protocol, the bytes moved and why results are exact.
 *
 * Every rank holds the experts [local_expert_offset, local_expert_offset + local_num_experts)
 * of its configuration; together the ranks hold [0, num_experts) in rank order (rank 0 the
 * lowest ids), each at least one expert. A forward call on every rank:
 *   1. routes its own T_r tokens (T_r may be 0) or takes the caller's ids and weights;
 *   2. exchanges per-peer row counts, then sends each (token, slot) to the rank holding the
 *      slot's expert (W4A4: the row NVFP4-quantised with that expert's a1 scale);
 *   3. runs its local experts on the rows it received (the plain layer, pre-routed, one expert
 *      per row) and sends the FP32 results back;
 *   4. reduces them per token in slot order with the router weights, exactly as the
 *      single-device finalize does.
 *
 * Collectives: fp4moe_ep_create and the forward calls are collective over the transport: every
 * rank must make the same sequence of calls. A rank whose arguments are wrong still takes part
 * in the count exchange and makes every rank of that call fail (no rank is left waiting), but a
 * rank that does not call at all leaves the others blocked, as with any NCCL collective.
 *
 * Memory: tensors passed to forward calls live where the context computes (host memory for the
 * CPU backend, device memory for CUDA), as for fp4moe_forward. The EP object owns its staging
 * (host, and device memory on CUDA), all of it allocated at create for the largest call the
 * configuration allows: cfg.max_tokens tokens sent by this rank, and at most max_received_rows
 * (token, slot) rows received (fp4moe_ep_options). Forward calls never allocate.
 * fp4moe_ep_get_footprint says what the staging costs.
 * Errors: a status code, and a message in fp4moe_last_error(ctx) of the context given at create.
 */
#ifndef FP4MOE_EP_H
#define FP4MOE_EP_H

#include <stddef.h>
#include <stdint.h>

#include "fp4moe.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------------ */
/* Transport: how bytes move between ranks. NCCL, the in-memory one below, or the caller's.   */
/* ------------------------------------------------------------------------------------------ */
typedef struct fp4moe_ep_transport {
    void *user; /* passed back to the functions */
    int rank;   /* this rank, in [0, size) */
    int size;   /* number of ranks */
    /* 1: send and recv must be device memory of the context's GPU (NCCL); 0: host memory. */
    int device_buffers;
    /* Collective all-to-all-v of bytes. send holds `size` consecutive blocks, block p
     * (send_bytes[p] bytes) goes to rank p; recv receives rank p's block for this rank
     * (recv_bytes[p] bytes, the size that rank sends) at offset sum_{q<p} recv_bytes[q].
     * Blocks of 0 bytes are allowed. The counts are host arrays. On return (device transports:
     * once `stream` has been synchronised) recv is filled and send may be reused.
     * Returns 0 on success, a transport-specific nonzero code otherwise. */
    int (*all_to_all_v)(void *user, const void *send, const size_t *send_bytes, void *recv,
                        const size_t *recv_bytes, void *stream);
    /* Optional: a static description of a nonzero code of all_to_all_v (may be NULL). */
    const char *(*error_string)(void *user, int code);
} fp4moe_ep_transport;

/* In-memory transport: `size` ranks of one process, each calling from its own thread. The
 * group is shared by the ranks; it must outlive every EP object that uses it. */
typedef struct fp4moe_ep_memory_group fp4moe_ep_memory_group;
fp4moe_status fp4moe_ep_memory_group_create(int size, fp4moe_ep_memory_group **out);
void fp4moe_ep_memory_group_destroy(fp4moe_ep_memory_group *group); /* NULL is a no-op */
/* The transport of one rank of the group (host buffers). */
fp4moe_status fp4moe_ep_memory_transport(fp4moe_ep_memory_group *group, int rank,
                                         fp4moe_ep_transport *out);

/* NCCL transport over the caller's communicator (an ncclComm_t passed as void *): one
 * ncclGroupStart, an ncclSend/ncclRecv pair per peer with a non-empty block, ncclGroupEnd, on
 * the stream of the call. The communicator's device must be the context's cuda_device; the
 * caller keeps the communicator alive and destroys it. BACKEND_UNAVAILABLE when the library was
 * built without NCCL (fp4moe_ep_nccl_available() says which). */
int fp4moe_ep_nccl_available(void);
fp4moe_status fp4moe_ep_nccl_transport(fp4moe_context *ctx, void *nccl_comm,
                                       fp4moe_ep_transport *out);

/* ------------------------------------------------------------------------------------------ */
/* The expert-parallel layer                                                                  */
/* ------------------------------------------------------------------------------------------ */
typedef struct fp4moe_ep fp4moe_ep;

/* Collective. cfg: the whole layer's configuration (the same on every rank) with this rank's
 * local_expert_offset and local_num_experts; weights: this rank's experts, as for
 * fp4moe_plan_create (routing_bias [E] is the global one). The transport struct is copied.
 * Creates this rank's plans (weights copied once), checks that every rank agrees on the layer
 * and that the ranks' expert ranges tile [0, E) in rank order, and exchanges the experts'
 * W4A4 input scales. `stream` is used by device transports. *out is NULL on failure. */
fp4moe_status fp4moe_ep_create(fp4moe_context *ctx, const fp4moe_config *cfg,
                               const fp4moe_weights *weights,
                               const fp4moe_ep_transport *transport, void *stream,
                               fp4moe_ep **out);

/* Create-time options; a zeroed struct (or NULL) gives the defaults. */
typedef struct fp4moe_ep_options {
    /* Most (token, slot) rows this rank receives in one forward call, summed over the senders
     * (itself included): sizes the receive side of the staging, which is most of it
     * (docs/EP.md gives the bytes). 0: the worst case, max_tokens * size * top_k, which no call
     * can exceed. With distinct expert ids per token (always so for fp4moe_ep_forward) a rank
     * holding n experts receives at most max_tokens * size * min(top_k, n) rows; a balanced
     * load needs about max_tokens * top_k. A forward call in which any rank would receive more
     * than its own bound fails on every rank with FP4MOE_ERROR_WORKSPACE_TOO_SMALL, after the
     * count exchange and before any row moves: no rank blocks, no output is written, and the
     * EP object stays usable. The ranks may pass different values. Must be >= 0. */
    int64_t max_received_rows;
} fp4moe_ep_options;

/* fp4moe_ep_create with options (NULL: the defaults, as fp4moe_ep_create). Collective. */
fp4moe_status fp4moe_ep_create_with_options(fp4moe_context *ctx, const fp4moe_config *cfg,
                                            const fp4moe_weights *weights,
                                            const fp4moe_ep_transport *transport,
                                            const fp4moe_ep_options *options, void *stream,
                                            fp4moe_ep **out);
void fp4moe_ep_destroy(fp4moe_ep *ep); /* NULL is a no-op; not collective */

/* Memory this rank's EP object holds besides its two plans (the experts' weights, as for
 * fp4moe_plan_create), all of it allocated at create. */
typedef struct fp4moe_ep_footprint {
    int64_t max_received_rows;  /* this rank's bound: the option, or its default */
    size_t host_staging_bytes;  /* host buffers of the row exchange and the bookkeeping */
    size_t device_staging_bytes; /* CUDA backend: device buffers (0 on the CPU backend) */
    size_t workspace_bytes;     /* the routing and expert plans' workspaces (backend memory) */
} fp4moe_ep_footprint;
fp4moe_status fp4moe_ep_get_footprint(const fp4moe_ep *ep, fp4moe_ep_footprint *out);

/* Collective forward calls with fp4moe_forward_args as for fp4moe_forward/_routed, except:
 * num_tokens may be 0 (this rank has no tokens but serves its experts; its tensor pointers may
 * then be NULL) and must be <= cfg.max_tokens; the output may alias hidden_states (in place).
 * skip_finalize = 1 gives the per-slot rows [T*k, H] of the plain layer. topk_ids_out /
 * topk_weights_out are filled by fp4moe_ep_forward when given. No workspace argument: the EP
 * object owns it. The call returns once the output is written (it synchronises `stream`: the
 * bookkeeping between the exchanges runs on the host). WORKSPACE_TOO_SMALL on every rank when
 * a rank would receive more rows than its max_received_rows (fp4moe_ep_options). */
fp4moe_status fp4moe_ep_forward(fp4moe_ep *ep, const fp4moe_forward_args *args, void *stream);
fp4moe_status fp4moe_ep_forward_routed(fp4moe_ep *ep, const fp4moe_forward_args *args,
                                       void *stream);

/* What the last forward call of this rank moved (payload bytes through the transport). */
typedef struct fp4moe_ep_stats {
    int64_t rows_sent;        /* (token, slot) rows this rank dispatched, self included */
    int64_t rows_received;    /* rows this rank's experts computed */
    int64_t rows_to_self;     /* of rows_sent, those whose expert is on this rank */
    size_t dispatch_bytes_sent;
    size_t dispatch_bytes_received;
    size_t combine_bytes_sent;     /* FP32 results returned to their tokens' ranks */
    size_t combine_bytes_received;
    size_t count_bytes;            /* the count exchange, each way */
} fp4moe_ep_stats;
fp4moe_status fp4moe_ep_last_stats(const fp4moe_ep *ep, fp4moe_ep_stats *out);

/* Bytes of one dispatched row record for a hidden dtype (4-byte expert id + payload):
 * W4A16 H*sizeof(dtype); W4A4 H/2 codes + H/16 scales + H/16 block maxima in the dtype. */
size_t fp4moe_ep_dispatch_row_bytes(const fp4moe_ep *ep, fp4moe_dtype hidden_dtype);

#ifdef __cplusplus
}
#endif
#endif /* FP4MOE_EP_H */
