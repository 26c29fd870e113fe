"""Shape and dtype checks shared by the NumPy and PyTorch front-ends.

The C library cannot see buffer lengths, so every array is checked here against the plan's
configuration before its address is passed on: a wrong shape is a Python exception, never an
out-of-bounds read.
"""
import ctypes
import dataclasses

from ._lib import DType, InvalidArgumentError, ScaleLayout, Status, WeightsStruct, lib

FLOAT_DTYPES = (DType.F32, DType.F16, DType.BF16)


@dataclasses.dataclass
class TensorInfo:
    """What the checks need to know of an array: its address, shape and element type."""
    name: str
    address: int
    shape: tuple
    dtype: object  # DType, or None for an element type fp4moe has no name for
    dtype_name: str  # the framework's name of the dtype, for messages
    itemsize: int
    contiguous: bool
    device: str = "cpu"

    @property
    def nbytes(self):
        n = self.itemsize
        for d in self.shape:
            n *= d
        return n


def invalid(message):
    return InvalidArgumentError(Status.INVALID_ARGUMENT, message)


def _check_common(t):
    if not t.contiguous:
        raise invalid(f"{t.name} must be contiguous (C order); call .contiguous() or "
                      f"numpy.ascontiguousarray first")


def check_tensor(t, shape, dtypes):
    """shape: a tuple of ints; dtypes: allowed DType members."""
    _check_common(t)
    if t.dtype not in dtypes:
        names = ", ".join(d.name.lower() for d in dtypes)
        raise invalid(f"{t.name} has dtype {t.dtype_name}, expected {names}")
    if tuple(t.shape) != tuple(shape):
        raise invalid(f"{t.name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def check_bytes(t, shape):
    """Packed E2M1 or E4M3 data: any 1-byte element type (uint8, float8_e4m3fn, int8)."""
    _check_common(t)
    if t.itemsize != 1:
        raise invalid(f"{t.name} has dtype {t.dtype_name}, expected a 1-byte type "
                      f"(uint8 or float8_e4m3fn)")
    if tuple(t.shape) != tuple(shape):
        raise invalid(f"{t.name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def check_scales(t, experts, rows, cols, layout):
    """Block scales of `experts` [rows, cols] matrices in a layout; swizzled ones may be padded,
    so for them only the leading dimension and the byte count are fixed."""
    if layout == ScaleLayout.LINEAR:
        check_bytes(t, (experts, rows, cols // 16))
        return
    _check_common(t)
    per_expert = lib().fp4moe_scale_bytes(rows, cols, int(layout))
    if t.itemsize != 1 or not t.shape or t.shape[0] != experts or t.nbytes != experts * per_expert:
        raise invalid(f"{t.name} ({t.dtype_name} {tuple(t.shape)}) must hold {experts} x "
                      f"{per_expert} bytes of 128x4-swizzled scales of [{rows}, {cols // 16}]")


WEIGHT_FIELDS = ("w1", "w1_scale", "w1_global_scale", "w1_global_scale_half2", "w2", "w2_scale",
                 "w2_global_scale", "b1", "b2", "routing_bias", "a1_global_scale",
                 "a2_global_scale", "fc2_input_fp8_scale", "swiglu_alpha", "swiglu_beta",
                 "swiglu_limit")
REQUIRED_WEIGHTS = ("w1", "w1_scale", "w1_global_scale", "w2", "w2_scale", "w2_global_scale")


def weights_struct(config, tensors, w1_scale_layout, w2_scale_layout):
    """A filled fp4moe_weights after checking every given tensor against config.

    tensors: field name -> TensorInfo (host memory) or None."""
    for name in tensors:
        if name not in WEIGHT_FIELDS:
            raise TypeError(f"fp4moe: unknown weight {name!r}")
    for name in REQUIRED_WEIGHTS:
        if tensors.get(name) is None:
            raise invalid(f"{name} is required")
    e_loc = config.num_local_experts
    if e_loc < 1:
        raise invalid(f"local_num_experts resolves to {e_loc}: check local_expert_offset")
    n1, h, i = config.fc1_rows, config.hidden_size, config.intermediate_size
    if n1 <= 0 or h <= 0 or i <= 0 or h % 16 or i % 16:
        # Let the library word the configuration error.
        return None
    expected = {
        "w1_global_scale": (e_loc,), "w1_global_scale_half2": (e_loc,),
        "w2_global_scale": (e_loc,), "b1": (e_loc, n1), "b2": (e_loc, h),
        "routing_bias": (config.num_experts,), "a1_global_scale": (e_loc,),
        "a2_global_scale": (e_loc,), "fc2_input_fp8_scale": (e_loc,), "swiglu_alpha": (e_loc,),
        "swiglu_beta": (e_loc,), "swiglu_limit": (e_loc,),
    }
    for t in tensors.values():
        if t is not None and t.device != "cpu":
            raise invalid(f"{t.name} is on {t.device}: weights are read from host memory")
    check_bytes(tensors["w1"], (e_loc, n1, h // 2))
    check_bytes(tensors["w2"], (e_loc, h, i // 2))
    check_scales(tensors["w1_scale"], e_loc, n1, h, w1_scale_layout)
    check_scales(tensors["w2_scale"], e_loc, h, i, w2_scale_layout)
    for name, shape in expected.items():
        if tensors.get(name) is not None:
            check_tensor(tensors[name], shape, (DType.F32,))
    s = WeightsStruct()
    for name in WEIGHT_FIELDS:
        t = tensors.get(name)
        setattr(s, name, t.address if t is not None else None)
    s.w1_scale_layout = int(w1_scale_layout)
    s.w2_scale_layout = int(w2_scale_layout)
    return s


def check_forward(config, hidden, output, *, router_logits=None, topk_ids=None,
                  topk_weights=None, per_token_scale=None, skip_finalize=False,
                  topk_ids_out=None, topk_weights_out=None, device="cpu"):
    """Checks the arrays of a forward call; returns T."""
    h, e, k = config.hidden_size, config.num_experts, config.top_k
    _check_common(hidden)
    if len(hidden.shape) != 2 or hidden.shape[1] != h:
        raise invalid(f"{hidden.name} has shape {tuple(hidden.shape)}, expected [T, {h}]")
    t = hidden.shape[0]
    if not 1 <= t <= config.max_tokens:
        raise invalid(f"{hidden.name} has {t} tokens; a call takes 1..max_tokens = "
                      f"{config.max_tokens} (set max_tokens when creating the plan)")
    check_tensor(hidden, (t, h), FLOAT_DTYPES)
    if router_logits is not None:
        check_tensor(router_logits, (t, e), FLOAT_DTYPES)
    if topk_ids is not None:
        check_tensor(topk_ids, (t, k), (DType.I32,))
        check_tensor(topk_weights, (t, k), FLOAT_DTYPES)
    if per_token_scale is not None:
        check_tensor(per_token_scale, (t,), (DType.F32,))
    rows = t * k if skip_finalize else t
    check_tensor(output, (rows, h), (DType.F32, hidden.dtype))
    if topk_ids_out is not None:
        check_tensor(topk_ids_out, (t, k), (DType.I32,))
    if topk_weights_out is not None:
        check_tensor(topk_weights_out, (t, k), (DType.F32,))
    for x in (hidden, router_logits, topk_ids, topk_weights, per_token_scale, output,
              topk_ids_out, topk_weights_out):
        if x is not None and x.device != device:
            raise invalid(f"{x.name} is on {x.device}, but this plan computes on {device}")
    return t


def address_of_buffer(buffer):
    """Address of a ctypes buffer or bytes-like object kept alive by the caller."""
    return ctypes.addressof(buffer)
