/* route_token against hand-worked cases for every method (ties, groups, bias, norm, scale,
 * epsilons, NaN, k = E, E not a multiple of 8) and against a deliberately simple float64
 * sort-based routing written here, on many random tokens for every method. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "route/route.h"
#include "testing.h"

#define MAX_E 4096
#define MAX_K 32

static float scratch_buffer[4 * MAX_E];

static route_params params_of(fp4moe_routing method, int64_t num_experts, int32_t top_k)
{
    route_params p;
    memset(&p, 0, sizeof p);
    p.method = method;
    p.num_experts = num_experts;
    p.top_k = top_k;
    p.n_group = 1;
    p.topk_group = 1;
    p.norm_topk_prob = 1;
    p.routed_scaling_factor = 1.0f;
    return p;
}

static void run(const route_params *p, const float *logits, int32_t *ids, float *weights)
{
    if (route_scratch_floats(p->num_experts) > 4 * MAX_E) {
        fprintf(stderr, "scratch too small for E=%lld\n", (long long)p->num_experts);
        exit(2);
    }
    route_token(p, logits, ids, weights, scratch_buffer);
}

/* Checks ids exactly and weights within 1e-6 relative (NaN expected: NaN). */
static void expect(testing_state *st, const char *what, const route_params *p, const float *logits,
                   const int32_t *want_ids, const double *want_weights)
{
    int32_t ids[MAX_K];
    float weights[MAX_K];
    run(p, logits, ids, weights);
    for (int32_t j = 0; j < p->top_k; j++) {
        CHECK(st, ids[j] == want_ids[j], "%s: slot %d id %d, want %d", what, j, ids[j],
              want_ids[j]);
        double w = weights[j], want = want_weights[j];
        int ok = isnan(want)   ? isnan(w)
                 : isinf(want) ? w == want
                               : fabs(w - want) <= 1e-6 * fabs(want) + 1e-30;
        CHECK(st, ok, "%s: slot %d weight %.9g, want %.9g", what, j, w, want);
    }
}

static float logit_of(double s) { return (float)log(s / (1.0 - s)); }
static double sigmoid_d(double x) { return 1.0 / (1.0 + exp(-x)); }

static void test_softmax_family(testing_state *st)
{
    /* softmax_topk, logits {1, 3, 2, 3}, k 2: experts 1 and 3 tie at 3 -> 1 first.
     * sum = e + e^3 + e^2 + e^3 = 2.718282 + 20.085537 + 7.389056 + 20.085537 = 50.278412;
     * weight = e^3 / 50.278412 = 0.399487 for both. */
    {
        const float logits[] = {1, 3, 2, 3};
        route_params p = params_of(FP4MOE_ROUTING_SOFTMAX_TOPK, 4, 2);
        double s = exp(1) + 2 * exp(3) + exp(2);
        expect(st, "softmax_topk tie", &p, logits, (int32_t[]){1, 3},
               (double[]){exp(3) / s, exp(3) / s});
        /* bias {2.5, 0, 0, 0} enters selection and weights: x = {3.5, 3, 2, 3};
         * sum = e^3.5 + 2e^3 + e^2 = 33.115452 + 40.171074 + 7.389056 = 80.675582;
         * ids {0, 1}, weights 0.410477, 0.248970 */
        const float bias[] = {2.5f, 0, 0, 0};
        p.bias = bias;
        s = exp(3.5) + 2 * exp(3) + exp(2);
        expect(st, "softmax_topk bias", &p, logits, (int32_t[]){0, 1},
               (double[]){exp(3.5) / s, exp(3) / s});
    }
    /* renormalize, logits {0.5, 2, -1, 1, 2}, k 3: order 2 (#1), 2 (#4), 1 (#3); softmax over
     * {2, 2, 1} = {1, 1, e^-1} / (2 + 0.367879) = {0.422319, 0.422319, 0.155362}. */
    {
        const float logits[] = {0.5f, 2, -1, 1, 2};
        route_params p = params_of(FP4MOE_ROUTING_RENORMALIZE, 5, 3);
        double d = 2 + exp(-1);
        expect(st, "renormalize", &p, logits, (int32_t[]){1, 4, 3},
               (double[]){1 / d, 1 / d, exp(-1) / d});
        /* renormalize_naive: softmax over all 5 then / sum of the 3: the same values */
        p.method = FP4MOE_ROUTING_RENORMALIZE_NAIVE;
        expect(st, "renormalize_naive", &p, logits, (int32_t[]){1, 4, 3},
               (double[]){1 / d, 1 / d, exp(-1) / d});
        /* bias {0, 0, 3.5, 0, 0}: x = {0.5, 2, 2.5, 1, 2} -> ids {2, 1, 4}; softmax over
         * {2.5, 2, 2} = {1, e^-0.5, e^-0.5} / (1 + 2 * 0.606531)
         *             = {0.451863, 0.274069, 0.274069} */
        const float bias[] = {0, 0, 3.5f, 0, 0};
        p.bias = bias;
        d = 1 + 2 * exp(-0.5);
        double want[] = {1 / d, exp(-0.5) / d, exp(-0.5) / d};
        expect(st, "renormalize_naive bias", &p, logits, (int32_t[]){2, 1, 4}, want);
        p.method = FP4MOE_ROUTING_RENORMALIZE;
        expect(st, "renormalize bias", &p, logits, (int32_t[]){2, 1, 4}, want);
        /* k = E = 5: everything, best first; softmax over all five */
        p = params_of(FP4MOE_ROUTING_RENORMALIZE, 5, 5);
        d = 2 * exp(2) + exp(1) + exp(0.5) + exp(-1);
        expect(st, "renormalize k=E", &p, logits, (int32_t[]){1, 4, 3, 0, 2},
               (double[]){exp(2) / d, exp(2) / d, exp(1) / d, exp(0.5) / d, exp(-1) / d});
    }
}

static void test_plain_family(testing_state *st)
{
    /* topk, logits {-1, 4, 4, 2.5}, k 3: the logits themselves, tie 4/4 -> #1 then #2 */
    {
        const float logits[] = {-1, 4, 4, 2.5f};
        route_params p = params_of(FP4MOE_ROUTING_TOPK, 4, 3);
        expect(st, "topk", &p, logits, (int32_t[]){1, 2, 3}, (double[]){4, 4, 2.5});
    }
    /* sigmoid, logits ln(s/(1-s)) for s = {0.25, 0.75, 0.9, 0.1}, k 2: ids {2, 1}, {0.9, 0.75} */
    {
        const float logits[] = {logit_of(0.25), logit_of(0.75), logit_of(0.9), logit_of(0.1)};
        route_params p = params_of(FP4MOE_ROUTING_SIGMOID, 4, 2);
        expect(st, "sigmoid", &p, logits, (int32_t[]){2, 1}, (double[]){0.9, 0.75});
        /* sigmoid_renorm: / (0.9 + 0.75 = 1.65) -> {0.545455, 0.454545}; norm off: as sigmoid */
        p.method = FP4MOE_ROUTING_SIGMOID_RENORM;
        expect(st, "sigmoid_renorm", &p, logits, (int32_t[]){2, 1},
               (double[]){0.9 / 1.65, 0.75 / 1.65});
        p.norm_topk_prob = 0;
        expect(st, "sigmoid_renorm norm off", &p, logits, (int32_t[]){2, 1}, (double[]){0.9, 0.75});
    }
    /* sigmoid_renorm floor: logits -200 -> expf(200) = inf, s = 0 for all, sum 0 ->
     * max(0, 1e-20) = 1e-20 -> weights 0 / 1e-20 = 0 (not NaN); all tie -> ids {0, 1} */
    {
        const float logits[] = {-200, -200, -200};
        route_params p = params_of(FP4MOE_ROUTING_SIGMOID_RENORM, 3, 2);
        expect(st, "sigmoid_renorm floor", &p, logits, (int32_t[]){0, 1}, (double[]){0, 0});
    }
    /* saturation: logits {20, 30, 25}: in FP32 1 + e^-20 (2.1e-9) = 1, so every sigmoid is 1.0f
     * and `sigmoid` ties toward {0, 1}; topk_sigmoid selects on the logits: {1, 2}, weights 1 */
    {
        const float logits[] = {20, 30, 25};
        route_params p = params_of(FP4MOE_ROUTING_SIGMOID, 3, 2);
        expect(st, "sigmoid saturated", &p, logits, (int32_t[]){0, 1}, (double[]){1, 1});
        p.method = FP4MOE_ROUTING_TOPK_SIGMOID;
        expect(st, "topk_sigmoid saturated", &p, logits, (int32_t[]){1, 2}, (double[]){1, 1});
        /* unsaturated: logits {0.5, -1, 2}, k 2 -> ids {2, 0}, sigmoid 0.880797, 0.622459 */
        const float small[] = {0.5f, -1, 2};
        expect(st, "topk_sigmoid", &p, small, (int32_t[]){2, 0},
               (double[]){sigmoid_d(2), sigmoid_d(0.5)});
    }
    /* llama4, logits {0.5, -2, 1.5, 1.5}, k 1: tie #2/#3 -> 2, weight sigmoid(1.5) = 0.817574 */
    {
        const float logits[] = {0.5f, -2, 1.5f, 1.5f};
        route_params p = params_of(FP4MOE_ROUTING_LLAMA4, 4, 1);
        expect(st, "llama4", &p, logits, (int32_t[]){2}, (double[]){sigmoid_d(1.5)});
    }
    /* E = 13 (not a multiple of 8), k = E, topk: logits 13 - 2i for odd i, i - 20 for even i:
     * #1..#11 odd: 11, 7, 3, -1, -5, -9; #0..#12 even: -20, -18, -16, -14, -12, -10, -8.
     * Descending: 11 #1, 7 #3, 3 #5, -1 #7, -5 #9, -8 #12, -9 #11, -10 #10, -12 #8, ..., -20 #0 */
    {
        float logits[13];
        for (int i = 0; i < 13; i++) logits[i] = (i % 2) ? (float)(13 - 2 * i) : (float)(i - 20);
        route_params p = params_of(FP4MOE_ROUTING_TOPK, 13, 13);
        int32_t want[] = {1, 3, 5, 7, 9, 12, 11, 10, 8, 6, 4, 2, 0};
        double w[13];
        for (int j = 0; j < 13; j++) w[j] = logits[want[j]];
        expect(st, "topk E=13 k=E", &p, logits, want, w);
    }
}

static void test_deepseek(testing_state *st)
{
    /* E 8, n_group 4 (pairs), topk_group 2, k 2, s per expert:
     *   g0 {0.95, 0.10} = 1.05   g1 {0.60, 0.55} = 1.15
     *   g2 {0.50, 0.52} = 1.02   g3 {0.58, 0.54} = 1.12
     * keep g1, g3 -> experts {2, 3, 6, 7}; top-2: 0.60 (#2), 0.58 (#6). The best expert (#0,
     * 0.95) sits in the dropped g0. norm: 0.60 / 1.18 = 0.508475, 0.58 / 1.18 = 0.491525, x 2.5
     * = 1.271186, 1.228814; norm off: 0.60 x 2.5 = 1.5, 0.58 x 2.5 = 1.45. */
    const double s[] = {0.95, 0.10, 0.60, 0.55, 0.50, 0.52, 0.58, 0.54};
    float logits[8];
    for (int i = 0; i < 8; i++) logits[i] = logit_of(s[i]);
    route_params p = params_of(FP4MOE_ROUTING_DEEPSEEK_V3, 8, 2);
    p.n_group = 4;
    p.topk_group = 2;
    p.routed_scaling_factor = 2.5f;
    expect(st, "deepseek groups", &p, logits, (int32_t[]){2, 6},
           (double[]){0.60 / 1.18 * 2.5, 0.58 / 1.18 * 2.5});
    p.norm_topk_prob = 0;
    expect(st, "deepseek norm off", &p, logits, (int32_t[]){2, 6}, (double[]){1.5, 1.45});
    p.norm_topk_prob = 1;
    /* bias +0.2 on #3: b3 = 0.75, g1 = 0.60 + 0.75 = 1.35 still kept; top-2 of b in {2,3,6,7}:
     * 0.75 (#3), 0.60 (#2); weights from the unbiased s: 0.55 / 1.15 = 0.478261, 0.60 / 1.15 =
     * 0.521739, x 2.5 */
    float bias[8] = {0};
    bias[3] = 0.2f;
    p.bias = bias;
    expect(st, "deepseek bias steers", &p, logits, (int32_t[]){3, 2},
           (double[]){0.55 / 1.15 * 2.5, 0.60 / 1.15 * 2.5});
    /* bias +0.2 on #5 instead: g2 = 0.50 + 0.72 = 1.22 now beats g3 (1.12); keep g2, g1 ->
     * b {0.60, 0.55, 0.50, 0.72} -> ids {5, 2}; weights s 0.52 / 1.12, 0.60 / 1.12 */
    bias[3] = 0;
    bias[5] = 0.2f;
    expect(st, "deepseek bias moves groups", &p, logits, (int32_t[]){5, 2},
           (double[]){0.52 / 1.12 * 2.5, 0.60 / 1.12 * 2.5});

    /* groups of one expert: E 4, n_group 4, topk_group 2, k 2: group score = b itself;
     * s {0.3, 0.9, 0.7, 0.8} -> keep #1, #3 -> ids {1, 3}, weights 0.9 / 1.7, 0.8 / 1.7 */
    {
        const float l4[] = {logit_of(0.3), logit_of(0.9), logit_of(0.7), logit_of(0.8)};
        route_params q = params_of(FP4MOE_ROUTING_DEEPSEEK_V3, 4, 2);
        q.n_group = 4;
        q.topk_group = 2;
        expect(st, "deepseek group of one", &q, l4, (int32_t[]){1, 3},
               (double[]){0.9 / 1.7, 0.8 / 1.7});
    }
    /* group tie: logits -30 (s = 9.4e-14, below half an ulp of the biases, so b = bias exactly);
     * bias {0.25, 0.5 | 0.625, 0.125 | 0.375, 0.25}: g0 = 0.75 = g1 > g2 = 0.625; topk_group 1
     * keeps g0 (lower index) -> k 1 picks #1 (0.5) though #2 (0.625) is the best b.
     * weight s / (s + 1e-20) x 3 = 3 (s = 9.36e-14 >> 1e-20). */
    {
        const float l6[] = {-30, -30, -30, -30, -30, -30};
        const float b6[] = {0.25f, 0.5f, 0.625f, 0.125f, 0.375f, 0.25f};
        route_params q = params_of(FP4MOE_ROUTING_DEEPSEEK_V3, 6, 1);
        q.n_group = 3;
        q.topk_group = 1;
        q.routed_scaling_factor = 3.0f;
        q.bias = b6;
        expect(st, "deepseek group tie", &q, l6, (int32_t[]){1}, (double[]){3.0});
        /* all s underflow (logit -200 -> s = 0): the HF epsilon gives 0 / 1e-20 = 0, not NaN */
        const float l6u[] = {-200, -200, -200, -200, -200, -200};
        expect(st, "deepseek epsilon", &q, l6u, (int32_t[]){1}, (double[]){0.0});
    }
    /* NaN: E 4, n_group 2, topk_group 1, k 1, logits {NaN, 3, 1, 1}: g0 = NaN + s(3) = NaN
     * ranks last, keep g1; #2, #3 tie -> #2; weight s / s = 1 */
    {
        const float ln[] = {NAN, 3, 1, 1};
        route_params q = params_of(FP4MOE_ROUTING_DEEPSEEK_V3, 4, 1);
        q.n_group = 2;
        q.topk_group = 1;
        expect(st, "deepseek NaN group", &q, ln, (int32_t[]){2}, (double[]){1.0});
    }
}

static void test_minimax2(testing_state *st)
{
    /* s {0.2, 0.6, 0.4, 0.8}, bias {0.5, 0, 0.1, -0.3}: b {0.7, 0.6, 0.5, 0.5} -> ids {0, 1};
     * weights s x 2 / (0.2 + 0.6) = 0.5, 1.5 (bias steers, weights unbiased, scale 2) */
    const float logits[] = {logit_of(0.2), logit_of(0.6), logit_of(0.4), logit_of(0.8)};
    const float bias[] = {0.5f, 0, 0.1f, -0.3f};
    route_params p = params_of(FP4MOE_ROUTING_MINIMAX2, 4, 2);
    p.bias = bias;
    p.routed_scaling_factor = 2.0f;
    expect(st, "minimax2", &p, logits, (int32_t[]){0, 1}, (double[]){0.5, 1.5});
    /* epsilon: logits -200 -> s = 0; b = bias {0.1, 0.3, 0.2} -> ids {1, 2};
     * weights 0 x 2 / (0 + 1e-20) = 0, not NaN */
    const float under[] = {-200, -200, -200};
    const float bias3[] = {0.1f, 0.3f, 0.2f};
    route_params q = params_of(FP4MOE_ROUTING_MINIMAX2, 3, 2);
    q.bias = bias3;
    q.routed_scaling_factor = 2.0f;
    expect(st, "minimax2 epsilon", &q, under, (int32_t[]){1, 2}, (double[]){0, 0});
    /* tiny s: logits -85 -> expf(85) = 8.2e36, s = 1.2e-37 each; sum 2.4e-37 + 1e-20 = 1e-20 in
     * FP32, so the weights are s / 1e-20 = 1.2e-17, far from 0.5: here the epsilon matters */
    const float tiny[] = {-85, -85};
    route_params r = params_of(FP4MOE_ROUTING_MINIMAX2, 2, 2);
    int32_t ids[2];
    float w[2];
    run(&r, tiny, ids, w);
    CHECK(st, ids[0] == 0 && ids[1] == 1 && w[0] < 1e-10f && w[0] > 0, "minimax2 tiny: %d %d %g",
          ids[0], ids[1], w[0]);
}

static void test_nan(testing_state *st)
{
    const double nan = NAN;
    /* topk, {NaN, 1, NaN, -inf}, k 3: 1 (#1), -inf (#3) above every NaN, then NaN #0 (lower) */
    {
        const float logits[] = {NAN, 1, NAN, -INFINITY};
        route_params p = params_of(FP4MOE_ROUTING_TOPK, 4, 3);
        expect(st, "topk NaN", &p, logits, (int32_t[]){1, 3, 0}, (double[]){1, -INFINITY, nan});
    }
    /* softmax_topk {1, NaN, 2}, k 2: ranking ignores the NaN (ids {2, 0}), weights NaN */
    {
        const float logits[] = {1, NAN, 2};
        route_params p = params_of(FP4MOE_ROUTING_SOFTMAX_TOPK, 3, 2);
        expect(st, "softmax_topk NaN", &p, logits, (int32_t[]){2, 0}, (double[]){nan, nan});
        p.method = FP4MOE_ROUTING_RENORMALIZE_NAIVE;
        expect(st, "renormalize_naive NaN", &p, logits, (int32_t[]){2, 0}, (double[]){nan, nan});
        /* renormalize: the softmax is over the 2 chosen (no NaN): 1 / (1 + e^-1) = 0.731059 */
        p.method = FP4MOE_ROUTING_RENORMALIZE;
        double d = 1 + exp(-1);
        expect(st, "renormalize NaN unselected", &p, logits, (int32_t[]){2, 0},
               (double[]){1 / d, exp(-1) / d});
        /* k = E = 3 takes the NaN in: every weight NaN */
        p.top_k = 3;
        expect(st, "renormalize NaN selected", &p, logits, (int32_t[]){2, 0, 1},
               (double[]){nan, nan, nan});
    }
    /* sigmoid {NaN, -5}, k 2: ids {1, 0}, weights {sigmoid(-5) = 0.006693, NaN} */
    {
        const float logits[] = {NAN, -5};
        route_params p = params_of(FP4MOE_ROUTING_SIGMOID, 2, 2);
        expect(st, "sigmoid NaN", &p, logits, (int32_t[]){1, 0}, (double[]){sigmoid_d(-5), nan});
        /* minimax2: NaN s chosen -> the sum is NaN -> every weight NaN */
        p.method = FP4MOE_ROUTING_MINIMAX2;
        expect(st, "minimax2 NaN", &p, logits, (int32_t[]){1, 0}, (double[]){nan, nan});
    }
}

/* ------------------------------------------------------------------------------------------ */
/* The float64 reference: sort everything, then read off the first k.                        */
/* ------------------------------------------------------------------------------------------ */
static int before_d(double a, int64_t ia, double b, int64_t ib)
{
    if (isnan(a)) return isnan(b) && ia < ib;
    if (isnan(b)) return 1;
    if (a != b) return a > b;
    return ia < ib;
}

/* order[0..n) = 0..n-1 sorted by (tier descending, key ranking); tier may be NULL. */
static void sort_order(const double *key, const int *tier, int64_t n, int64_t *order)
{
    for (int64_t i = 0; i < n; i++) order[i] = i;
    for (int64_t i = 1; i < n; i++) {
        int64_t v = order[i], j = i;
        while (j > 0) {
            int64_t u = order[j - 1];
            int t_v = tier ? tier[v] : 0, t_u = tier ? tier[u] : 0;
            int v_first = t_v != t_u ? t_v > t_u : before_d(key[v], v, key[u], u);
            if (!v_first) break;
            order[j] = u;
            j--;
        }
        order[j] = v;
    }
}

static int near_tie(double a, double b)
{
    double m = fmax(1.0, fmax(fabs(a), fabs(b)));
    return fabs(a - b) <= 1e-6 * m;
}

/* Any near tie among the first `count + 1` ranked entries (same tier) makes the order fragile. */
static int fragile(const double *key, const int *tier, const int64_t *order, int64_t n,
                   int64_t count)
{
    for (int64_t j = 0; j + 1 < n && j < count; j++) {
        int64_t a = order[j], b = order[j + 1];
        if (tier && tier[a] != tier[b]) continue;
        if (near_tie(key[a], key[b])) return 1;
    }
    return 0;
}

/* Returns 1 when the token is free of near ties (then ids/weights hold the answer). */
static int reference_route(const route_params *p, const float *logits, int64_t *ids,
                           double *weights)
{
    static double key[MAX_E], s[MAX_E], group_score[MAX_E], member[MAX_E];
    static int kept[MAX_E], group_kept[MAX_E];
    static int64_t order[MAX_E], group_order[MAX_E], member_order[MAX_E];
    const int64_t E = p->num_experts;
    const int32_t k = p->top_k;
    const fp4moe_routing m = p->method;
    for (int64_t e = 0; e < E; e++) {
        double x = logits[e];
        double b = p->bias ? p->bias[e] : 0.0;
        s[e] = sigmoid_d(x);
        switch (m) {
        case FP4MOE_ROUTING_SOFTMAX_TOPK:
        case FP4MOE_ROUTING_RENORMALIZE:
        case FP4MOE_ROUTING_RENORMALIZE_NAIVE:
            /* the biased logit is an FP32 input of the softmax (scores are FP32): round it as the
             * library must, or its ulp (~1e-6 at |x| ~ 8) shows as a 1e-6 weight difference */
            key[e] = (double)(float)(x + b);
            break;
        case FP4MOE_ROUTING_SIGMOID:
        case FP4MOE_ROUTING_SIGMOID_RENORM:
            key[e] = s[e];
            break;
        case FP4MOE_ROUTING_DEEPSEEK_V3:
        case FP4MOE_ROUTING_MINIMAX2:
            key[e] = s[e] + b;
            break;
        default:
            key[e] = x;
            break;
        }
    }
    int *tier = NULL;
    if (m == FP4MOE_ROUTING_DEEPSEEK_V3) {
        const int64_t G = p->n_group, size = E / G;
        for (int64_t g = 0; g < G; g++) {
            for (int64_t i = 0; i < size; i++) member[i] = key[g * size + i];
            sort_order(member, NULL, size, member_order);
            group_score[g] = member[member_order[0]] + (size > 1 ? member[member_order[1]] : 0.0);
        }
        sort_order(group_score, NULL, G, group_order);
        if (p->topk_group < G && fragile(group_score, NULL, group_order, G, p->topk_group))
            return 0;
        for (int64_t g = 0; g < G; g++) group_kept[g] = 0;
        for (int64_t i = 0; i < p->topk_group && i < G; i++) group_kept[group_order[i]] = 1;
        for (int64_t e = 0; e < E; e++) kept[e] = group_kept[e / size];
        tier = kept;
    }
    sort_order(key, tier, E, order);
    if (fragile(key, tier, order, E, k)) return 0;
    for (int32_t j = 0; j < k; j++) ids[j] = order[j];

    double sum = 0.0;
    const double scale = p->routed_scaling_factor;
    switch (m) {
    case FP4MOE_ROUTING_SOFTMAX_TOPK:
    case FP4MOE_ROUTING_RENORMALIZE_NAIVE: {
        double mx = key[order[0]], all = 0.0;
        for (int64_t e = 0; e < E; e++) all += exp(key[e] - mx);
        for (int32_t j = 0; j < k; j++) weights[j] = exp(key[ids[j]] - mx) / all;
        if (m == FP4MOE_ROUTING_RENORMALIZE_NAIVE) {
            for (int32_t j = 0; j < k; j++) sum += weights[j];
            for (int32_t j = 0; j < k; j++) weights[j] /= sum;
        }
        break;
    }
    case FP4MOE_ROUTING_RENORMALIZE:
        for (int32_t j = 0; j < k; j++) sum += exp(key[ids[j]] - key[ids[0]]);
        for (int32_t j = 0; j < k; j++) weights[j] = exp(key[ids[j]] - key[ids[0]]) / sum;
        break;
    case FP4MOE_ROUTING_TOPK:
        for (int32_t j = 0; j < k; j++) weights[j] = logits[ids[j]];
        break;
    case FP4MOE_ROUTING_SIGMOID:
    case FP4MOE_ROUTING_TOPK_SIGMOID:
    case FP4MOE_ROUTING_LLAMA4:
        for (int32_t j = 0; j < k; j++) weights[j] = s[ids[j]];
        break;
    case FP4MOE_ROUTING_SIGMOID_RENORM:
        for (int32_t j = 0; j < k; j++) sum += s[ids[j]];
        for (int32_t j = 0; j < k; j++)
            weights[j] = s[ids[j]] / (p->norm_topk_prob ? fmax(sum, 1e-20) : 1.0);
        break;
    case FP4MOE_ROUTING_DEEPSEEK_V3:
        for (int32_t j = 0; j < k; j++) sum += s[ids[j]];
        for (int32_t j = 0; j < k; j++)
            weights[j] = (p->norm_topk_prob ? s[ids[j]] / (sum + 1e-20) : s[ids[j]]) * scale;
        break;
    case FP4MOE_ROUTING_MINIMAX2:
        for (int32_t j = 0; j < k; j++) sum += s[ids[j]];
        for (int32_t j = 0; j < k; j++) weights[j] = s[ids[j]] * scale / (sum + 1e-20);
        break;
    default:
        return 0;
    }
    return 1;
}

static const fp4moe_routing all_methods[] = {
    FP4MOE_ROUTING_SOFTMAX_TOPK,   FP4MOE_ROUTING_RENORMALIZE,       FP4MOE_ROUTING_DEEPSEEK_V3,
    FP4MOE_ROUTING_LLAMA4,         FP4MOE_ROUTING_RENORMALIZE_NAIVE, FP4MOE_ROUTING_TOPK,
    FP4MOE_ROUTING_SIGMOID_RENORM, FP4MOE_ROUTING_MINIMAX2,          FP4MOE_ROUTING_SIGMOID,
    FP4MOE_ROUTING_TOPK_SIGMOID};

static int takes_bias(fp4moe_routing m)
{
    return m == FP4MOE_ROUTING_SOFTMAX_TOPK || m == FP4MOE_ROUTING_RENORMALIZE ||
           m == FP4MOE_ROUTING_RENORMALIZE_NAIVE || m == FP4MOE_ROUTING_DEEPSEEK_V3 ||
           m == FP4MOE_ROUTING_MINIMAX2;
}

/* A random valid configuration of method m with E experts. */
static route_params random_params(testing_rng *rng, fp4moe_routing m, int64_t E)
{
    int64_t max_k = E < MAX_K ? E : MAX_K;
    route_params p = params_of(m, E, (int32_t)testing_int(rng, 1, max_k));
    p.norm_topk_prob = (int32_t)testing_int(rng, 0, 1);
    p.routed_scaling_factor = (float)(0.5 + 2.5 * testing_uniform(rng));
    if (m == FP4MOE_ROUTING_LLAMA4) p.top_k = 1;
    if (m == FP4MOE_ROUTING_DEEPSEEK_V3) {
        int64_t G;
        do G = testing_int(rng, 1, E < 16 ? E : 16);
        while (E % G != 0);
        p.n_group = (int32_t)G;
        int64_t size = E / G;
        int64_t min_groups = (p.top_k + size - 1) / size; /* enough experts for k */
        p.topk_group = (int32_t)testing_int(rng, min_groups, G);
    }
    return p;
}

static void test_random(testing_state *st, testing_rng *rng)
{
    static float logits[MAX_E], bias[MAX_E];
    int checked = 0, skipped = 0, id_fail = 0, weight_fail = 0;
    const int methods = (int)(sizeof all_methods / sizeof all_methods[0]);
    for (int mi = 0; mi < methods; mi++) {
        fp4moe_routing m = all_methods[mi];
        for (int with_bias = 0; with_bias <= takes_bias(m); with_bias++) {
            for (int token = 0; token < 400; token++) {
                /* mostly small E (odd sizes included); every 100th token a large one */
                int64_t E =
                    token % 100 == 99 ? testing_int(rng, 1000, MAX_E) : testing_int(rng, 1, 300);
                route_params p = random_params(rng, m, E);
                double sigma = 0.3 + 2.7 * testing_uniform(rng);
                for (int64_t e = 0; e < E; e++) {
                    logits[e] = (float)(sigma * testing_normal(rng));
                    bias[e] = (float)(0.3 * testing_normal(rng));
                }
                p.bias = with_bias ? bias : NULL;
                int64_t ref_ids[MAX_K];
                double ref_w[MAX_K];
                if (!reference_route(&p, logits, ref_ids, ref_w)) {
                    skipped++;
                    continue;
                }
                int32_t ids[MAX_K];
                float w[MAX_K];
                run(&p, logits, ids, w);
                checked++;
                for (int32_t j = 0; j < p.top_k; j++) {
                    if (ids[j] != ref_ids[j]) {
                        if (id_fail++ < 5)
                            fprintf(stderr,
                                    "method %d bias %d E %lld k %d slot %d: id %d, ref %lld\n", m,
                                    with_bias, (long long)E, p.top_k, j, ids[j],
                                    (long long)ref_ids[j]);
                        break;
                    }
                    if (!(fabs(w[j] - ref_w[j]) <= 1e-6 * fabs(ref_w[j]))) {
                        if (weight_fail++ < 5)
                            fprintf(
                                stderr,
                                "method %d bias %d E %lld k %d slot %d: weight %.9g, ref %.9g\n", m,
                                with_bias, (long long)E, p.top_k, j, w[j], ref_w[j]);
                        break;
                    }
                }
            }
        }
    }
    printf("test_route: random: %d tokens checked, %d skipped as near ties\n", checked, skipped);
    CHECK(st, id_fail == 0, "%d tokens with ids unlike the float64 reference", id_fail);
    CHECK(st, weight_fail == 0, "%d tokens with weights beyond 1e-6 relative", weight_fail);
    CHECK(st, skipped * 20 < checked, "too many near ties skipped: %d of %d", skipped,
          checked + skipped);
}

int main(void)
{
    testing_state st = {0, 0};
    testing_rng rng = testing_rng_from_env("test_route");
    test_softmax_family(&st);
    test_plain_family(&st);
    test_deepseek(&st);
    test_minimax2(&st);
    test_nan(&st);
    test_random(&st, &rng);
    return testing_finish(&st, "test_route");
}
