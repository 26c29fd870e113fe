/* The in-memory transport: the ranks of one process, one thread each. A call publishes the
 * rank's send buffer and counts, waits until every rank has, copies its blocks out of the
 * peers' buffers in rank order, and waits again so that no send buffer is reused while a peer
 * still reads it. The copies are plain memcpy: the result does not depend on thread timing. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "ep_internal.h"

typedef struct memory_rank_slot {
    const uint8_t *send;
    const size_t *send_bytes; /* [size] */
} memory_rank_slot;

struct fp4moe_ep_memory_group {
    int size;
    pthread_barrier_t barrier;
    memory_rank_slot *slots; /* [size] */
    struct memory_endpoint *endpoints; /* [size]: the `user` of each rank's transport */
};

typedef struct memory_endpoint {
    fp4moe_ep_memory_group *group;
    int rank;
} memory_endpoint;

enum { MEMORY_OK = 0, MEMORY_BAD_COUNTS = 1, MEMORY_BARRIER_FAILED = 2 };

static int wait_all(fp4moe_ep_memory_group *g)
{
    const int rc = pthread_barrier_wait(&g->barrier);
    return rc == 0 || rc == PTHREAD_BARRIER_SERIAL_THREAD ? 0 : -1;
}

static int memory_all_to_all_v(void *user, const void *send, const size_t *send_bytes,
                               void *recv, const size_t *recv_bytes, void *stream)
{
    (void)stream;
    memory_endpoint *self = (memory_endpoint *)user;
    fp4moe_ep_memory_group *g = self->group;
    g->slots[self->rank].send = (const uint8_t *)send;
    g->slots[self->rank].send_bytes = send_bytes;
    if (wait_all(g)) return MEMORY_BARRIER_FAILED;
    int status = MEMORY_OK;
    size_t recv_offset = 0;
    for (int peer = 0; peer < g->size; peer++) {
        const memory_rank_slot *from = &g->slots[peer];
        size_t send_offset = 0;
        for (int q = 0; q < self->rank; q++)
            send_offset += from->send_bytes[q];
        const size_t bytes = from->send_bytes[self->rank];
        if (bytes != recv_bytes[peer]) {
            status = MEMORY_BAD_COUNTS; /* still wait below: the peers must not be left blocked */
        } else if (bytes > 0) {
            memcpy((uint8_t *)recv + recv_offset, from->send + send_offset, bytes);
        }
        recv_offset += recv_bytes[peer];
    }
    if (wait_all(g)) return MEMORY_BARRIER_FAILED;
    return status;
}

static const char *memory_error_string(void *user, int code)
{
    (void)user;
    switch (code) {
    case MEMORY_BAD_COUNTS: return "a peer sends a different byte count than this rank expects";
    case MEMORY_BARRIER_FAILED: return "pthread_barrier_wait failed";
    default: return "unknown in-memory transport error";
    }
}

fp4moe_status fp4moe_ep_memory_group_create(int size, fp4moe_ep_memory_group **out)
{
    if (out == NULL) return FP4MOE_ERROR_INVALID_ARGUMENT;
    *out = NULL;
    if (size < 1) return FP4MOE_ERROR_INVALID_ARGUMENT;
    fp4moe_ep_memory_group *g = calloc(1, sizeof *g);
    if (g == NULL) return FP4MOE_ERROR_OUT_OF_MEMORY;
    g->size = size;
    g->slots = calloc((size_t)size, sizeof *g->slots);
    g->endpoints = calloc((size_t)size, sizeof *g->endpoints);
    if (g->slots == NULL || g->endpoints == NULL) {
        free(g->slots);
        free(g->endpoints);
        free(g);
        return FP4MOE_ERROR_OUT_OF_MEMORY;
    }
    if (pthread_barrier_init(&g->barrier, NULL, (unsigned)size) != 0) {
        free(g->slots);
        free(g->endpoints);
        free(g);
        return FP4MOE_ERROR_OUT_OF_MEMORY;
    }
    for (int r = 0; r < size; r++) {
        g->endpoints[r].group = g;
        g->endpoints[r].rank = r;
    }
    *out = g;
    return FP4MOE_SUCCESS;
}

void fp4moe_ep_memory_group_destroy(fp4moe_ep_memory_group *group)
{
    if (group == NULL) return;
    pthread_barrier_destroy(&group->barrier);
    free(group->slots);
    free(group->endpoints);
    free(group);
}

fp4moe_status fp4moe_ep_memory_transport(fp4moe_ep_memory_group *group, int rank,
                                         fp4moe_ep_transport *out)
{
    if (group == NULL || out == NULL || rank < 0 || rank >= group->size)
        return FP4MOE_ERROR_INVALID_ARGUMENT;
    memset(out, 0, sizeof *out);
    out->user = &group->endpoints[rank];
    out->rank = rank;
    out->size = group->size;
    out->device_buffers = 0;
    out->all_to_all_v = memory_all_to_all_v;
    out->error_string = memory_error_string;
    return FP4MOE_SUCCESS;
}
