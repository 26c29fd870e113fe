"""The FlashInfer drop-in's torch-free parts: undoing the trtllm-gen weight preparation, the
scale folding, and the activation mapping; plus the layer the drop-in builds from FlashInfer's
arguments against the layer built from fp4moe's own (NumPy only)."""
import os

import numpy as np
import pytest

import fp4moe
from fp4moe import _flashinfer_layout as fl
from fp4moe import formats

SEED = int(os.environ.get("FP4MOE_SEED", np.random.SeedSequence().entropy % 2**32))
print(f"test_flashinfer_layout seed: {SEED}")


def flashinfer_shuffle_indices(rows, epilogue_tile_m):
    # FlashInfer's get_shuffle_matrix_a_row_indices, restated from its loop.
    block = 32 if epilogue_tile_m % 128 == 0 else 16
    if block == 32:
        row_map = [0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27,
                   4, 12, 20, 28, 5, 13, 21, 29, 6, 14, 22, 30, 7, 15, 23, 31]
    else:
        row_map = [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15]
    indices = [0] * rows
    for old in range(rows):
        new = (old // block) * block + row_map[old % block]
        indices[new] = old
    return np.array(indices)


def flashinfer_prepare(w13, s13, b13, w2, s2, b2, gated, epilogue_tile_m=128):
    """What FlashInfer/vLLM do to canonical (up_gate) weights before calling the kernel."""
    e, n1, _ = w13.shape
    h = w2.shape[1]
    p1 = flashinfer_shuffle_indices(n1, epilogue_tile_m)
    if gated:
        half = n1 // 2
        inter = np.empty(n1, np.int64)
        inter[0::2] = np.arange(half)
        inter[1::2] = np.arange(half, n1)
        p1 = inter[p1]
    p2 = flashinfer_shuffle_indices(h, epilogue_tile_m)
    cols1, cols2 = w13.shape[2] * 2, w2.shape[2] * 2
    sw = lambda s, rows, cols: formats.convert_scales(s, rows, cols, "linear", "swizzled")
    return (w13[:, p1], np.stack([sw(s13[i][p1], n1, cols1) for i in range(e)]).reshape(s13.shape),
            b13[:, p1], w2[:, p2],
            np.stack([sw(s2[i][p2], h, cols2) for i in range(e)]).reshape(s2.shape), b2[:, p2])


@pytest.mark.parametrize("gated,tile", [(True, 128), (False, 128), (True, 64)])
def test_canonical_weights_undo_the_trtllm_gen_preparation(gated, tile):
    rng = np.random.default_rng([SEED, int(gated), tile])
    e, i, h = 3, (64 if gated else 128), 128  # FlashInfer's scale shuffle needs rows % 128 == 0
    n1 = 2 * i if gated else i
    w13 = rng.integers(0, 256, (e, n1, h // 2), dtype=np.uint8)
    s13 = rng.integers(0, 0x7F, (e, n1, h // 16), dtype=np.uint8)
    b13 = rng.standard_normal((e, n1)).astype(np.float32)
    w2 = rng.integers(0, 256, (e, h, i // 2), dtype=np.uint8)
    s2 = rng.integers(0, 0x7F, (e, h, i // 16), dtype=np.uint8)
    b2 = rng.standard_normal((e, h)).astype(np.float32)
    prepared = flashinfer_prepare(w13, s13, b13, w2, s2, b2, gated, tile)
    got = fl.canonical_weights(*prepared, gated=gated, layout="shuffled", epilogue_tile_m=tile)
    for a, b in zip(got[:6], (w13, s13, b13, w2, s2, b2)):
        np.testing.assert_array_equal(a, b)
    assert got[6] == fp4moe.ScaleLayout.LINEAR
    same = fl.canonical_weights(w13, s13, b13, w2, s2, b2, gated=gated, layout="linear")
    assert same[0] is w13 and same[6] == fp4moe.ScaleLayout.LINEAR
    assert fl.canonical_weights(w13, s13, None, w2, s2, None, gated=gated,
                                layout="swizzled")[6] == fp4moe.ScaleLayout.SWIZZLED_128x4
    with pytest.raises(ValueError, match="weight_layout"):
        fl.canonical_weights(w13, s13, None, w2, s2, None, gated=gated, layout="blocked")


def test_shuffle_helpers():
    np.testing.assert_array_equal(fl.shuffle_row_indices(64, 128), flashinfer_shuffle_indices(64, 128))
    np.testing.assert_array_equal(fl.shuffle_row_indices(32, 64), flashinfer_shuffle_indices(32, 64))
    np.testing.assert_array_equal(fl.gated_interleave_indices(6), [0, 3, 1, 4, 2, 5])
    x = np.arange(12).reshape(6, 2)
    idx = fl.gated_interleave_indices(6)
    np.testing.assert_array_equal(fl.unshuffle_rows(x[idx], idx), x)
    with pytest.raises(ValueError, match="multiple of 32"):
        fl.shuffle_row_indices(48, 128)


def test_activation_mapping():
    class ActivationType:  # stands for FlashInfer's IntEnum member
        def __init__(self, name):
            self.name = name
    assert fl.activation_from_flashinfer(3) == fp4moe.Activation.SWIGLU
    assert fl.activation_from_flashinfer(4) == fp4moe.Activation.GEGLU
    assert fl.activation_from_flashinfer(6) == fp4moe.Activation.RELU2
    assert fl.activation_from_flashinfer(ActivationType("Identity")) == fp4moe.Activation.IDENTITY
    assert fl.activation_from_flashinfer("Swiglu") == fp4moe.Activation.SWIGLU
    with pytest.raises(ValueError, match="ambiguous"):
        fl.activation_from_flashinfer(9)
    with pytest.raises(NotImplementedError, match="SwigluBias"):
        fl.activation_from_flashinfer(ActivationType("SwigluBias"))


def test_fold_scales_inverts_flashinfers_scalars():
    rng = np.random.default_rng([SEED, 7])
    e = 4
    dq1, dq2 = rng.uniform(1e-3, 1e-2, e).astype(np.float32), rng.uniform(1e-3, 1e-2, e).astype(np.float32)
    a1, a2 = np.float32(300.0), rng.uniform(20, 60, e).astype(np.float32)
    og = (dq1 / a1).astype(np.float32)
    o1 = (a2 * dq1 / a1).astype(np.float32)
    o2 = (dq2 / a2).astype(np.float32)
    w1g, w2g, a1g, a2g, precision = fl.fold_scales(og, o1, o2, nvfp4_input=True)
    assert precision == fp4moe.Precision.W4A4
    np.testing.assert_allclose(a2g, a2, rtol=1e-6)
    np.testing.assert_allclose(w2g, dq2, rtol=1e-6)
    np.testing.assert_array_equal(a1g, np.ones(e, np.float32))
    np.testing.assert_array_equal(w1g, og)
    w1g, w2g, a1g, a2g, precision = fl.fold_scales(og, o1, o2, nvfp4_input=False)
    assert precision == fp4moe.Precision.W4A16 and a1g is None and a2g is None
    np.testing.assert_allclose(w2g, dq2, rtol=1e-6)
    with pytest.raises(ValueError, match="required"):
        fl.fold_scales(None, o1, o2, nvfp4_input=True)


def test_the_drop_ins_w4a4_layer_equals_fp4moes():
    """FlashInfer's NVFP4 activations (codes and block scales made with a1) run as e2m1*e4m3
    with a1 = 1 and the folded scales: the layer fp4moe computes with the real a1, a2."""
    rng = np.random.default_rng([SEED, 11])
    E, k, H, I, T = 4, 2, 64, 32, 6
    ctx = fp4moe.Context("cpu", num_threads=2)
    w13, s13, dq1 = fp4moe.quantize_experts(rng.standard_normal((E, 2 * I, H)).astype(np.float32))
    w2, s2, dq2 = fp4moe.quantize_experts(rng.standard_normal((E, H, I)).astype(np.float32))
    x = rng.standard_normal((T, H)).astype(np.float32)
    logits = rng.standard_normal((T, E)).astype(np.float32)
    a1 = np.full(E, fp4moe.global_scale(x), np.float32)  # one activation scale for all experts
    a2 = rng.uniform(100.0, 300.0, E).astype(np.float32)
    cfg = fp4moe.Config(num_experts=E, top_k=k, hidden_size=H, intermediate_size=I,
                        gate_up_order="up_gate", precision="w4a4")
    direct = fp4moe.create_plan(ctx, cfg, w13, s13, dq1, w2, s2, dq2, a1_global_scale=a1,
                                a2_global_scale=a2)
    want = fp4moe.forward(direct, x, logits)

    og = (np.float32(1) / a1 * dq1).astype(np.float32)
    o1 = (a2 * og).astype(np.float32)
    o2 = (dq2 / a2).astype(np.float32)
    w1g, w2g, a1g, a2g, precision = fl.fold_scales(og, o1, o2, nvfp4_input=True)
    packed, scales, _ = fp4moe.quantize(x, a1[0])
    x_codes_times_scales = fp4moe.dequantize(packed, scales, 1.0)  # what the drop-in feeds
    cfg_fi = fp4moe.Config(num_experts=E, top_k=k, hidden_size=H, intermediate_size=I,
                           gate_up_order="up_gate", precision=precision)
    folded = fp4moe.create_plan(ctx, cfg_fi, w13, s13, w1g, w2, s2, w2g, a1_global_scale=a1g,
                                a2_global_scale=a2g)
    got = fp4moe.forward(folded, x_codes_times_scales, logits)
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < 1e-3, err  # a2 = o1/og may differ from a2 by an ulp: near ties only
