"""Every bound C function through the package, and failures as Python exceptions carrying the
library's message."""
import ctypes
import math
import os

import numpy as np
import pytest

import fp4moe
from fp4moe import _lib, formats

SEED = int(os.environ.get("FP4MOE_SEED", np.random.SeedSequence().entropy % 2**32))
print(f"test_bindings seed: {SEED}")


@pytest.fixture(scope="module")
def ctx():
    with fp4moe.Context("cpu", num_threads=2) as c:
        yield c


@pytest.fixture
def rng(request):
    return np.random.default_rng([SEED, sum(map(ord, request.node.name))])


def small_plan(ctx, rng, **cfg_kw):
    cfg = fp4moe.Config(num_experts=4, top_k=2, hidden_size=32, intermediate_size=16,
                        max_tokens=32, **cfg_kw)
    n1 = cfg.fc1_rows
    w1, s1, g1 = fp4moe.quantize_experts(rng.standard_normal((4, n1, 32)).astype(np.float32))
    w2, s2, g2 = fp4moe.quantize_experts(rng.standard_normal((4, 32, 16)).astype(np.float32))
    return fp4moe.create_plan(ctx, cfg, w1, s1, g1, w2, s2, g2), cfg


def test_every_prototype_is_bound():
    lib = _lib.lib()
    for name in _lib.PROTOTYPES:
        assert callable(getattr(lib, name)), name


def test_version_and_status_strings():
    assert fp4moe.version() == (0, 1, 0)
    assert fp4moe.status_string(fp4moe.Status.SUCCESS) == "success"
    for s in fp4moe.Status:
        assert fp4moe.status_string(s)
    assert fp4moe.status_string(1234) == "unknown status"


def test_context(ctx):
    assert ctx.backend == fp4moe.Backend.CPU
    assert "cpu" in ctx.description and "2 threads" in ctx.description
    assert ctx.last_error == ""
    ctx.synchronize()
    auto = fp4moe.Context()
    assert auto.backend in (fp4moe.Backend.CPU, fp4moe.Backend.CUDA)
    auto.close()
    with pytest.raises(ValueError):
        auto.handle
    with pytest.raises(fp4moe.InvalidArgumentError):
        fp4moe.Context("cpu", num_threads=-1)
    with pytest.raises(ValueError, match="unknown name"):
        fp4moe.Context("tpu")


def test_buffers(ctx):
    data = np.arange(100, dtype=np.uint8)
    buf = ctx.buffer_alloc(100)
    assert buf % 256 == 0
    ctx.buffer_upload(buf, data.ctypes.data, 100)
    back = np.zeros(100, np.uint8)
    ctx.buffer_download(back.ctypes.data, buf, 100)
    np.testing.assert_array_equal(back, data)
    ctx.buffer_free(buf)
    ctx.buffer_free(None)
    with pytest.raises(fp4moe.InvalidArgumentError, match="fp4moe_buffer_upload"):
        ctx.buffer_upload(None, data.ctypes.data, 100)


def test_config(ctx):
    cfg = fp4moe.Config(num_experts=8, top_k=2, hidden_size=64, intermediate_size=32)
    assert cfg.fc1_rows == 64 and cfg.is_gated
    assert fp4moe.Config(8, 2, 64, 32, activation="relu2").fc1_rows == 32
    cfg.validate(ctx)
    back = fp4moe.Config.from_struct(cfg.to_struct())
    assert back == cfg
    bad = fp4moe.Config(num_experts=8, top_k=9, hidden_size=64, intermediate_size=32)
    with pytest.raises(fp4moe.InvalidArgumentError, match="top_k") as e:
        bad.validate(ctx)
    assert e.value.status == fp4moe.Status.INVALID_ARGUMENT
    assert "top_k" in ctx.last_error and e.value.message == ctx.last_error
    with pytest.raises(ValueError):
        fp4moe.Config(8, 2, 64, 32, routing="nonsense")


def test_plan_attributes_workspace_and_serialisation(ctx, rng, tmp_path):
    plan, cfg = small_plan(ctx, rng, routing="deepseek_v3", n_group=2, topk_group=1,
                           routed_scaling_factor=2.5)
    assert plan.config.routing == fp4moe.Routing.DEEPSEEK_V3
    assert plan.config.routed_scaling_factor == 2.5 and plan.config.max_tokens == 32
    assert plan.config.num_local_experts == 4
    assert "deepseek_v3" in repr(plan)
    ws = plan.workspace_size(8)
    assert ws > 0 and plan.workspace_size() >= ws
    with pytest.raises(fp4moe.InvalidArgumentError):
        plan.workspace_size(33)
    x = rng.standard_normal((3, 32)).astype(np.float32)
    logits = rng.standard_normal((3, 4)).astype(np.float32)
    out = fp4moe.forward(plan, x, logits)
    data = plan.serialize()
    clone = fp4moe.Plan.deserialize(ctx, data)
    np.testing.assert_array_equal(fp4moe.forward(clone, x, logits), out)
    path = tmp_path / "layer.fp4moe"
    plan.save(path)
    loaded = fp4moe.load_plan(ctx, path)
    assert loaded.config == plan.config
    np.testing.assert_array_equal(fp4moe.forward(loaded, x, logits), out)
    corrupt = bytearray(data)
    corrupt[len(corrupt) // 2] ^= 0xFF
    with pytest.raises(fp4moe.CorruptDataError, match="fp4moe_plan_deserialize"):
        fp4moe.Plan.deserialize(ctx, bytes(corrupt))
    with pytest.raises(fp4moe.Fp4moeError):
        fp4moe.Plan.deserialize(ctx, b"")
    loaded.close()
    with pytest.raises(ValueError, match="closed"):
        fp4moe.forward(loaded, x, logits)


def test_forward_argument_errors(ctx, rng):
    plan, cfg = small_plan(ctx, rng)
    x = rng.standard_normal((3, 32)).astype(np.float32)
    logits = rng.standard_normal((3, 4)).astype(np.float32)
    with pytest.raises(fp4moe.InvalidArgumentError, match=r"hidden_states has shape \(3, 16\)"):
        fp4moe.forward(plan, x[:, :16], logits)
    with pytest.raises(fp4moe.InvalidArgumentError, match="router_logits has shape"):
        fp4moe.forward(plan, x, logits[:2])
    with pytest.raises(fp4moe.InvalidArgumentError, match="dtype float64"):
        fp4moe.forward(plan, x.astype(np.float64), logits)
    with pytest.raises(fp4moe.InvalidArgumentError, match="max_tokens"):
        fp4moe.forward(plan, np.zeros((40, 32), np.float32) + 1, np.ones((40, 4), np.float32))
    with pytest.raises(fp4moe.InvalidArgumentError, match="out has shape"):
        fp4moe.forward(plan, x, logits, out=np.empty((2, 32), np.float32))
    with pytest.raises(fp4moe.InvalidArgumentError, match="out must be contiguous"):
        fp4moe.forward(plan, x, logits, out=np.empty((3, 64), np.float32)[:, ::2])
    with pytest.raises(ValueError, match="router_logits, or topk_ids"):
        fp4moe.forward(plan, x)
    ids = np.array([[0, 1], [2, 9], [3, 0]], np.int32)  # 9 is not an expert id
    with pytest.raises(fp4moe.InvalidArgumentError, match="topk_ids") as e:
        fp4moe.forward_routed(plan, x, ids, np.ones((3, 2), np.float32))
    assert e.value.message, "the library's message is carried"
    with pytest.raises(fp4moe.InvalidArgumentError, match="per_token_scale has shape"):
        fp4moe.forward(plan, x, logits, per_token_scale=np.ones(2, np.float32))


def test_plan_create_errors(ctx, rng):
    cfg = fp4moe.Config(num_experts=4, top_k=2, hidden_size=32, intermediate_size=16)
    w1, s1, g1 = fp4moe.quantize_experts(rng.standard_normal((4, 32, 32)).astype(np.float32))
    w2, s2, g2 = fp4moe.quantize_experts(rng.standard_normal((4, 32, 16)).astype(np.float32))
    with pytest.raises(fp4moe.InvalidArgumentError, match=r"w1 has shape"):
        fp4moe.create_plan(ctx, cfg, w1[:3], s1, g1, w2, s2, g2)
    with pytest.raises(fp4moe.InvalidArgumentError, match=r"w1_global_scale has shape"):
        fp4moe.create_plan(ctx, cfg, w1, s1, g1[:2], w2, s2, g2)
    with pytest.raises(fp4moe.InvalidArgumentError, match="fp4moe_plan_create"):
        fp4moe.create_plan(ctx, cfg, w1, s1, -g1, w2, s2, g2)  # scales must be positive
    with pytest.raises(fp4moe.InvalidArgumentError, match="routing_bias"):
        fp4moe.create_plan(ctx, cfg, w1, s1, g1, w2, s2, g2,
                           routing_bias=np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="unknown weight"):
        fp4moe.create_plan(ctx, cfg, w1, s1, g1, w2, s2, g2, bogus=np.zeros(4))
    bad_cfg = fp4moe.Config(num_experts=4, top_k=2, hidden_size=30, intermediate_size=16)
    with pytest.raises(fp4moe.InvalidArgumentError, match="hidden_size"):
        fp4moe.create_plan(ctx, bad_cfg, w1, s1, g1, w2, s2, g2)


def test_swizzled_weight_scales_give_the_same_plan(ctx, rng):
    cfg = fp4moe.Config(num_experts=2, top_k=1, hidden_size=64, intermediate_size=32)
    w1, s1, g1 = fp4moe.quantize_experts(rng.standard_normal((2, 64, 64)).astype(np.float32))
    w2, s2, g2 = fp4moe.quantize_experts(rng.standard_normal((2, 64, 32)).astype(np.float32))
    _, s1z, _ = fp4moe.quantize_experts(rng.standard_normal((2, 64, 64)).astype(np.float32),
                                        layout="swizzled")
    s1z = np.stack([formats.convert_scales(s1[e], 64, 64, "linear", "swizzled")
                    for e in range(2)])
    s2z = np.stack([formats.convert_scales(s2[e], 64, 32, "linear", "swizzled")
                    for e in range(2)])
    a = fp4moe.create_plan(ctx, cfg, w1, s1, g1, w2, s2, g2)
    b = fp4moe.create_plan(ctx, cfg, w1, s1z, g1, w2, s2z, g2, w1_scale_layout="swizzled",
                           w2_scale_layout="swizzled")
    x = rng.standard_normal((2, 64)).astype(np.float32)
    logits = rng.standard_normal((2, 2)).astype(np.float32)
    np.testing.assert_array_equal(fp4moe.forward(a, x, logits), fp4moe.forward(b, x, logits))
    with pytest.raises(fp4moe.InvalidArgumentError, match="swizzled"):
        fp4moe.create_plan(ctx, cfg, w1, s1, g1, w2, s2z[:, :-1], g2, w1_scale_layout="linear",
                           w2_scale_layout="swizzled")


def test_scalar_codecs():
    values = [formats.e2m1_to_float(c) for c in range(16)]
    assert values[:8] == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert formats.float_to_e2m1(2.5) == 4 and formats.float_to_e2m1(-7.0) == 15
    assert formats.e4m3_to_float(0x38) == 1.0 and formats.e4m3_to_float(0x7E) == 448.0
    assert math.isnan(formats.e4m3_to_float(0x7F))
    assert formats.float_to_e4m3(1000.0) == 0x7E and formats.float_to_e4m3(float("nan")) == 0x7F
    assert formats.bf16_to_float(0x3F80) == 1.0 and formats.float_to_bf16(1.0) == 0x3F80
    assert formats.f16_to_float(0x3C00) == 1.0 and formats.float_to_f16(1.0) == 0x3C00
    np.testing.assert_array_equal(formats.e2m1_table()[8:], -formats.e2m1_table()[:8])
    assert np.isnan(formats.e4m3_table()[0xFF])


def test_e2m1_nan_encodes_as_plus_six():
    assert formats.e2m1_to_float(formats.float_to_e2m1(float("nan"))) == 6.0


def test_bf16_array_helpers_agree_with_the_library(rng):
    x = np.concatenate([rng.standard_normal(1000).astype(np.float32) * 100,
                        np.array([0.0, -0.0, np.inf, -np.inf, 1e-40], np.float32)])
    bits = fp4moe.to_bf16(x)
    assert bits.dtype == np.uint16
    assert all(int(b) == formats.float_to_bf16(float(v)) for b, v in zip(bits, x))
    back = fp4moe.from_bf16(bits)
    assert all(float(v) == formats.bf16_to_float(int(b)) for b, v in zip(bits, back))


def test_nvfp4_quantize_dequantize(rng):
    x = rng.standard_normal((8, 64)).astype(np.float32)
    g = fp4moe.global_scale(x)
    assert g == pytest.approx(6 * 448 / np.abs(x).max(), rel=1e-6)
    assert fp4moe.global_scale(np.zeros(16, np.float32)) == 1.0
    packed, scales, dq = fp4moe.quantize(x)
    assert packed.shape == (8, 32) and scales.shape == (8, 4)
    assert dq == pytest.approx(1 / g, rel=1e-6)
    y = fp4moe.dequantize(packed, scales, dq)
    assert y.shape == x.shape
    assert np.linalg.norm(y - x) / np.linalg.norm(x) < 0.15  # NVFP4: ~10% error
    # swizzled scales carry the same values
    p2, sz, _ = fp4moe.quantize(x, g, layout="swizzled")
    np.testing.assert_array_equal(p2, packed)
    assert sz.size == formats.scale_bytes(8, 64, "swizzled") == 128 * 4
    np.testing.assert_array_equal(fp4moe.dequantize(p2, sz, dq, layout="swizzled"), y)
    np.testing.assert_array_equal(formats.convert_scales(sz, 8, 64, "swizzled", "linear"), scales)
    assert sz[formats.swizzled_scale_offset(5, 3, 4)] == scales[5, 3]
    # 16-bit inputs
    packed16, _, _ = fp4moe.quantize(x.astype(np.float16), g)
    assert packed16.shape == packed.shape
    # quantize_experts: one global scale per expert
    w = rng.standard_normal((3, 16, 32)).astype(np.float32)
    wp, ws, wg = fp4moe.quantize_experts(w)
    for e in range(3):
        assert wg[e] == pytest.approx(np.abs(w[e]).max() / (6 * 448), rel=1e-6)
        np.testing.assert_array_equal(fp4moe.quantize(w[e], 1 / wg[e])[0], wp[e])


def test_format_errors():
    with pytest.raises(fp4moe.InvalidArgumentError, match="multiple of 16"):
        fp4moe.quantize(np.ones((2, 20), np.float32))
    with pytest.raises(fp4moe.InvalidArgumentError, match="scales hold"):
        fp4moe.dequantize(np.zeros((2, 8), np.uint8), np.zeros(3, np.uint8), 1.0)
    with pytest.raises(fp4moe.InvalidArgumentError):
        fp4moe.quantize(np.ones((2, 16), np.float32), global_scale=-1.0)
    assert formats.scale_bytes(3, 17, "linear") == 0


def test_library_location(monkeypatch, tmp_path):
    found = fp4moe.find_library()
    assert found.is_file()
    monkeypatch.setenv("FP4MOE_LIBRARY", str(tmp_path / "missing.so"))
    with pytest.raises(OSError, match="FP4MOE_LIBRARY"):
        fp4moe.find_library()


def test_errors_map_to_python_exception_types():
    e = _lib.InvalidArgumentError(1, "x is NULL", "f")
    assert isinstance(e, ValueError) and isinstance(e, fp4moe.Fp4moeError)
    assert str(e) == "f: invalid argument: x is NULL"
    with pytest.raises(NotImplementedError):
        _lib.check(fp4moe.Status.UNSUPPORTED)
    with pytest.raises(MemoryError):
        _lib.check(fp4moe.Status.OUT_OF_MEMORY)
    with pytest.raises(fp4moe.Fp4moeError):
        _lib.check(fp4moe.Status.INTERNAL)
    _lib.check(fp4moe.Status.SUCCESS)
    assert ctypes.sizeof(_lib.ConfigStruct) > 0


def test_importing_fp4moe_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, fp4moe, fp4moe.formats, fp4moe.checkpoint; print('torch' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(fp4moe.__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.strip()
    assert out == "False"


def test_checkpoint_api(ctx, tmp_path):
    from fp4moe import checkpoint
    if not checkpoint.available():
        with pytest.raises(fp4moe.UnsupportedError, match="does not export"):
            fp4moe.Checkpoint(ctx, tmp_path)
        pytest.skip("the loaded library predates the checkpoint loader")
    with pytest.raises(fp4moe.Fp4moeError) as e:
        fp4moe.Checkpoint(ctx, tmp_path / "missing")
    assert e.value.message
