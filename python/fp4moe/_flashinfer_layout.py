"""FlashInfer's weight layouts and scale conventions mapped to fp4moe's, in NumPy only (no
torch), so that they can be tested anywhere; flashinfer_compat.py uses them."""
import numpy as np

from . import formats
from ._lib import Activation, Precision, ScaleLayout

# FlashInfer ActivationType names -> fp4moe activations.
_ACTIVATION_BY_NAME = {
    "swiglu": Activation.SWIGLU, "geglu": Activation.GEGLU, "relu2": Activation.RELU2,
    "identity": Activation.IDENTITY, "silu": Activation.SILU, "gelu": Activation.GELU,
}
_STABLE_ACTIVATION_NUMBERS = {3: Activation.SWIGLU, 4: Activation.GEGLU, 6: Activation.RELU2}

# srcToDstBlk32RowMap / srcToDstBlk16RowMap of FlashInfer's shuffle_matrix_a.
_BLOCK32_ROW_MAP = [0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27,
                    4, 12, 20, 28, 5, 13, 21, 29, 6, 14, 22, 30, 7, 15, 23, 31]
_BLOCK16_ROW_MAP = [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15]


def activation_from_flashinfer(value):
    """An fp4moe Activation from FlashInfer's ActivationType (member, name or stable number)."""
    if isinstance(value, Activation):
        return value
    name = getattr(value, "name", None)
    if name is None and isinstance(value, str):
        name = value
    if name is not None:
        key = name.lower().replace("_", "")
        if key in _ACTIVATION_BY_NAME:
            return _ACTIVATION_BY_NAME[key]
        raise NotImplementedError(f"fp4moe: activation {name!r} is not supported (supported: "
                                  f"{', '.join(sorted(_ACTIVATION_BY_NAME))})")
    if isinstance(value, int) and not isinstance(value, bool):
        if value in _STABLE_ACTIVATION_NUMBERS:
            return _STABLE_ACTIVATION_NUMBERS[value]
        raise ValueError(f"fp4moe: activation_type {value} is ambiguous (FlashInfer's numbers "
                         "moved between releases; only 3 Swiglu, 4 Geglu and 6 Relu2 are "
                         "stable): pass flashinfer's ActivationType member or its name")
    raise TypeError(f"fp4moe: activation_type {value!r} is neither a name nor a number")


# ------------------------------------------------------------------------------ layouts
def shuffle_row_indices(rows, epilogue_tile_m=128):
    """FlashInfer's get_shuffle_matrix_a_row_indices: shuffled[new] = original[indices[new]]."""
    block = 32 if epilogue_tile_m % 128 == 0 else 16
    row_map = _BLOCK32_ROW_MAP if block == 32 else _BLOCK16_ROW_MAP
    if rows % block:
        raise ValueError(f"fp4moe: shuffled weights need rows ({rows}) to be a multiple of "
                         f"{block}")
    old = np.arange(rows)
    new = (old // block) * block + np.asarray(row_map)[old % block]
    indices = np.empty(rows, np.int64)
    indices[new] = old
    return indices


def gated_interleave_indices(rows):
    """FlashInfer's get_reorder_rows_for_gated_act_gemm_row_indices: rows of the two halves
    alternate (new 2i = old i, new 2i+1 = old rows/2 + i)."""
    half = (rows + 1) // 2
    indices = np.empty(rows, np.int64)
    indices[0::2] = np.arange(half)
    indices[1::2] = np.arange(half, rows)
    return indices


def unshuffle_rows(shuffled, indices):
    """Undoes shuffled = original[indices] along axis 0."""
    original = np.empty_like(shuffled)
    original[indices] = shuffled
    return original


def _fc1_indices(rows, gated, epilogue_tile_m):
    shuffle = shuffle_row_indices(rows, epilogue_tile_m)
    if not gated:
        return shuffle
    return gated_interleave_indices(rows)[shuffle]


def canonical_weights(w1, w1_scale, b1, w2, w2_scale, b2, *, gated, layout, epilogue_tile_m=128):
    """FlashInfer-layout host arrays -> (w1, w1_scale, b1, w2, w2_scale, b2, scale layout) in
    fp4moe's canonical rows (up_gate order kept)."""
    if layout in ("linear", "swizzled"):
        scale_layout = ScaleLayout.LINEAR if layout == "linear" else ScaleLayout.SWIZZLED_128x4
        return w1, w1_scale, b1, w2, w2_scale, b2, scale_layout
    if layout != "shuffled":
        raise ValueError(f"fp4moe: weight_layout {layout!r}: expected 'shuffled', 'linear' or "
                         "'swizzled'")
    e_loc, n1, h_half = w1.shape
    h, i_half = w2.shape[1], w2.shape[2]
    i1 = _fc1_indices(n1, gated, epilogue_tile_m)
    i2 = shuffle_row_indices(h, epilogue_tile_m)
    out = {"w1": [], "s1": [], "w2": [], "s2": []}
    for e in range(e_loc):
        out["w1"].append(unshuffle_rows(w1[e], i1))
        s = formats.convert_scales(w1_scale[e].reshape(-1), n1, h_half * 2, "swizzled", "linear")
        out["s1"].append(unshuffle_rows(s, i1))
        out["w2"].append(unshuffle_rows(w2[e], i2))
        s = formats.convert_scales(w2_scale[e].reshape(-1), h, i_half * 2, "swizzled", "linear")
        out["s2"].append(unshuffle_rows(s, i2))
    b1 = np.stack([unshuffle_rows(b, i1) for b in b1]) if b1 is not None else None
    b2 = np.stack([unshuffle_rows(b, i2) for b in b2]) if b2 is not None else None
    return (np.stack(out["w1"]), np.stack(out["s1"]), b1, np.stack(out["w2"]),
            np.stack(out["s2"]), b2, ScaleLayout.LINEAR)


def fold_scales(og, o1, o2, nvfp4_input):
    """FlashInfer's per-expert scalars -> fp4moe's (w1_global, w2_global, a1, a2, precision)."""
    if og is None or o2 is None or (o1 is None and nvfp4_input):
        raise ValueError("fp4moe: output1_scale_gate_scalar and output2_scale_scalar (and "
                         "output1_scale_scalar with NVFP4 hidden states) are required")
    og = og.astype(np.float32)
    o2 = o2.astype(np.float32)
    a2 = (o1.astype(np.float32) / og) if o1 is not None else np.ones_like(og)
    w2_global = (o2 * a2).astype(np.float32)
    if nvfp4_input:
        return og, w2_global, np.ones_like(og), a2.astype(np.float32), Precision.W4A4
    return og, w2_global, None, None, Precision.W4A16
