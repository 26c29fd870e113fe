"""fp4moe against files written and read by the official `safetensors` package.

- A BF16 Qwen3-MoE checkpoint (two shards + index) is quantised by `fp4moe quantize`, the result
  is read back with `safetensors` and checked against ModelOpt's dequantisation formula and
  quantiser, listed by `fp4moe info`, and run by `fp4moe run --checkpoint`, matching the float64
  reference on the dequantised weights.
- A Nemotron-H layout (non-gated ReLU², sigmoid routing with correction bias, scaled) and a
  DeepSeek-V3 NVFP4 checkpoint written directly in the ModelOpt layout (w1/w2/w3 names, groups,
  different gate/up weight_scale_2) run the same way.
- Calibrated input scales and malformed checkpoints.
Seeds are printed; replay with FP4MOE_TEST_SEED."""
import json
import os

import numpy as np
import pytest

import st_helpers as st

SEED = int(os.environ.get("FP4MOE_TEST_SEED", np.random.SeedSequence().entropy % (1 << 32)))
print(f"test_checkpoint_interop: seed {SEED} (replay with FP4MOE_TEST_SEED={SEED})")


@pytest.fixture
def rng(request):
    seed = (SEED + hash(request.node.name)) % (1 << 32)
    print(f"{request.node.name}: seed {seed}")
    return np.random.default_rng(seed)


def bf16_tensor(a):
    return ("BF16", a.shape, st.bf16_encode(a))


def f32_tensor(a):
    a = np.asarray(a, dtype=np.float32)
    return ("F32", a.shape, a)


def random_weight(rng, rows, cols):
    return rng.normal(0, 1 / np.sqrt(cols), (rows, cols)).astype(np.float32)


def qwen_checkpoint(path, rng, experts=8, hidden=64, inter=32, layers=(0, 1)):
    """BF16 Qwen3-MoE: attention projection + norm to copy through, two MoE layers in two shards."""
    path.mkdir()
    cfg = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": hidden,
           "moe_intermediate_size": inter, "num_experts": experts, "num_experts_per_tok": 2,
           "norm_topk_prob": True, "hidden_act": "silu", "num_hidden_layers": len(layers)}
    st.write_json(path / "config.json", cfg)
    floats = {}
    weight_map = {}
    for i in layers:
        shard = f"model-{i + 1:05d}-of-{len(layers):05d}.safetensors"
        tensors = {f"model.layers.{i}.self_attn.q_proj.weight": bf16_tensor(random_weight(rng, hidden, hidden)),
                   f"model.layers.{i}.input_layernorm.weight": bf16_tensor(np.ones(hidden, np.float32) +
                                                                           rng.normal(0, 0.1, hidden))}
        p = f"model.layers.{i}.mlp"
        tensors[f"{p}.gate.weight"] = bf16_tensor(random_weight(rng, experts, hidden))
        for j in range(experts):
            for proj, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                                ("down_proj", (hidden, inter))):
                tensors[f"{p}.experts.{j}.{proj}.weight"] = bf16_tensor(random_weight(rng, *shape))
        for name, v in tensors.items():
            floats[name] = st.bf16_decode(v[2]).reshape(v[1]).astype(np.float64)
            weight_map[name] = shard
        st.save(path / shard, tensors, metadata={"format": "pt"})
    st.write_json(path / "model.safetensors.index.json", {"metadata": {"total_size": 0}, "weight_map": weight_map})
    return cfg, floats


def nearest(table_values, target):
    """Codes of the representable values nearest to target (elementwise), all ties returned as a mask."""
    d = np.abs(table_values[None, :] - target.reshape(-1, 1))
    d = np.where(np.isnan(d), np.inf, d)
    return d <= d.min(axis=1, keepdims=True) * (1 + 1e-12) + 1e-300


def check_modelopt_tensor(out, base, original):
    """The four ModelOpt tensors of one projection against the original float weights."""
    packed = st.as_array(out[base + "weight"])
    scales = st.as_array(out[base + "weight_scale"])
    assert out[base + "weight"][0] == "U8" and out[base + "weight_scale"][0] == "F8_E4M3"
    rows, cols = original.shape
    assert packed.shape == (rows, cols // 2) and scales.shape == (rows, cols // 16)
    assert out[base + "weight_scale_2"][0] == "F32" and out[base + "weight_scale_2"][1] == ()
    ws2 = st.as_array(out[base + "weight_scale_2"])[()]
    amax = np.float32(np.abs(original).max())
    assert ws2 == amax / np.float32(6 * 448), (base, ws2, amax)
    # Block scales: the E4M3 value nearest to block_amax / (6 * weight_scale_2).
    blocks = original.reshape(rows, cols // 16, 16)
    target = (np.abs(blocks).max(axis=2).astype(np.float32) / (np.float32(6) * ws2)).astype(np.float64)
    ok = nearest(np.where(np.arange(256) < 128, st.E4M3, np.nan), target)
    assert ok[np.arange(ok.shape[0]), scales.reshape(-1)].all(), base
    # Values: the E2M1 value nearest to x / (scale * weight_scale_2), in FP32 as ModelOpt does
    # (BF16 inputs land exactly on E2M1 midpoints often enough that float64 would disagree).
    denom = st.E4M3[scales].astype(np.float32) * ws2
    q = (blocks.astype(np.float32) / denom[:, :, None]).astype(np.float64).reshape(-1)
    codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(-1)
    ok = nearest(st.E2M1, np.clip(q, -6, 6))
    assert ok[np.arange(q.size), codes].all(), base
    # And the formula readers use.
    deq = st.dequantize(packed, scales, ws2)
    err = st.rel_l2(deq, original)
    assert err < 0.15, (base, err)
    return deq


def test_quantize_info_run_qwen3(tmp_path, rng):
    src, dst = tmp_path / "bf16", tmp_path / "nvfp4"
    cfg, floats = qwen_checkpoint(src, rng)
    r = st.run_cli("quantize", src, dst)
    assert "rel_l2" in r.stdout and "model.layers.1.mlp.experts.7.down_proj.weight" in r.stdout

    # Read back with the official package: every shard, the index, the configs.
    index = json.load(open(dst / "model.safetensors.index.json"))["weight_map"]
    out = {}
    for shard in sorted(set(index.values())):
        part = st.load(dst / shard)
        assert all(index[name] == shard for name in part)
        out.update(part)
    assert set(out) == set(index)
    quant = json.load(open(dst / "hf_quant_config.json"))["quantization"]
    assert quant["quant_algo"] == "NVFP4" and quant["group_size"] == 16
    assert "model.layers.0.mlp.gate" in quant["exclude_modules"]
    config = json.load(open(dst / "config.json"))
    assert config["quantization_config"]["quant_method"] == "modelopt"
    assert config["num_experts"] == 8
    # Tensors that are not expert weights are copied bit for bit.
    name = "model.layers.1.self_attn.q_proj.weight"
    assert out[name][0] == "BF16" and np.array_equal(st.as_array(out[name]), floats[name])

    deq = {}
    for name, w in floats.items():
        if ".experts." in name:
            base = name[: -len("weight")]
            deq[base] = check_modelopt_tensor(out, base, w)
            assert base + "input_scale" not in out

    r = st.run_cli("info", dst)
    assert "MoE layers: 2" in r.stdout and "problems: 0" in r.stdout, r.stdout
    assert "renormalize_naive" in r.stdout and "NVFP4" in r.stdout and "top-k 2" in r.stdout

    hidden = rng.normal(0, 1, (7, 64)).astype(np.float32)
    st.save(tmp_path / "in.safetensors", {"hidden_states": f32_tensor(hidden)})
    r = st.run_cli("run", "--checkpoint", dst, "--layer", 1, "--tensors", tmp_path / "in.safetensors",
                   "--out", tmp_path / "out.safetensors", "--backend", "cpu")
    res = st.load(tmp_path / "out.safetensors")
    p = "model.layers.1.mlp"
    router = floats[f"{p}.gate.weight"]
    logits = hidden.astype(np.float64) @ router.T
    assert st.rel_l2(st.as_array(res["router_logits"]), logits) < 1e-6
    ids, weights = st.route(st.as_array(res["router_logits"]).astype(np.float64), "renormalize_naive", 2)
    assert np.array_equal(st.as_array(res["topk_ids"]), ids)
    fc1 = [(deq[f"{p}.experts.{e}.gate_proj."], deq[f"{p}.experts.{e}.up_proj."]) for e in range(8)]
    fc2 = [deq[f"{p}.experts.{e}.down_proj."] for e in range(8)]
    ref = st.moe_reference(hidden.astype(np.float64), ids, weights, fc1, fc2, "swiglu")
    err = st.rel_l2(st.as_array(res["output"]).astype(np.float64), ref)
    print(f"qwen3 layer 1: relative L2 error {err:.3e} against the float64 reference")
    assert err < 1e-5


def nemotron_checkpoint(path, rng, experts=8, hidden=48, inter=32):
    path.mkdir()
    cfg = {"model_type": "nemotron_h", "hidden_size": hidden, "moe_intermediate_size": inter,
           "n_routed_experts": experts, "num_experts_per_tok": 3, "n_group": 2, "topk_group": 1,
           "norm_topk_prob": True, "routed_scaling_factor": 2.5, "mlp_hidden_act": "relu2"}
    st.write_json(path / "config.json", cfg)
    p = "backbone.layers.3.mixer"
    tensors = {f"{p}.gate.weight": bf16_tensor(random_weight(rng, experts, hidden)),
               f"{p}.gate.e_score_correction_bias": f32_tensor(rng.normal(0, 0.05, experts))}
    for j in range(experts):
        tensors[f"{p}.experts.{j}.up_proj.weight"] = bf16_tensor(random_weight(rng, inter, hidden))
        tensors[f"{p}.experts.{j}.down_proj.weight"] = bf16_tensor(random_weight(rng, hidden, inter))
    st.save(path / "model.safetensors", tensors)
    floats = {n: st.as_array((v[0], v[1], np.ascontiguousarray(v[2]).tobytes())).astype(np.float64)
              for n, v in tensors.items()}
    return cfg, floats


def test_nemotron_relu2_sigmoid_bias(tmp_path, rng):
    src, dst = tmp_path / "bf16", tmp_path / "nvfp4"
    cfg, floats = nemotron_checkpoint(src, rng)
    r = st.run_cli("quantize", src / "model.safetensors", dst / "model.safetensors", check=False)
    assert r.returncode == 1 and str(dst) in r.stderr  # the output folder does not exist yet
    dst.mkdir()
    st.run_cli("quantize", src / "model.safetensors", dst / "model.safetensors", "--input-scale", "0.01")
    out = st.load(dst / "model.safetensors")
    p = "backbone.layers.3.mixer"
    assert st.as_array(out[f"{p}.experts.0.up_proj.input_scale"])[()] == np.float32(0.01)
    assert json.load(open(dst / "config.json"))["mlp_hidden_act"] == "relu2"
    r = st.run_cli("info", dst)
    assert "deepseek_v3 (n_group 2, topk_group 1" in r.stdout and "routed_scaling_factor 2.5" in r.stdout
    assert "relu2" in r.stdout and "up_down_proj" in r.stdout and "W4A4 possible" in r.stdout

    hidden = rng.normal(0, 1, (5, 48)).astype(np.float32)
    st.save(tmp_path / "in.safetensors", {"hidden_states": bf16_tensor(hidden)})
    st.run_cli("run", "--checkpoint", dst, "--layer", 3, "--tensors", tmp_path / "in.safetensors",
               "--out", tmp_path / "out.safetensors", "--backend", "cpu")
    res = st.load(tmp_path / "out.safetensors")
    x = st.bf16_decode(st.bf16_encode(hidden)).astype(np.float64)
    logits = st.as_array(res["router_logits"]).astype(np.float64)
    assert st.rel_l2(logits, x @ floats[f"{p}.gate.weight"].T) < 1e-6
    bias = floats[f"{p}.gate.e_score_correction_bias"].astype(np.float32).astype(np.float64)
    ids, weights = st.route(logits, "deepseek_v3", 3, bias=bias, n_group=2, topk_group=1, scale=2.5)
    assert np.array_equal(st.as_array(res["topk_ids"]), ids)
    assert st.rel_l2(st.as_array(res["topk_weights"]).astype(np.float64), weights) < 1e-6
    deq = lambda b: st.dequantize(st.as_array(out[b + "weight"]), st.as_array(out[b + "weight_scale"]),
                                  st.as_array(out[b + "weight_scale_2"])[()])
    fc1 = [deq(f"{p}.experts.{e}.up_proj.") for e in range(8)]
    fc2 = [deq(f"{p}.experts.{e}.down_proj.") for e in range(8)]
    ref = st.moe_reference(x, ids, weights, fc1, fc2, "relu2", bf16_fc2_input=True)
    err = st.rel_l2(st.as_array(res["output"]).astype(np.float64), ref)
    print(f"nemotron layer 3: relative L2 error {err:.3e}")
    # A BF16 rounding of FC2's input may land on the other side of a tie (FP32 vs float64 sums).
    assert err < 1e-4


def random_modelopt(rng, rows, cols):
    packed = rng.integers(0, 256, (rows, cols // 2), dtype=np.uint8)
    scales = rng.integers(0x20, 0x58, (rows, cols // 16), dtype=np.uint8)  # e4m3 2^-3 .. 2^3
    ws2 = np.float32(rng.uniform(0.5, 2.0) / 448)
    return packed, scales, ws2


def test_deepseek_modelopt_written_by_python(tmp_path, rng):
    """NVFP4 tensors made here, in ModelOpt's layout with w1/w2/w3 names, split gate/up scales."""
    ckpt = tmp_path / "ds"
    ckpt.mkdir()
    experts, hidden, inter = 8, 64, 48
    st.write_json(ckpt / "config.json", {
        "model_type": "deepseek_v3", "hidden_size": hidden, "moe_intermediate_size": inter,
        "n_routed_experts": experts, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid",
        "topk_method": "noaux_tc", "hidden_act": "silu"})
    st.write_json(ckpt / "hf_quant_config.json", {"producer": {"name": "modelopt"}, "quantization": {
        "quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head", "model.layers.*.mlp.gate"]}})
    p = "model.layers.5.mlp"
    tensors = {f"{p}.gate.weight": f32_tensor(random_weight(rng, experts, hidden)),
               f"{p}.gate.e_score_correction_bias": f32_tensor(rng.normal(0, 0.05, experts))}
    deq = {}
    for j in range(experts):
        for proj, (rows, cols) in (("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter))):
            packed, scales, ws2 = random_modelopt(rng, rows, cols)
            base = f"{p}.experts.{j}.{proj}."
            tensors[base + "weight"] = ("U8", packed.shape, packed)
            tensors[base + "weight_scale"] = ("F8_E4M3", scales.shape, scales)
            tensors[base + "weight_scale_2"] = ("F32", (), np.array(ws2, dtype=np.float32))
            tensors[base + "input_scale"] = ("F32", (), np.array(0.02, dtype=np.float32))
            deq[(j, proj)] = st.dequantize(packed, scales, ws2)
    st.save(ckpt / "model.safetensors", tensors)
    r = st.run_cli("info", ckpt)
    assert "w1_w3_w2" in r.stdout and "gate/up weight_scale_2 differ" in r.stdout, r.stdout
    assert "exclude_modules: 2" in r.stdout

    hidden_states = rng.normal(0, 1, (6, hidden)).astype(np.float32)
    st.save(tmp_path / "in.safetensors", {"hidden_states": f32_tensor(hidden_states)})
    st.run_cli("run", "--checkpoint", ckpt, "--layer", 5, "--tensors", tmp_path / "in.safetensors",
               "--out", tmp_path / "out.safetensors", "--backend", "cpu")
    res = st.load(tmp_path / "out.safetensors")
    logits = st.as_array(res["router_logits"]).astype(np.float64)
    x = hidden_states.astype(np.float64)
    assert st.rel_l2(logits, x @ st.as_array(tensors[f"{p}.gate.weight"]).astype(np.float64).T) < 1e-6
    bias = st.as_array(tensors[f"{p}.gate.e_score_correction_bias"]).astype(np.float64)
    ids, weights = st.route(logits, "deepseek_v3", 2, bias=bias, n_group=4, topk_group=2, scale=2.5)
    assert np.array_equal(st.as_array(res["topk_ids"]), ids)
    fc1 = [(deq[(e, "w1")], deq[(e, "w3")]) for e in range(experts)]
    fc2 = [deq[(e, "w2")] for e in range(experts)]
    ref = st.moe_reference(x, ids, weights, fc1, fc2, "swiglu")
    err = st.rel_l2(st.as_array(res["output"]).astype(np.float64), ref)
    print(f"deepseek layer 5: relative L2 error {err:.3e}")
    assert err < 1e-5


def test_calibration_measures_input_scales(tmp_path, rng):
    src, dst = tmp_path / "bf16", tmp_path / "nvfp4"
    cfg, floats = qwen_checkpoint(src, rng, layers=(0,))
    samples = rng.normal(0, 2, (9, 64)).astype(np.float32)
    st.save(tmp_path / "calib.safetensors", {"hidden_states": f32_tensor(samples)})
    st.run_cli("quantize", src, dst, "--calibration", tmp_path / "calib.safetensors", "--quiet")
    out = {}
    for shard in set(json.load(open(dst / "model.safetensors.index.json"))["weight_map"].values()):
        out.update(st.load(dst / shard))
    x = samples.astype(np.float64)
    p = "model.layers.0.mlp"
    for j in range(8):
        fc1_scale = st.as_array(out[f"{p}.experts.{j}.gate_proj.input_scale"])[()]
        assert abs(fc1_scale - np.abs(x).max() / 2688) <= 1e-6 * fc1_scale
        g = x @ floats[f"{p}.experts.{j}.gate_proj.weight"].T
        u = x @ floats[f"{p}.experts.{j}.up_proj.weight"].T
        want = np.abs(st.silu(g) * u).max() / 2688
        got = st.as_array(out[f"{p}.experts.{j}.down_proj.input_scale"])[()]
        assert abs(got - want) <= 1e-5 * want, (j, got, want)
    assert "input_scale: yes" in st.run_cli("info", dst).stdout


def test_malformed_checkpoints_are_named(tmp_path, rng):
    ckpt = tmp_path / "bad"
    ckpt.mkdir()
    st.write_json(ckpt / "config.json", {"model_type": "qwen3_moe", "num_experts": 2, "num_experts_per_tok": 1})
    p = "model.layers.0.mlp"
    tensors = {}
    for j in range(2):
        for proj, (rows, cols) in (("gate_proj", (32, 64)), ("up_proj", (32, 64)), ("down_proj", (64, 32))):
            packed, scales, ws2 = random_modelopt(rng, rows, cols)
            if j == 1 and proj == "up_proj":
                scales = scales[:, :2]  # wrong shape
            tensors[f"{p}.experts.{j}.{proj}.weight"] = ("U8", packed.shape, packed)
            tensors[f"{p}.experts.{j}.{proj}.weight_scale"] = ("F8_E4M3", scales.shape, scales)
            if not (j == 0 and proj == "down_proj"):  # missing
                tensors[f"{p}.experts.{j}.{proj}.weight_scale_2"] = ("F32", (), np.array(ws2))
    st.save(ckpt / "model.safetensors", tensors)
    r = st.run_cli("info", ckpt, check=False)
    assert r.returncode == 1
    assert f"{p}.experts.1.up_proj.weight_scale': expected shape [32,4] F8_E4M3, got [32,2] F8_E4M3" in r.stdout
    assert f"{p}.experts.0.down_proj.weight_scale_2' is missing" in r.stdout
    st.save(tmp_path / "in.safetensors", {"hidden_states": f32_tensor(rng.normal(0, 1, (2, 64)))})
    r = st.run_cli("run", "--checkpoint", ckpt, "--layer", 0, "--tensors", tmp_path / "in.safetensors",
                   "--out", tmp_path / "o.safetensors", check=False)
    assert r.returncode == 1 and "problem" in r.stderr
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":1}")
    r = st.run_cli("info", ckpt, check=False)
    assert r.returncode == 1 and "model.safetensors" in r.stderr
