/* Layer configuration JSON: every key, random round trips, the enum name helpers, and errors that
 * name the key. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/layer_json.h"
#include "testing.h"

static testing_state state;

static int configs_equal(const fp4moe_config *a, const fp4moe_config *b)
{
    return a->num_experts == b->num_experts && a->top_k == b->top_k &&
           a->hidden_size == b->hidden_size && a->intermediate_size == b->intermediate_size &&
           a->activation == b->activation && a->swiglu_alpha == b->swiglu_alpha &&
           a->swiglu_beta == b->swiglu_beta && a->swiglu_limit == b->swiglu_limit &&
           a->gate_up_order == b->gate_up_order && a->routing == b->routing &&
           a->n_group == b->n_group && a->topk_group == b->topk_group &&
           a->norm_topk_prob == b->norm_topk_prob &&
           a->routed_scaling_factor == b->routed_scaling_factor &&
           a->apply_router_weight_on_input == b->apply_router_weight_on_input &&
           a->local_expert_offset == b->local_expert_offset &&
           a->local_num_experts == b->local_num_experts && a->precision == b->precision &&
           a->fc2_input_fp8 == b->fc2_input_fp8 && a->decode_threshold == b->decode_threshold &&
           a->max_tokens == b->max_tokens;
}

static int parse(const char *text, fp4moe_config *cfg, char *err, size_t err_bytes)
{
    return layer_config_from_json(text, strlen(text), cfg, err, err_bytes);
}

static void test_all_keys(void)
{
    const char *text =
        "{\"num_experts\": 256, \"top_k\": 8, \"hidden_size\": 7168, \"intermediate_size\": 2048,"
        " \"activation\": \"geglu_tanh\", \"routing\": \"deepseek_v3\", \"n_group\": 8,"
        " \"topk_group\": 4, \"norm_topk_prob\": false, \"routed_scaling_factor\": 2.5,"
        " \"swiglu_alpha\": 1.702, \"swiglu_beta\": 1.0, \"swiglu_limit\": 7.0,"
        " \"local_expert_offset\": 64, \"local_num_experts\": 32, \"precision\": \"w4a4\","
        " \"gate_up_order\": \"up_gate\", \"fc2_input_fp8\": true,"
        " \"apply_router_weight_on_input\": true, \"decode_threshold\": 32, \"max_tokens\": 4096}";
    fp4moe_config cfg;
    char err[256] = "";
    CHECK(&state, parse(text, &cfg, err, sizeof err) == 0, "all keys: %s", err);
    CHECK(&state, cfg.num_experts == 256 && cfg.top_k == 8 && cfg.hidden_size == 7168 &&
                      cfg.intermediate_size == 2048, "sizes");
    CHECK(&state, cfg.activation == FP4MOE_ACT_GEGLU_TANH, "activation %d", (int)cfg.activation);
    CHECK(&state, cfg.routing == FP4MOE_ROUTING_DEEPSEEK_V3, "routing");
    CHECK(&state, cfg.n_group == 8 && cfg.topk_group == 4 && cfg.norm_topk_prob == 0, "groups");
    CHECK(&state, cfg.routed_scaling_factor == 2.5f, "scaling");
    CHECK(&state, cfg.swiglu_alpha == 1.702f && cfg.swiglu_beta == 1.0f && cfg.swiglu_limit == 7.0f,
          "swiglu");
    CHECK(&state, cfg.local_expert_offset == 64 && cfg.local_num_experts == 32, "local");
    CHECK(&state, cfg.precision == FP4MOE_PRECISION_W4A4, "precision");
    CHECK(&state, cfg.gate_up_order == FP4MOE_UP_GATE, "order");
    CHECK(&state, cfg.fc2_input_fp8 == 1 && cfg.apply_router_weight_on_input == 1, "bools");
    CHECK(&state, cfg.decode_threshold == 32 && cfg.max_tokens == 4096, "limits");

    /* Absent keys keep the defaults; null limit is +inf. */
    fp4moe_config defaults;
    fp4moe_config_init(&defaults);
    CHECK(&state, parse("{}", &cfg, err, sizeof err) == 0 && configs_equal(&cfg, &defaults),
          "empty object: %s", err);
    CHECK(&state, parse(" {\"swiglu_limit\": null}\n", &cfg, err, sizeof err) == 0 &&
                      isinf(cfg.swiglu_limit) && cfg.swiglu_limit > 0, "null limit: %s", err);
    /* Not NUL-terminated: only len bytes are read. */
    const char unterminated[] = {'{', '"', 't', 'o', 'p', '_', 'k', '"', ':', '3', '}', 'x'};
    CHECK(&state, layer_config_from_json(unterminated, 11, &cfg, err, sizeof err) == 0 &&
                      cfg.top_k == 3, "length-bounded: %s", err);
}

static void test_names(void)
{
    for (int v = 0; v <= 6; v++) {
        fp4moe_activation a;
        const char *name = activation_name((fp4moe_activation)v);
        CHECK(&state, name != NULL && activation_from_name(name, &a) == 0 && (int)a == v,
              "activation %d", v);
    }
    for (int v = 0; v <= 9; v++) {
        fp4moe_routing r;
        const char *name = routing_name((fp4moe_routing)v);
        CHECK(&state, name != NULL && routing_from_name(name, &r) == 0 && (int)r == v, "routing %d", v);
    }
    for (int v = 0; v <= 1; v++) {
        fp4moe_precision p;
        fp4moe_gate_up_order o;
        CHECK(&state, precision_from_name(precision_name((fp4moe_precision)v), &p) == 0 && (int)p == v,
              "precision %d", v);
        CHECK(&state, gate_up_order_from_name(gate_up_order_name((fp4moe_gate_up_order)v), &o) == 0 &&
                          (int)o == v, "order %d", v);
    }
    fp4moe_activation a = FP4MOE_ACT_RELU2;
    CHECK(&state, activation_from_name("SwiGLU", &a) != 0 && a == FP4MOE_ACT_RELU2, "case-sensitive");
    CHECK(&state, activation_from_name(NULL, &a) != 0, "NULL name");
    CHECK(&state, activation_name((fp4moe_activation)7) == NULL, "activation 7");
    CHECK(&state, routing_name((fp4moe_routing)-1) == NULL, "routing -1");
    CHECK(&state, precision_name((fp4moe_precision)2) == NULL, "precision 2");
    fp4moe_routing r;
    CHECK(&state, routing_from_name("renormalize_naive", &r) == 0 &&
                      r == FP4MOE_ROUTING_RENORMALIZE_NAIVE, "renormalize_naive");
}

static float random_float(testing_rng *rng)
{
    /* Values with full mantissas, so that printing must be exact to round-trip. */
    return (float)(testing_normal(rng) * pow(10.0, (double)testing_int(rng, -30, 30)));
}

static void test_round_trip(testing_rng *rng)
{
    for (int trial = 0; trial < 200; trial++) {
        fp4moe_config cfg;
        fp4moe_config_init(&cfg);
        cfg.num_experts = testing_int(rng, 1, (int64_t)1 << 40);
        cfg.top_k = (int32_t)testing_int(rng, -5, 32);
        cfg.hidden_size = testing_int(rng, -((int64_t)1 << 53), (int64_t)1 << 53);
        cfg.intermediate_size = 16 * testing_int(rng, 1, 1000);
        cfg.activation = (fp4moe_activation)testing_int(rng, 0, 6);
        cfg.routing = (fp4moe_routing)testing_int(rng, 0, 9);
        cfg.precision = (fp4moe_precision)testing_int(rng, 0, 1);
        cfg.gate_up_order = (fp4moe_gate_up_order)testing_int(rng, 0, 1);
        cfg.n_group = (int32_t)testing_int(rng, INT32_MIN, INT32_MAX);
        cfg.topk_group = (int32_t)testing_int(rng, 1, 8);
        cfg.norm_topk_prob = (int32_t)testing_int(rng, 0, 1);
        cfg.apply_router_weight_on_input = (int32_t)testing_int(rng, 0, 1);
        cfg.fc2_input_fp8 = (int32_t)testing_int(rng, 0, 1);
        cfg.routed_scaling_factor = random_float(rng);
        cfg.swiglu_alpha = random_float(rng);
        cfg.swiglu_beta = random_float(rng);
        cfg.swiglu_limit = trial % 3 == 0 ? INFINITY : random_float(rng);
        if (trial == 1) cfg.swiglu_alpha = 1.17549435e-38f; /* smallest normal */
        if (trial == 2) cfg.swiglu_beta = 1e-45f;            /* a denormal */
        if (trial == 3) cfg.routed_scaling_factor = 3.40282347e38f;
        cfg.local_expert_offset = testing_int(rng, 0, 1000);
        cfg.local_num_experts = testing_int(rng, 0, 1000);
        cfg.decode_threshold = testing_int(rng, -1, 1000); /* -1: auto */
        cfg.max_tokens = testing_int(rng, 1, 1 << 20);
        char *text = layer_config_to_json(&cfg);
        CHECK(&state, text != NULL, "to_json trial %d", trial);
        if (text == NULL) continue;
        fp4moe_config back;
        char err[256] = "";
        int rc = parse(text, &back, err, sizeof err);
        CHECK(&state, rc == 0 && configs_equal(&cfg, &back), "round trip %d: %s\n%s", trial, err, text);
        free(text);
    }
    fp4moe_config bad;
    fp4moe_config_init(&bad);
    bad.activation = (fp4moe_activation)42;
    CHECK(&state, layer_config_to_json(&bad) == NULL, "invalid enum written");
    fp4moe_config_init(&bad);
    bad.swiglu_alpha = NAN;
    CHECK(&state, layer_config_to_json(&bad) == NULL, "NaN written");
    fp4moe_config_init(&bad);
    bad.swiglu_limit = -INFINITY;
    CHECK(&state, layer_config_to_json(&bad) == NULL, "-inf limit written");
}

static void expect_error(const char *text, const char *want)
{
    fp4moe_config cfg;
    char err[256] = "";
    int rc = parse(text, &cfg, err, sizeof err);
    CHECK(&state, rc != 0, "accepted: %s", text);
    CHECK(&state, strstr(err, want) != NULL, "for %s: message '%s' lacks '%s'", text, err, want);
}

static void test_errors(void)
{
    expect_error("", "empty");
    expect_error("{\"top_k\": 2", "not valid JSON");
    expect_error("[1]", "not an object");
    expect_error("{} {}", "after the JSON");
    expect_error("{\"num_expert\": 8}", "config key 'num_expert': unknown key");
    expect_error("{\"top_k\": 2, \"top_k\": 3}", "config key 'top_k': given twice");
    expect_error("{\"top_k\": \"2\"}", "config key 'top_k': expected an integer");
    expect_error("{\"top_k\": 2.5}", "config key 'top_k': 2.5 is not an integer");
    expect_error("{\"top_k\": 3000000000}", "config key 'top_k'");
    expect_error("{\"num_experts\": 1e20}", "config key 'num_experts'");
    expect_error("{\"max_tokens\": true}", "config key 'max_tokens': expected an integer");
    expect_error("{\"swiglu_alpha\": null}", "config key 'swiglu_alpha': expected a number");
    expect_error("{\"swiglu_limit\": \"inf\"}", "config key 'swiglu_limit': expected a number or null");
    expect_error("{\"routed_scaling_factor\": 1e39}", "config key 'routed_scaling_factor': 1e+39 is outside");
    expect_error("{\"norm_topk_prob\": 1}", "config key 'norm_topk_prob': expected true or false");
    expect_error("{\"fc2_input_fp8\": \"true\"}", "config key 'fc2_input_fp8': expected true or false");
    expect_error("{\"activation\": \"swish\"}", "config key 'activation': unknown value 'swish'");
    expect_error("{\"activation\": 0}", "config key 'activation': expected a string");
    expect_error("{\"routing\": \"DeepSeek\"}", "config key 'routing': unknown value 'DeepSeek'");
    expect_error("{\"precision\": \"w8a8\"}", "config key 'precision': unknown value 'w8a8'");
    expect_error("{\"gate_up_order\": [\"gate\"]}", "config key 'gate_up_order': expected a string");
    fp4moe_config cfg;
    char *huge = malloc(LAYER_JSON_MAX_BYTES + 2);
    if (huge == NULL) abort();
    memset(huge, ' ', LAYER_JSON_MAX_BYTES + 1);
    huge[0] = '{';
    huge[LAYER_JSON_MAX_BYTES] = '}';
    huge[LAYER_JSON_MAX_BYTES + 1] = '\0';
    expect_error(huge, "exceeds the limit");
    free(huge);
    CHECK(&state, layer_config_from_json(NULL, 0, &cfg, NULL, 0) != 0, "NULL text, NULL err");
    CHECK(&state, layer_config_from_json("{}", 2, NULL, NULL, 0) != 0, "NULL cfg");
}

int main(void)
{
    testing_rng rng = testing_rng_from_env("test_layer_json");
    test_all_keys();
    test_names();
    test_round_trip(&rng);
    test_errors();
    return testing_finish(&state, "test_layer_json");
}
