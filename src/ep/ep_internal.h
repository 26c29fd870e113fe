/* The expert-parallel layer's state and the pieces its files share: staging buffers sized at
 * create, the exchange through the transport, and the W4A4 row codec. */
#ifndef FP4MOE_EP_INTERNAL_H
#define FP4MOE_EP_INTERNAL_H

#include "../core/plan.h"
#include "fp4moe_ep.h"

/* A staging buffer: host (aligned_alloc) or the context's backend memory (fp4moe_buffer_alloc).
 * Sized at create for the largest call; a forward call only checks that its request fits. */
typedef struct ep_buffer {
    void *data;
    size_t capacity;
    int backend_memory;
} ep_buffer;

/* One expert's NVFP4 activation quantiser as its backend computes it: the global scale g, the
 * 1/6 of the block scale, and the value multiplier for each E4M3 block-scale code (0 where the
 * code is zero). The CPU backend divides (format/nvfp4.c); the CUDA one uses rcp.approx, whose
 * results ep_device_w4a4_reciprocals measures on the GPU. With the backend's own arithmetic the
 * sender's codes are the ones the single-device layer would make, ties included. */
typedef struct ep_w4a4_arith {
    float g, rcp6;
    float out_scale[256];
} ep_w4a4_arith;

struct fp4moe_ep {
    fp4moe_context *ctx;
    fp4moe_ep_transport transport;
    fp4moe_config cfg;         /* normalised, this rank's range */
    fp4moe_plan *route_plan;   /* top_k = K, the routing parameters, one dummy 16x16 expert */
    fp4moe_plan *expert_plan;  /* top_k = 1, this rank's experts: one received row per token */
    int64_t expert_rows_max;   /* rows per expert-plan call (its max_tokens) */
    void *route_workspace;     /* backend memory */
    size_t route_workspace_bytes;
    void *expert_workspace;    /* backend memory */
    size_t expert_workspace_bytes;
    int32_t *owner;            /* [E] rank holding each expert */
    float *a1_global_all;      /* [E] W4A4 input scales of every expert (NULL in W4A16) */
    ep_w4a4_arith *w4a4_arith; /* [E] their quantisers' arithmetic (NULL in W4A16) */
    fp4moe_ep_stats stats;
    int64_t max_received_rows;     /* this rank's bound on rows received per call */
    int64_t *received_rows_bound;  /* [size]: every rank's bound, exchanged at create */
    int staging_sized;             /* set at the end of create: from then on nothing allocates */
    size_t allocations;            /* staging allocations made, for tests: constant after create */

    /* Per-peer bookkeeping of a call, [size] each (the count messages [size * (2 + size)]). */
    int64_t *count_send, *count_recv;
    size_t *count_bytes, *peer_start;
    int64_t *send_rows, *recv_rows, *peer_first_row;
    size_t *send_bytes, *recv_bytes;

    /* Host staging (sized at create). */
    ep_buffer ids, weights, dest, slot_row, hidden_in, token_scale;
    ep_buffer send, recv, rows_hidden, rows_ids, rows_ones, rows_out, results, out_host;
    ep_buffer scratch; /* per-row FP32 work */
    /* Backend-memory staging (CUDA backend): routing outputs, expert-plan inputs/outputs. */
    ep_buffer dev_ids, dev_weights, dev_rows_hidden, dev_rows_ids, dev_rows_ones, dev_rows_out;
    /* Device-transport staging; with the CUDA backend also the device path's index arrays. */
    ep_buffer dev_send, dev_recv, dev_result_row;
};

/* Makes b hold at least bytes (contents not kept). Allocates only while the EP object is being
 * created; afterwards a request beyond the capacity is an INTERNAL error (a sizing bug). */
fp4moe_status ep_buffer_reserve(fp4moe_ep *ep, ep_buffer *b, size_t bytes);
void ep_buffer_release(fp4moe_ep *ep, ep_buffer *b);

/* Allocates every staging buffer and per-peer array for the largest call: this rank sending
 * cfg.max_tokens tokens and receiving max_received_rows rows, in the widest hidden dtype. */
fp4moe_status ep_size_staging(fp4moe_ep *ep);
void ep_release_staging(fp4moe_ep *ep); /* every buffer and array; safe on a partial object */
/* How many staging allocations the object has made (tests: constant across forward calls). */
size_t ep_allocation_count(const fp4moe_ep *ep);

/* One all-to-all-v of host buffers through the transport (staged through device memory for
 * device transports). send_bytes/recv_bytes: [size]. */
fp4moe_status ep_exchange(fp4moe_ep *ep, const void *send, const size_t *send_bytes, void *recv,
                          const size_t *recv_bytes, void *stream);

/* The same for buffers already in device memory (device transports only): no staging. */
fp4moe_status ep_exchange_device(fp4moe_ep *ep, const void *send, const size_t *send_bytes,
                                 void *recv, const size_t *recv_bytes, void *stream);

/* Copies between backend memory and the host (memcpy on the CPU backend; on CUDA, the stream
 * is synchronised first so that queued work is done). */
fp4moe_status ep_to_host(fp4moe_ep *ep, void *host, const void *src, size_t bytes, void *stream);
fp4moe_status ep_from_host(fp4moe_ep *ep, void *dst, const void *host, size_t bytes);

/* W4A4 row codec. The payload is H/2 packed E2M1 codes, H/16 E4M3 block scales and H/16 block
 * maxima (max |x| over the block's non-NaN values) in the hidden dtype. */
size_t ep_w4a4_payload_bytes(int64_t hidden, fp4moe_dtype dtype);
void ep_w4a4_cpu_arith(float g, ep_w4a4_arith *q);
/* x: [H] FP32 values exactly representable in dtype (the FC1 input before quantisation). */
void ep_w4a4_encode_row(const float *x, int64_t hidden, fp4moe_dtype dtype, const ep_w4a4_arith *q,
                        uint8_t *payload);
/* Writes a row in dtype whose NVFP4 quantisation with q gives exactly the encoded codes and
 * scales (so the expert's own quantisation reproduces the sender's).
 * Returns 0, or -1 when no such row exists (the payload was not made by encode with q). */
int ep_w4a4_decode_row(const uint8_t *payload, int64_t hidden, fp4moe_dtype dtype,
                       const ep_w4a4_arith *q, void *row);

#endif
