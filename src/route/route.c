/* Routing of one token, every method of the spec's section 4 table, in FP32. docs/ROUTING.md
 * lists the methods as implemented, the public sources each follows and where they disagree.
 *
 * Ranking everywhere (experts and DeepSeek groups): larger value first, equal values toward the
 * lower index, NaN below every number (-inf included), NaNs among themselves by index. The
 * selection scans the candidates once, keeping the best k in a sorted list (O(E*k) at worst,
 * close to O(E) for random logits), in caller-provided scratch: no allocation. */
#include "route.h"

#include <math.h>

/* Scratch layout, in floats (route_scratch_floats):
 *   [0, E)       the selection key of every expert
 *   [E, 2E)      keys of the kept list (k, or topk_group for the group stage)
 *   [2E, 3E)     ids of the kept list, stored as floats: exact for ids below 2^24, far above
 *                any expert count, and it keeps the scratch a plain float buffer
 *   [3E, 4E)     DeepSeek group scores, then the kept-group flags */
int64_t route_scratch_floats(int64_t num_experts) { return 4 * num_experts; }

static int ranks_before(float a, int64_t index_a, float b, int64_t index_b)
{
    if (isnan(a)) return isnan(b) && index_a < index_b;
    if (isnan(b)) return 1;
    if (a != b) return a > b;
    return index_a < index_b;
}

/* The best `capacity` candidates offered so far, best first. */
typedef struct ranked_list {
    float *keys;
    float *ids;
    int64_t count;
    int64_t capacity;
} ranked_list;

static void ranked_list_offer(ranked_list *list, float key, int64_t id)
{
    int64_t pos = list->count;
    if (pos == list->capacity) {
        if (pos == 0 || !ranks_before(key, id, list->keys[pos - 1], (int64_t)list->ids[pos - 1]))
            return;
        pos--; /* the current last one falls out */
    } else {
        list->count++;
    }
    while (pos > 0 && ranks_before(key, id, list->keys[pos - 1], (int64_t)list->ids[pos - 1])) {
        list->keys[pos] = list->keys[pos - 1];
        list->ids[pos] = list->ids[pos - 1];
        pos--;
    }
    list->keys[pos] = key;
    list->ids[pos] = (float)id;
}

/* Top-k of key[0..E) into ids (best first). */
static void select_top_k(const float *key, int64_t num_experts, int32_t top_k, int32_t *ids,
                         float *scratch)
{
    ranked_list list = {scratch + num_experts, scratch + 2 * num_experts, 0, top_k};
    for (int64_t e = 0; e < num_experts; e++) ranked_list_offer(&list, key[e], e);
    for (int32_t j = 0; j < top_k; j++) ids[j] = (int32_t)list.ids[j];
}

static float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

static float biased(const route_params *params, const float *logits, int64_t e)
{
    return params->bias ? logits[e] + params->bias[e] : logits[e];
}

/* Compensated (Neumaier) FP32 sum: the softmax denominator runs over up to thousands of terms,
 * and a plain running sum would make the weights' error grow with E. */
typedef struct compensated_sum {
    float sum;
    float compensation;
} compensated_sum;

static void compensated_add(compensated_sum *acc, float value)
{
    float t = acc->sum + value;
    if (fabsf(acc->sum) >= fabsf(value))
        acc->compensation += (acc->sum - t) + value;
    else
        acc->compensation += (value - t) + acc->sum;
    acc->sum = t;
}

static float compensated_result(const compensated_sum *acc)
{
    /* inf/NaN terms make the compensation NaN; the plain sum is then the right answer */
    return isfinite(acc->sum) ? acc->sum + acc->compensation : acc->sum;
}

static float sum_of(const float *values, int32_t n)
{
    compensated_sum acc = {0.0f, 0.0f};
    for (int32_t j = 0; j < n; j++) compensated_add(&acc, values[j]);
    return compensated_result(&acc);
}

/* softmax_topk, renormalize_naive: select on softmax(logits + bias) over all E. The keys are
 * the probabilities themselves (as FlashInfer selects), with the max and sum taken over the
 * non-NaN values so one NaN logit does not hide the ranking of the others; the weights are NaN
 * when any logit is, as the softmax formula gives. */
static void route_softmax_all(const route_params *params, const float *logits, int32_t *ids,
                              float *weights, float *scratch)
{
    const int64_t num_experts = params->num_experts;
    float *key = scratch;
    float max_value = -INFINITY;
    int any_nan = 0;
    for (int64_t e = 0; e < num_experts; e++) {
        key[e] = biased(params, logits, e);
        if (isnan(key[e]))
            any_nan = 1;
        else if (key[e] > max_value)
            max_value = key[e];
    }
    compensated_sum acc = {0.0f, 0.0f};
    for (int64_t e = 0; e < num_experts; e++) {
        if (isnan(key[e])) continue;
        key[e] = expf(key[e] - max_value);
        compensated_add(&acc, key[e]);
    }
    const float denominator = compensated_result(&acc);
    for (int64_t e = 0; e < num_experts; e++) key[e] = key[e] / denominator;

    const int32_t top_k = params->top_k;
    select_top_k(key, num_experts, top_k, ids, scratch);
    for (int32_t j = 0; j < top_k; j++) weights[j] = any_nan ? NAN : key[ids[j]];
    if (params->method == FP4MOE_ROUTING_RENORMALIZE_NAIVE) {
        const float selected_sum = sum_of(weights, top_k);
        for (int32_t j = 0; j < top_k; j++) weights[j] = weights[j] / selected_sum;
    }
}

/* renormalize: select on logits + bias, softmax over the k selected. The best one is the max
 * (a NaN best means all k are NaN, and so are the weights). */
static void route_renormalize(const route_params *params, const float *logits, int32_t *ids,
                              float *weights, float *scratch)
{
    float *key = scratch;
    for (int64_t e = 0; e < params->num_experts; e++) key[e] = biased(params, logits, e);
    const int32_t top_k = params->top_k;
    select_top_k(key, params->num_experts, top_k, ids, scratch);
    const float max_value = key[ids[0]];
    for (int32_t j = 0; j < top_k; j++) weights[j] = expf(key[ids[j]] - max_value);
    const float denominator = sum_of(weights, top_k);
    for (int32_t j = 0; j < top_k; j++) weights[j] = weights[j] / denominator;
}

/* topk, topk_sigmoid, llama4 (select on the logits); sigmoid, sigmoid_renorm (select on the
 * sigmoid, so values that saturate to the same FP32 sigmoid tie toward the lower index, as on
 * the GPU; topk_sigmoid exists to avoid exactly that). */
static void route_plain(const route_params *params, const float *logits, int32_t *ids,
                        float *weights, float *scratch)
{
    const fp4moe_routing method = params->method;
    const int select_on_sigmoid =
        method == FP4MOE_ROUTING_SIGMOID || method == FP4MOE_ROUTING_SIGMOID_RENORM;
    float *key = scratch;
    for (int64_t e = 0; e < params->num_experts; e++)
        key[e] = select_on_sigmoid ? sigmoid(logits[e]) : logits[e];
    const int32_t top_k = params->top_k;
    select_top_k(key, params->num_experts, top_k, ids, scratch);
    for (int32_t j = 0; j < top_k; j++)
        weights[j] = method == FP4MOE_ROUTING_TOPK ? key[ids[j]] : sigmoid(logits[ids[j]]);
    if (method == FP4MOE_ROUTING_SIGMOID_RENORM && params->norm_topk_prob) {
        const float sum = sum_of(weights, top_k);
        /* max(sum, 1e-20) per the spec, but a NaN sum stays NaN (fmaxf would drop it) */
        const float denominator = (isnan(sum) || sum > 1e-20f) ? sum : 1e-20f;
        for (int32_t j = 0; j < top_k; j++) weights[j] = weights[j] / denominator;
    }
}

/* deepseek_v3 group stage: the group score is the sum of the group's two best b (its best when
 * it has one expert); flags[g] becomes 1 for the topk_group best groups, 0 for the others. */
static void keep_best_groups(const route_params *params, const float *b, float *flags,
                             float *scratch)
{
    const int64_t num_experts = params->num_experts;
    const int64_t n_group = params->n_group > 0 ? params->n_group : 1;
    const int64_t group_size = num_experts / n_group;
    const int64_t keep = params->topk_group > 0 ? params->topk_group : n_group;
    if (keep >= n_group) {
        for (int64_t g = 0; g < n_group; g++) flags[g] = 1.0f;
        return;
    }
    for (int64_t g = 0; g < n_group; g++) {
        const float *group = b + g * group_size;
        int64_t first = 0;
        for (int64_t i = 1; i < group_size; i++)
            if (ranks_before(group[i], i, group[first], first)) first = i;
        if (group_size == 1) {
            flags[g] = group[first];
            continue;
        }
        int64_t second = first == 0 ? 1 : 0;
        for (int64_t i = 0; i < group_size; i++)
            if (i != first && ranks_before(group[i], i, group[second], second)) second = i;
        flags[g] = group[first] + group[second];
    }
    ranked_list list = {scratch + num_experts, scratch + 2 * num_experts, 0, keep};
    for (int64_t g = 0; g < n_group; g++) ranked_list_offer(&list, flags[g], g);
    for (int64_t g = 0; g < n_group; g++) flags[g] = 0.0f;
    for (int64_t i = 0; i < keep; i++) flags[(int64_t)list.ids[i]] = 1.0f;
}

/* deepseek_v3, minimax2: select on b = sigmoid(logit) + bias (inside the kept groups for
 * deepseek_v3), weigh with the unbiased sigmoid s. */
static void route_sigmoid_bias(const route_params *params, const float *logits, int32_t *ids,
                               float *weights, float *scratch)
{
    const int64_t num_experts = params->num_experts;
    const int32_t top_k = params->top_k;
    float *b = scratch;
    for (int64_t e = 0; e < num_experts; e++)
        b[e] = params->bias ? sigmoid(logits[e]) + params->bias[e] : sigmoid(logits[e]);

    ranked_list list = {scratch + num_experts, scratch + 2 * num_experts, 0, top_k};
    if (params->method == FP4MOE_ROUTING_DEEPSEEK_V3) {
        const int64_t n_group = params->n_group > 0 ? params->n_group : 1;
        const int64_t group_size = num_experts / n_group;
        float *kept = scratch + 3 * num_experts;
        keep_best_groups(params, b, kept, scratch);
        for (int64_t e = 0; e < num_experts; e++)
            if (kept[e / group_size] != 0.0f) ranked_list_offer(&list, b[e], e);
        /* Validated configs keep at least k experts; should one not, the dropped groups'
         * experts follow all kept ones rather than leaving slots unset. */
        if (list.count < top_k) {
            ranked_list rest = {list.keys + list.count, list.ids + list.count, 0,
                                top_k - list.count};
            for (int64_t e = 0; e < num_experts; e++)
                if (kept[e / group_size] == 0.0f) ranked_list_offer(&rest, b[e], e);
        }
    } else {
        for (int64_t e = 0; e < num_experts; e++) ranked_list_offer(&list, b[e], e);
    }
    for (int32_t j = 0; j < top_k; j++) {
        ids[j] = (int32_t)list.ids[j];
        weights[j] = sigmoid(logits[ids[j]]);
    }

    const float scale = params->routed_scaling_factor;
    const float sum = sum_of(weights, top_k);
    if (params->method == FP4MOE_ROUTING_MINIMAX2) {
        /* FlashInfer's ScaledSumNormalize order: s * scale / (sum + eps) */
        for (int32_t j = 0; j < top_k; j++) weights[j] = weights[j] * scale / (sum + 1e-20f);
    } else if (params->norm_topk_prob) {
        /* HF DeepseekV3TopkRouter: (s / (sum + 1e-20)) * scale; the epsilon is a no-op in FP32
         * unless the chosen s underflow, where it gives 0 instead of 0/0 */
        for (int32_t j = 0; j < top_k; j++) weights[j] = weights[j] / (sum + 1e-20f) * scale;
    } else {
        for (int32_t j = 0; j < top_k; j++) weights[j] = weights[j] * scale;
    }
}

void route_token(const route_params *params, const float *logits, int32_t *ids, float *weights,
                 float *scratch)
{
    switch (params->method) {
    case FP4MOE_ROUTING_SOFTMAX_TOPK:
    case FP4MOE_ROUTING_RENORMALIZE_NAIVE:
        route_softmax_all(params, logits, ids, weights, scratch);
        break;
    case FP4MOE_ROUTING_RENORMALIZE:
        route_renormalize(params, logits, ids, weights, scratch);
        break;
    case FP4MOE_ROUTING_DEEPSEEK_V3:
    case FP4MOE_ROUTING_MINIMAX2:
        route_sigmoid_bias(params, logits, ids, weights, scratch);
        break;
    case FP4MOE_ROUTING_TOPK:
    case FP4MOE_ROUTING_SIGMOID:
    case FP4MOE_ROUTING_SIGMOID_RENORM:
    case FP4MOE_ROUTING_TOPK_SIGMOID:
    case FP4MOE_ROUTING_LLAMA4:
    default:
        route_plain(params, logits, ids, weights, scratch);
        break;
    }
}
