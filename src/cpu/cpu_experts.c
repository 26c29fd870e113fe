/* The experts of one chunk of tokens: counting sort by expert, gather of the inputs, FC1,
 * activation, FC2 input quantisation, FC2, finalize. The numerics follow docs/DESIGN.md
 * ("The function, exactly") step by step; every output element is computed by one thread in
 * a fixed order, so results do not depend on the thread count. */
#include <string.h>

#include "../format/format.h"
#include "../route/route.h"
#include "cpu_experts.h"

#define WS_ALIGN 64

static size_t align_up(size_t n)
{
    return (n + WS_ALIGN - 1) / WS_ALIGN * WS_ALIGN;
}

static int64_t items_per_expert(int64_t rows)
{
    const int64_t tiles = (rows + CPU_TILE_ROWS - 1) / CPU_TILE_ROWS;
    return (tiles + CPU_TILES_PER_ITEM - 1) / CPU_TILES_PER_ITEM;
}

enum {
    R_IDS,
    R_WEIGHTS,
    R_ROUTE,
    R_OFFSETS,
    R_ENTRIES,
    R_POSITIONS,
    R_ITEMS1,
    R_ITEMS2,
    R_FC1_PENDING,
    R_FC2_PENDING,
    R_TOKEN_PENDING,
    R_X,
    R_H,
    R_C,
    R_Y,
    R_COUNT
};

/* Offsets of every region for num_tokens tokens; returns the total. */
static size_t layout(const fp4moe_plan *plan, int64_t num_tokens, size_t off[R_COUNT],
                     int64_t *chunk_out)
{
    const int64_t k = plan->cfg.top_k, e = plan->cfg.num_experts, e_loc = plan->e_loc;
    const int64_t h = plan->cfg.hidden_size, n1 = plan->n1;
    const int64_t chunk = num_tokens < CPU_TOKEN_CHUNK ? num_tokens : CPU_TOKEN_CHUNK;
    const int64_t slots = chunk * k;
    const int64_t active = slots < e_loc ? slots : e_loc;
    const int64_t threads = plan->ctx->num_threads;
    size_t sizes[R_COUNT];
    sizes[R_IDS] = (size_t)(num_tokens * k) * sizeof(int32_t);
    sizes[R_WEIGHTS] = (size_t)(num_tokens * k) * sizeof(float);
    sizes[R_ROUTE] = (size_t)(threads * (e + route_scratch_floats(e))) * sizeof(float);
    sizes[R_OFFSETS] = (size_t)(e_loc + 1) * sizeof(int64_t);
    sizes[R_ENTRIES] = (size_t)slots * sizeof(int32_t);
    sizes[R_POSITIONS] = (size_t)slots * sizeof(int32_t);
    sizes[R_ITEMS1] = (size_t)(active * items_per_expert(n1)) * sizeof(cpu_work_item);
    sizes[R_ITEMS2] = (size_t)(active * items_per_expert(h)) * sizeof(cpu_work_item);
    sizes[R_FC1_PENDING] = (size_t)e_loc * sizeof(atomic_int);
    sizes[R_FC2_PENDING] = (size_t)e_loc * sizeof(atomic_int);
    sizes[R_TOKEN_PENDING] = (size_t)chunk * sizeof(atomic_int);
    sizes[R_X] = (size_t)(slots * cpu_padded_cols(h)) * sizeof(float);
    sizes[R_H] = (size_t)(slots * n1) * sizeof(float);
    sizes[R_C] = (size_t)(slots * cpu_padded_cols(plan->cfg.intermediate_size)) * sizeof(float);
    sizes[R_Y] = (size_t)(slots * h) * sizeof(float);
    size_t total = 0;
    for (int i = 0; i < R_COUNT; i++) {
        off[i] = total;
        total += align_up(sizes[i]);
    }
    if (chunk_out) *chunk_out = chunk;
    return total;
}

size_t cpu_workspace_bytes(const fp4moe_plan *plan, int64_t num_tokens)
{
    size_t off[R_COUNT];
    return layout(plan, num_tokens, off, NULL);
}

void cpu_workspace_carve(const fp4moe_plan *plan, int64_t num_tokens, void *base, cpu_workspace *ws)
{
    size_t off[R_COUNT];
    uint8_t *b = (uint8_t *)base;
    layout(plan, num_tokens, off, &ws->chunk);
    ws->ids = (int32_t *)(b + off[R_IDS]);
    ws->weights = (float *)(b + off[R_WEIGHTS]);
    ws->route_scratch = (float *)(b + off[R_ROUTE]);
    ws->expert_offsets = (int64_t *)(b + off[R_OFFSETS]);
    ws->entries = (int32_t *)(b + off[R_ENTRIES]);
    ws->positions = (int32_t *)(b + off[R_POSITIONS]);
    ws->items1 = (cpu_work_item *)(b + off[R_ITEMS1]);
    ws->items2 = (cpu_work_item *)(b + off[R_ITEMS2]);
    ws->fc1_pending = (atomic_int *)(b + off[R_FC1_PENDING]);
    ws->fc2_pending = (atomic_int *)(b + off[R_FC2_PENDING]);
    ws->token_pending = (atomic_int *)(b + off[R_TOKEN_PENDING]);
    ws->x = (float *)(b + off[R_X]);
    ws->h = (float *)(b + off[R_H]);
    ws->c = (float *)(b + off[R_C]);
    ws->y = (float *)(b + off[R_Y]);
    ws->x_stride = cpu_padded_cols(plan->cfg.hidden_size);
    ws->c_stride = cpu_padded_cols(plan->cfg.intermediate_size);
}

/* Work items of every active expert over a matrix of `rows` rows; sets each expert's pending
 * count. Returns the number of items. */
static int64_t plan_items(const fp4moe_plan *plan, const int64_t *offsets, int64_t rows,
                          cpu_work_item *items, atomic_int *pending)
{
    const int64_t tiles = (rows + CPU_TILE_ROWS - 1) / CPU_TILE_ROWS;
    int64_t n_items = 0;
    for (int64_t e = 0; e < plan->e_loc; e++) {
        int count = 0;
        if (offsets[e + 1] > offsets[e]) {
            for (int64_t tb = 0; tb < tiles; tb += CPU_TILES_PER_ITEM, count++) {
                cpu_work_item *it = &items[n_items++];
                it->expert = (int32_t)e;
                it->tile_begin = (int32_t)tb;
                it->tile_end =
                    (int32_t)(tb + CPU_TILES_PER_ITEM < tiles ? tb + CPU_TILES_PER_ITEM : tiles);
            }
        }
        atomic_init(&pending[e], count);
    }
    return n_items;
}

/* Counting sort of the chunk's (token, slot) pairs by local expert, stable by token then slot;
 * each token's count of local slots. */
static void sort_slots(const fp4moe_plan *plan, const int32_t *ids, int64_t t0, int64_t t1,
                       cpu_workspace *ws)
{
    const int64_t k = plan->cfg.top_k, e0 = plan->cfg.local_expert_offset, e_loc = plan->e_loc;
    const int64_t slots = (t1 - t0) * k;
    int64_t *offsets = ws->expert_offsets;
    memset(offsets, 0, (size_t)(e_loc + 1) * sizeof(int64_t));
    for (int64_t s = 0; s < slots; s++) {
        const int64_t local = (int64_t)ids[t0 * k + s] - e0;
        if (local >= 0 && local < e_loc) offsets[local + 1]++;
    }
    for (int64_t e = 0; e < e_loc; e++)
        offsets[e + 1] += offsets[e];
    /* offsets[e] is the next free position of expert e while filling; restored below. */
    for (int64_t t = 0; t < t1 - t0; t++) {
        int local_slots = 0;
        for (int64_t j = 0; j < k; j++) {
            const int64_t s = t * k + j;
            const int64_t local = (int64_t)ids[t0 * k + s] - e0;
            if (local >= 0 && local < e_loc) {
                const int64_t pos = offsets[local]++;
                ws->entries[pos] = (int32_t)s;
                ws->positions[s] = (int32_t)pos;
                local_slots++;
            } else {
                ws->positions[s] = -1;
            }
        }
        atomic_init(&ws->token_pending[t], local_slots);
    }
    for (int64_t e = e_loc; e > 0; e--)
        offsets[e] = offsets[e - 1];
    offsets[0] = 0;
}

/* The FC1 input of one sorted position: x, the router weight on the input, W4A4 quantisation.
 * tmp holds H floats. */
static void gather_input(const fp4moe_plan *plan, const forward_call *call, const float *weights,
                         int64_t t, int64_t slot, int64_t expert, float *dst, int64_t dst_stride,
                         float *tmp)
{
    const int64_t h = plan->cfg.hidden_size, k = plan->cfg.top_k;
    const size_t elt = dtype_size(call->hidden_dtype);
    const uint8_t *src = (const uint8_t *)call->hidden_states + (size_t)(t * h) * elt;
    const int w4a4 = plan->cfg.precision == FP4MOE_PRECISION_W4A4;
    float *x = w4a4 ? tmp : dst;
    load_f32(src, call->hidden_dtype, h, x);
    if (plan->cfg.apply_router_weight_on_input) {
        const float w = weights[t * k + slot];
        for (int64_t i = 0; i < h; i++)
            x[i] = w * x[i];
        round_to_dtype(x, h, call->hidden_dtype);
    }
    if (w4a4) nvfp4_fake_quantize_row(x, h, plan->w.a1_global[expert], dst);
    for (int64_t i = h; i < dst_stride; i++)
        dst[i] = 0.0f;
}

/* Activation, rounding to the activation dtype, FC2 input quantisation. h is overwritten. */
static void fc2_input(const fp4moe_plan *plan, const forward_call *call, int64_t expert, float *h,
                      float *dst, int64_t dst_stride)
{
    const int64_t inter = plan->cfg.intermediate_size;
    cpu_activation_row(plan, expert, h, h);
    round_to_dtype(h, inter, call->hidden_dtype);
    if (plan->cfg.precision == FP4MOE_PRECISION_W4A4) {
        nvfp4_fake_quantize_row(h, inter, plan->w.a2_global[expert], dst);
    } else if (plan->cfg.fc2_input_fp8) {
        const float s = plan->w.fc2_input_fp8_scale[expert];
        for (int64_t i = 0; i < inter; i++)
            dst[i] = e4m3_to_float(float_to_e4m3(h[i] * s));
    } else {
        memcpy(dst, h, (size_t)inter * sizeof(float));
    }
    for (int64_t i = inter; i < dst_stride; i++)
        dst[i] = 0.0f;
}

/* The scale of a row's dot product and its bias. */
typedef struct fc_epilogue {
    float scale_low, scale_high; /* rows < split, rows >= split */
    int64_t split;
    const float *bias; /* NULL or [rows] */
} fc_epilogue;

static fc_epilogue fc1_epilogue(const fp4moe_plan *plan, int64_t e)
{
    const int w4a4 = plan->cfg.precision == FP4MOE_PRECISION_W4A4;
    const float sa = w4a4 ? 1.0f / plan->w.a1_global[e] : 1.0f;
    fc_epilogue ep = {sa * plan->w.w1_global[e], sa * plan->w.w1_global_half2[e],
                      plan->cfg.intermediate_size, plan->w.b1 ? plan->w.b1 + e * plan->n1 : NULL};
    return ep;
}

static fc_epilogue fc2_epilogue(const fp4moe_plan *plan, int64_t e)
{
    float sc = 1.0f;
    if (plan->cfg.precision == FP4MOE_PRECISION_W4A4)
        sc = 1.0f / plan->w.a2_global[e];
    else if (plan->cfg.fc2_input_fp8)
        sc = 1.0f / plan->w.fc2_input_fp8_scale[e];
    const int64_t h = plan->cfg.hidden_size;
    fc_epilogue ep = {sc * plan->w.w2_global[e], sc * plan->w.w2_global[e], h,
                      plan->w.b2 ? plan->w.b2 + e * h : NULL};
    return ep;
}

/* Rows of one work item for every token of its expert: token groups outer, row tiles inner,
 * so that a group's activations (up to 6 x 8 KB at H = 2048) stay in L1 while the item's
 * codes (64 rows, 64 KB at H = 2048) come again from L2 for each group: the activations are
 * the larger stream per FMA. Groups are as even as possible (16 tokens with 6 at most run as
 * 6 + 5 + 5, not 6 + 6 + 4: a small group decodes the weights for few FMAs). */
static void run_item(const cpu_state *st, const cpu_packed_matrix *m, const cpu_work_item *it,
                     int64_t pos_begin, int64_t pos_end, const float *x, int64_t x_stride, float *y,
                     int64_t y_stride, const fc_epilogue *ep)
{
    const cpu_kernels *kern = st->kernels;
    const int64_t tile_end = it->tile_end < m->row_tiles ? it->tile_end : m->row_tiles;
    float out[CPU_MAX_TILE_TOKENS * CPU_TILE_ROWS];
    const int64_t n_groups = (pos_end - pos_begin + kern->max_tokens - 1) / kern->max_tokens;
    for (int64_t p = pos_begin, g = 0; p < pos_end; g++) {
        const int64_t left = pos_end - p, groups_left = n_groups - g;
        const int ntok = (int)((left + groups_left - 1) / groups_left);
        for (int64_t tile = it->tile_begin; tile < tile_end; tile++) {
            const int64_t row0 = tile * CPU_TILE_ROWS;
            const int rows = (int)(m->rows - row0 < CPU_TILE_ROWS ? m->rows - row0 : CPU_TILE_ROWS);
            kern->dot_tile(cpu_tile_codes(m, tile), cpu_tile_scales(m, tile), m->pairs,
                           x + p * x_stride, x_stride, ntok, st->scale_lut, out);
            for (int t = 0; t < ntok; t++) {
                float *yt = y + (p + t) * y_stride;
                for (int r = 0; r < rows; r++) {
                    const int64_t n = row0 + r;
                    float v = out[t * CPU_TILE_ROWS + r] *
                              (n < ep->split ? ep->scale_low : ep->scale_high);
                    if (ep->bias) v = v + ep->bias[n];
                    yt[n] = v;
                }
            }
        }
        p += ntok;
    }
}

/* Finalize of one token: the weighted sum over its local slots in slot order, accumulated in
 * the FC2 output row of its first local slot. */
static void finalize_token(const fp4moe_plan *plan, const forward_call *call, const float *weights,
                           int64_t t, int64_t t0, cpu_workspace *ws)
{
    const int64_t k = plan->cfg.top_k, h = plan->cfg.hidden_size;
    const size_t out_elt = dtype_size(call->output_dtype);
    const int on_input = plan->cfg.apply_router_weight_on_input;
    if (!call->finalize) {
        for (int64_t j = 0; j < k; j++) {
            const int32_t pos = ws->positions[(t - t0) * k + j];
            uint8_t *dst = (uint8_t *)call->output + (size_t)((t * k + j) * h) * out_elt;
            if (pos < 0)
                memset(dst, 0, (size_t)h * out_elt);
            else
                store_f32(ws->y + pos * h, h, call->output_dtype, dst);
        }
        return;
    }
    float *sum = NULL;
    for (int64_t j = 0; j < k; j++) {
        const int32_t pos = ws->positions[(t - t0) * k + j];
        if (pos < 0) continue;
        const float w = on_input ? 1.0f : weights[t * k + j];
        const float *yj = ws->y + pos * h;
        if (sum == NULL) {
            sum = ws->y + pos * h;
            for (int64_t i = 0; i < h; i++)
                sum[i] = w * yj[i];
        } else {
            for (int64_t i = 0; i < h; i++)
                sum[i] = sum[i] + w * yj[i];
        }
    }
    uint8_t *dst = (uint8_t *)call->output + (size_t)(t * h) * out_elt;
    if (sum == NULL) { /* no local slot: the empty sum, times p_t */
        const float zero = call->per_token_scale ? call->per_token_scale[t] * 0.0f : 0.0f;
        for (int64_t i = 0; i < h; i++)
            store_f32(&zero, 1, call->output_dtype, dst + i * out_elt);
        return;
    }
    if (call->per_token_scale) {
        const float p = call->per_token_scale[t];
        for (int64_t i = 0; i < h; i++)
            sum[i] = p * sum[i];
    }
    store_f32(sum, h, call->output_dtype, dst);
}

/* The sorted position of a slot -> its local expert. */
static int64_t expert_of(const fp4moe_plan *plan, const int32_t *ids, int64_t t0,
                         const cpu_workspace *ws, int64_t pos)
{
    return (int64_t)ids[t0 * plan->cfg.top_k + ws->entries[pos]] - plan->cfg.local_expert_offset;
}

/* Gathers below this many input values run on the calling thread: at a few tokens a
 * parallel loop and its barrier cost more than the copy. */
#define SERIAL_GATHER_VALUES 65536

/* Phases are chained without barriers where possible: the thread that finishes an expert's
 * last FC1 item computes that expert's FC2 inputs, and the thread that finishes the last FC2
 * item touching a token finalizes it. Which thread does it varies; what it computes does not. */
void cpu_experts_chunk(const fp4moe_plan *plan, const forward_call *call, const int32_t *ids,
                       const float *weights, int64_t t0, int64_t t1, cpu_workspace *ws)
{
    const cpu_state *st = (const cpu_state *)plan->backend_state;
    const int64_t k = plan->cfg.top_k, h = plan->cfg.hidden_size, n1 = plan->n1;
    sort_slots(plan, ids, t0, t1, ws);
    const int64_t *offsets = ws->expert_offsets;
    const int64_t n_items1 = plan_items(plan, offsets, n1, ws->items1, ws->fc1_pending);
    const int64_t n_items2 = plan_items(plan, offsets, h, ws->items2, ws->fc2_pending);
    const int64_t n_pos = offsets[plan->e_loc];
    const int64_t n_tok = t1 - t0;
    const int serial_gather = n_pos * h <= SERIAL_GATHER_VALUES;

    /* The FC2 output row of a position is not written before the FC2 phase: gather borrows
     * it as scratch. */
    if (serial_gather)
        for (int64_t pos = 0; pos < n_pos; pos++) {
            const int64_t s = ws->entries[pos];
            gather_input(plan, call, weights, t0 + s / k, s % k, expert_of(plan, ids, t0, ws, pos),
                         ws->x + pos * ws->x_stride, ws->x_stride, ws->y + pos * h);
        }

#pragma omp parallel num_threads(plan->ctx->num_threads)
    {
        if (!serial_gather) {
#pragma omp for schedule(static)
            for (int64_t pos = 0; pos < n_pos; pos++) {
                const int64_t s = ws->entries[pos];
                gather_input(plan, call, weights, t0 + s / k, s % k,
                             expert_of(plan, ids, t0, ws, pos), ws->x + pos * ws->x_stride,
                             ws->x_stride, ws->y + pos * h);
            }
        }

        /* Tokens without a local slot: nothing reads their input, their output is final. */
#pragma omp for schedule(static) nowait
        for (int64_t t = 0; t < n_tok; t++)
            if (atomic_load_explicit(&ws->token_pending[t], memory_order_relaxed) == 0)
                finalize_token(plan, call, weights, t0 + t, t0, ws);

#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n_items1; i++) {
            const cpu_work_item *it = &ws->items1[i];
            const int64_t e = it->expert;
            const fc_epilogue ep = fc1_epilogue(plan, e);
            run_item(st, &st->fc1[e], it, offsets[e], offsets[e + 1], ws->x, ws->x_stride, ws->h,
                     n1, &ep);
            if (atomic_fetch_sub_explicit(&ws->fc1_pending[e], 1, memory_order_acq_rel) == 1)
                for (int64_t pos = offsets[e]; pos < offsets[e + 1]; pos++)
                    fc2_input(plan, call, e, ws->h + pos * n1, ws->c + pos * ws->c_stride,
                              ws->c_stride);
        }

#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n_items2; i++) {
            const cpu_work_item *it = &ws->items2[i];
            const int64_t e = it->expert;
            const fc_epilogue ep = fc2_epilogue(plan, e);
            run_item(st, &st->fc2[e], it, offsets[e], offsets[e + 1], ws->c, ws->c_stride, ws->y, h,
                     &ep);
            if (atomic_fetch_sub_explicit(&ws->fc2_pending[e], 1, memory_order_acq_rel) != 1)
                continue;
            for (int64_t pos = offsets[e]; pos < offsets[e + 1]; pos++) {
                const int64_t t = ws->entries[pos] / k;
                if (atomic_fetch_sub_explicit(&ws->token_pending[t], 1, memory_order_acq_rel) == 1)
                    finalize_token(plan, call, weights, t0 + t, t0, ws);
            }
        }
    }
}
