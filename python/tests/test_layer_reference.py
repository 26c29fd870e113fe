"""The layer through the NumPy front-end against the float64 reference of reference.py, on fresh
random inputs (the seed is printed; FP4MOE_SEED replays one)."""
import math
import os

import numpy as np
import pytest

import fp4moe
import reference as ref

SEED = int(os.environ.get("FP4MOE_SEED", np.random.SeedSequence().entropy % 2**32))
print(f"test_layer_reference seed: {SEED} (FP4MOE_SEED={SEED} replays)")

ROUTINGS = ["softmax_topk", "renormalize", "deepseek_v3", "llama4", "renormalize_naive", "topk",
            "sigmoid_renorm", "minimax2", "sigmoid", "topk_sigmoid"]


def rng_for(name):
    return np.random.default_rng([SEED, sum(map(ord, name))])


def rel_l2(got, want):
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def random_scales(rng, shape):
    # E4M3 codes of moderate magnitude (exponent field 4..9: 2^-3 .. 2^2), never NaN.
    exponent = rng.integers(4, 10, size=shape)
    mantissa = rng.integers(0, 8, size=shape)
    sign = 0  # block scales are positive
    return ((sign << 7) | (exponent << 3) | mantissa).astype(np.uint8)


def make_layer(name, E, k, H, I, *, activation="swiglu", e0=0, e_loc=None, biases=False,
               routing_bias=False, precision="w4a16", swiglu_params=False, half2=False, **kw):
    rng = rng_for(name)
    gated = activation in ("swiglu", "geglu", "geglu_tanh")
    n1 = 2 * I if gated else I
    el = e_loc if e_loc else E - e0
    w = {
        "w1": rng.integers(0, 256, size=(el, n1, H // 2), dtype=np.uint8),
        "w1_scale": random_scales(rng, (el, n1, H // 16)),
        "w1_global_scale": rng.uniform(0.02, 0.05, el).astype(np.float32),
        "w2": rng.integers(0, 256, size=(el, H, I // 2), dtype=np.uint8),
        "w2_scale": random_scales(rng, (el, H, I // 16)),
        "w2_global_scale": rng.uniform(0.02, 0.05, el).astype(np.float32),
    }
    if biases:
        w["b1"] = rng.standard_normal((el, n1)).astype(np.float32)
        w["b2"] = rng.standard_normal((el, H)).astype(np.float32)
    if routing_bias:
        w["routing_bias"] = (0.1 * rng.standard_normal(E)).astype(np.float32)
    if half2:
        w["w1_global_scale_half2"] = rng.uniform(0.02, 0.05, el).astype(np.float32)
    if precision == "w4a4":
        w["a1_global_scale"] = rng.uniform(200.0, 600.0, el).astype(np.float32)
        w["a2_global_scale"] = rng.uniform(20.0, 60.0, el).astype(np.float32)
    params = {}
    if swiglu_params:
        params = dict(alpha=rng.uniform(1.0, 2.0, el).astype(np.float32),
                      beta=rng.uniform(0.5, 1.0, el).astype(np.float32),
                      limit=rng.uniform(3.0, 7.0, el).astype(np.float32))
        w["swiglu_alpha"], w["swiglu_beta"], w["swiglu_limit"] = (
            params["alpha"], params["beta"], params["limit"])
    layer = ref.Layer(E, k, H, I, activation=activation, e0=e0, e_loc=e_loc,
                      precision=precision, **params, **{**kw, **w})
    cfg = fp4moe.Config(num_experts=E, top_k=k, hidden_size=H, intermediate_size=I,
                        activation=activation, gate_up_order=kw.get("order", "gate_up"),
                        routing=kw.get("routing", "renormalize"), n_group=kw.get("n_group", 1),
                        topk_group=kw.get("topk_group", 1), norm_topk_prob=kw.get("norm", True),
                        routed_scaling_factor=kw.get("scale", 1.0), local_expert_offset=e0,
                        local_num_experts=e_loc or 0, precision=precision,
                        apply_router_weight_on_input=kw.get("on_input", False), max_tokens=64)
    return layer, cfg, w, rng


def make_plan(ctx, cfg, w):
    required = ["w1", "w1_scale", "w1_global_scale", "w2", "w2_scale", "w2_global_scale"]
    optional = {n: a for n, a in w.items() if n not in required}
    return fp4moe.create_plan(ctx, cfg, *[w[n] for n in required], **optional)


@pytest.fixture(scope="module")
def ctx():
    with fp4moe.Context("cpu", num_threads=2) as c:
        yield c


CASES = {
    "swiglu": dict(E=8, k=2, H=64, I=32),
    "swiglu up_gate gpt-oss": dict(E=8, k=3, H=48, I=32, order="up_gate", swiglu_params=True,
                                   biases=True),
    "relu2 deepseek_v3": dict(E=8, k=3, H=64, I=48, activation="relu2", routing="deepseek_v3",
                              n_group=2, topk_group=1, scale=2.5, routing_bias=True),
    "geglu softmax_topk EP": dict(E=8, k=3, H=32, I=16, activation="geglu",
                                  routing="softmax_topk", e0=2, e_loc=4),
    "geglu_tanh half2": dict(E=4, k=2, H=32, I=16, activation="geglu_tanh", half2=True),
    "silu sigmoid_renorm": dict(E=6, k=2, H=32, I=32, activation="silu",
                                routing="sigmoid_renorm"),
    "gelu minimax2": dict(E=6, k=2, H=32, I=16, activation="gelu", routing="minimax2",
                          scale=2.0, routing_bias=True),
    "identity topk_sigmoid": dict(E=6, k=2, H=32, I=16, activation="identity",
                                  routing="topk_sigmoid"),
    "swiglu llama4": dict(E=4, k=1, H=32, I=16, routing="llama4", on_input=True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_the_float64_reference(ctx, name):
    layer, cfg, w, rng = make_layer(name, **CASES[name])
    plan = make_plan(ctx, cfg, w)
    T = 7
    x = rng.standard_normal((T, cfg.hidden_size)).astype(np.float32)
    logits = rng.standard_normal((T, cfg.num_experts)).astype(np.float32)
    pts = rng.uniform(0.5, 1.5, T).astype(np.float32)
    out, ids, weights = fp4moe.forward(plan, x, logits, per_token_scale=pts, return_routing=True)
    want, want_ids, want_w = layer.forward(x, logits=logits, per_token_scale=pts)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(weights, want_w, rtol=2e-6, atol=1e-7)
    assert out.dtype == np.float32 and out.shape == (T, cfg.hidden_size)
    assert rel_l2(out, want) < 2e-5, (name, SEED)

    # finalize off: per-(token, slot) expert outputs
    off = fp4moe.forward(plan, x, logits, skip_finalize=True)
    want_off, _, _ = layer.forward(x, logits=logits, finalize=False)
    assert off.shape == (T * cfg.top_k, cfg.hidden_size)
    assert rel_l2(off, want_off) < 2e-5, (name, SEED)


@pytest.mark.parametrize("method", ROUTINGS)
def test_route_matches_the_reference(ctx, method):
    E, k = 16, (1 if method == "llama4" else 4)
    kw = dict(routing=method, scale=1.5)
    if method == "deepseek_v3":
        kw.update(n_group=4, topk_group=2)
    bias = method in ("deepseek_v3", "minimax2", "renormalize", "softmax_topk",
                      "renormalize_naive")
    layer, cfg, w, rng = make_layer("route " + method, E=E, k=k, H=32, I=16, routing_bias=bias,
                                    on_input=method == "llama4", **kw)
    plan = make_plan(ctx, cfg, w)
    logits = rng.standard_normal((9, E)).astype(np.float32)
    ids, weights = fp4moe.route(plan, logits)
    want_ids, want_w = layer.route(logits)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(weights, want_w, rtol=2e-6, atol=1e-7)


def test_forward_routed_with_non_local_experts(ctx):
    layer, cfg, w, rng = make_layer("routed", E=8, k=3, H=32, I=16, e0=4, e_loc=4)
    plan = make_plan(ctx, cfg, w)
    T = 6
    x = rng.standard_normal((T, 32)).astype(np.float32)
    ids = np.stack([rng.permutation(8)[:3] for _ in range(T)]).astype(np.int32)
    weights = rng.uniform(0.1, 1.0, (T, 3)).astype(np.float32)
    out = fp4moe.forward_routed(plan, x, ids, weights)
    want, _, _ = layer.forward(x, ids=ids, weights=weights)
    assert rel_l2(out, want) < 2e-5


def test_w4a4_faithful(ctx):
    layer, cfg, w, rng = make_layer("w4a4", E=4, k=2, H=64, I=32, precision="w4a4")
    plan = make_plan(ctx, cfg, w)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    logits = rng.standard_normal((5, 4)).astype(np.float32)
    out = fp4moe.forward(plan, x, logits)
    want, _, _ = layer.forward(x, logits=logits)
    # A W4A4 near tie flips one E2M1 step of one activation: a few 1e-3 at most.
    assert rel_l2(out, want) < 5e-3, SEED


@pytest.mark.parametrize("act_dtype", ["bf16", "f16"])
def test_16bit_activations(ctx, act_dtype):
    layer, cfg, w, rng = make_layer("16-bit " + act_dtype, E=4, k=2, H=64, I=32)
    plan = make_plan(ctx, cfg, w)
    x32 = rng.standard_normal((5, 64)).astype(np.float32)
    logits = rng.standard_normal((5, 4)).astype(np.float32)
    if act_dtype == "bf16":
        x = fp4moe.to_bf16(x32)
        xv = fp4moe.from_bf16(x)
    else:
        x = x32.astype(np.float16)
        xv = x.astype(np.float32)
    out = fp4moe.forward(plan, x, logits)
    assert out.dtype == x.dtype
    out32 = fp4moe.from_bf16(out) if act_dtype == "bf16" else out.astype(np.float32)
    want, _, _ = layer.forward(xv, logits=logits, act_dtype=act_dtype)
    assert rel_l2(out32, want) < (1e-2 if act_dtype == "bf16" else 2e-3)
    out_f32 = fp4moe.forward(plan, x, logits, output_dtype="f32")
    assert out_f32.dtype == np.float32
    assert rel_l2(out_f32, want) < (8e-3 if act_dtype == "bf16" else 1e-3)


def test_in_place_output(ctx):
    layer, cfg, w, rng = make_layer("in place", E=4, k=2, H=32, I=16)
    plan = make_plan(ctx, cfg, w)
    x = rng.standard_normal((3, 32)).astype(np.float32)
    logits = rng.standard_normal((3, 4)).astype(np.float32)
    want = fp4moe.forward(plan, x, logits)
    buf = x.copy()
    got = fp4moe.forward(plan, buf, logits, out=buf)
    assert got is buf
    np.testing.assert_array_equal(buf, want)
    assert math.isfinite(float(np.abs(want).sum()))
