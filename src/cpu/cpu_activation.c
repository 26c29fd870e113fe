/* Activations in FP32 (spec section 5), one FC1 output row at a time. */
#include <math.h>

#include "cpu_experts.h"

static float sigmoid(float z)
{
    return 1.0f / (1.0f + expf(-z));
}
static float gelu_erf(float x)
{
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
}
static float gelu_tanh(float x)
{
    return 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
}

/* Comparisons rather than fminf/fmaxf so that a NaN input stays NaN. */
static float swiglu(float gate, float up, float alpha, float beta, float limit)
{
    float g = gate > limit ? limit : gate;
    float u = up > limit ? limit : (up < -limit ? -limit : up);
    return g * sigmoid(alpha * g) * (u + beta);
}

void cpu_activation_row(const fp4moe_plan *plan, int64_t expert, const float *h, float *u)
{
    const int64_t inter = plan->cfg.intermediate_size;
    const fp4moe_activation act = plan->cfg.activation;
    if (plan->gated) {
        const int gate_first = plan->cfg.gate_up_order == FP4MOE_GATE_UP;
        const float *gate = gate_first ? h : h + inter;
        const float *up = gate_first ? h + inter : h;
        if (act == FP4MOE_ACT_SWIGLU) {
            const float alpha = plan->w.swiglu_alpha[expert], beta = plan->w.swiglu_beta[expert];
            const float limit = plan->w.swiglu_limit[expert];
            for (int64_t i = 0; i < inter; i++)
                u[i] = swiglu(gate[i], up[i], alpha, beta, limit);
        } else if (act == FP4MOE_ACT_GEGLU) {
            for (int64_t i = 0; i < inter; i++)
                u[i] = gelu_erf(gate[i]) * up[i];
        } else {
            for (int64_t i = 0; i < inter; i++)
                u[i] = gelu_tanh(gate[i]) * up[i];
        }
        return;
    }
    for (int64_t i = 0; i < inter; i++) {
        const float x = h[i];
        switch (act) {
        case FP4MOE_ACT_RELU2:
            u[i] = x > 0.0f ? x * x : (x != x ? x : 0.0f);
            break;
        case FP4MOE_ACT_SILU:
            u[i] = x * sigmoid(x);
            break;
        case FP4MOE_ACT_GELU:
            u[i] = gelu_erf(x);
            break;
        default:
            u[i] = x;
            break;
        }
    }
}
