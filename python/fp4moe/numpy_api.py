"""The NumPy front-end: plans from NumPy weights, forward and routing on NumPy arrays.

dtypes: float32, float16, and bfloat16 as `uint16` bit patterns (fp4moe.to_bf16/from_bf16
convert) or as ml_dtypes.bfloat16 when that package is used; packed E2M1 and E4M3 scales as
uint8 (or ml_dtypes.float8_e4m3fn); expert ids int32.

On a CUDA context the arrays are copied to device buffers and back around each call
(synchronously); use the PyTorch front-end to keep data on the GPU.
"""
import numpy as np

from ._lib import Backend, DType, ScaleLayout
from . import _names, _tensors
from .core import Config, Plan, create_plan_raw

_NUMPY_DTYPES = {
    "float32": DType.F32, "float16": DType.F16, "bfloat16": DType.BF16, "uint16": DType.BF16,
    "int32": DType.I32, "uint8": DType.U8, "float8_e4m3fn": DType.E4M3,
}


def dtype_code(array):
    return _NUMPY_DTYPES.get(np.asarray(array).dtype.name)


def numpy_dtype_for(code, like=None):
    """The NumPy dtype an output of fp4moe dtype `code` is returned in."""
    code = DType(code)
    if code == DType.BF16:
        # Keep ml_dtypes' bfloat16 when the caller used it, else bit patterns.
        if like is not None and like.dtype.name == "bfloat16":
            return like.dtype
        return np.dtype(np.uint16)
    return np.dtype({DType.F32: np.float32, DType.F16: np.float16, DType.I32: np.int32,
                     DType.U8: np.uint8, DType.E4M3: np.uint8}[code])


def info(name, array):
    """A TensorInfo of a NumPy array (host memory)."""
    return _tensors.TensorInfo(
        name=name, address=array.ctypes.data, shape=tuple(array.shape), dtype=dtype_code(array),
        dtype_name=array.dtype.name, itemsize=array.dtype.itemsize,
        contiguous=bool(array.flags.c_contiguous))


def _host(name, array, dtype=None):
    """A C-contiguous array (copied only when needed); None stays None."""
    if array is None:
        return None
    a = np.asarray(array, dtype=dtype)
    return np.ascontiguousarray(a)


def aligned_empty(nbytes, alignment=256):
    """A uint8 host array whose data starts on an `alignment`-byte boundary."""
    raw = np.empty(int(nbytes) + alignment, dtype=np.uint8)
    offset = (-raw.ctypes.data) % alignment
    return raw[offset:offset + int(nbytes)]


# ------------------------------------------------------------------------------ plans
def create_plan(ctx, config, w1, w1_scale, w1_global_scale, w2, w2_scale, w2_global_scale, *,
                w1_scale_layout="linear", w2_scale_layout="linear", **optional):
    """A plan from NumPy weights in the canonical layout (see fp4moe_weights in fp4moe.h).

    optional: w1_global_scale_half2, b1, b2, routing_bias, a1_global_scale, a2_global_scale,
    fc2_input_fp8_scale, swiglu_alpha, swiglu_beta, swiglu_limit (float32 arrays).
    The plan copies the weights: the arrays may be dropped afterwards."""
    if not isinstance(config, Config):
        raise TypeError("fp4moe: config must be an fp4moe.Config")
    arrays = {"w1": _host("w1", w1), "w1_scale": _host("w1_scale", w1_scale),
              "w1_global_scale": _host("w1_global_scale", w1_global_scale, np.float32),
              "w2": _host("w2", w2), "w2_scale": _host("w2_scale", w2_scale),
              "w2_global_scale": _host("w2_global_scale", w2_global_scale, np.float32)}
    for name, value in optional.items():
        if name not in _tensors.WEIGHT_FIELDS:
            raise TypeError(f"fp4moe.create_plan: unknown weight {name!r}")
        arrays[name] = _host(name, value, np.float32)
    tensors = {name: (info(name, a) if a is not None else None) for name, a in arrays.items()}
    struct = _tensors.weights_struct(config, tensors, _names.scale_layout(w1_scale_layout),
                                     _names.scale_layout(w2_scale_layout))
    if struct is None:  # the configuration is wrong: the library says how
        config.validate(ctx)
        raise _tensors.invalid("invalid configuration")
    return create_plan_raw(ctx, config, struct)  # `arrays` stays alive until this returns


# ------------------------------------------------------------------------------ staging
class _Staging:
    """Runs a call on host arrays: passes host addresses to a CPU plan, or copies the arrays
    to device buffers (and the outputs back) for a CUDA plan."""

    def __init__(self, plan):
        self.plan = plan
        self.on_device = plan.backend == Backend.CUDA
        self.buffers = []
        self.downloads = []

    def __enter__(self):
        return self

    def input(self, array):
        if array is None:
            return None
        if not self.on_device:
            return array.ctypes.data
        ctx = self.plan.ctx
        dev = ctx.buffer_alloc(max(array.nbytes, 1))
        self.buffers.append(dev)
        ctx.buffer_upload(dev, array.ctypes.data, array.nbytes)
        return dev

    def output(self, array):
        if array is None:
            return None
        if not self.on_device:
            return array.ctypes.data
        dev = self.plan.ctx.buffer_alloc(max(array.nbytes, 1))
        self.buffers.append(dev)
        self.downloads.append((array, dev))
        return dev

    def workspace(self, nbytes):
        if not self.on_device:
            self.host_workspace = aligned_empty(max(nbytes, 1))
            return self.host_workspace.ctypes.data
        dev = self.plan.ctx.buffer_alloc(max(nbytes, 1))
        self.buffers.append(dev)
        return dev

    def finish(self):
        ctx = self.plan.ctx
        if self.on_device:
            ctx.synchronize(None)
            for array, dev in self.downloads:
                ctx.buffer_download(array.ctypes.data, dev, array.nbytes)

    def __exit__(self, *exc):
        for dev in self.buffers:
            self.plan.ctx.buffer_free(dev)


# ------------------------------------------------------------------------------ calls
def _output_array(out, rows, h, code, hidden):
    if out is not None:
        return out
    return np.empty((rows, h), dtype=numpy_dtype_for(code, hidden))


def _resolve_output_dtype(output_dtype, hidden_code, out, hidden):
    if hidden_code not in _tensors.FLOAT_DTYPES:
        raise _tensors.invalid(f"hidden_states has dtype {hidden.dtype}, expected float32, "
                               "float16 or bfloat16 (uint16 bit patterns)")
    if out is not None:
        return dtype_code(out)
    if output_dtype is None:
        return hidden_code
    return _names.dtype(output_dtype)


def forward(plan, hidden_states, router_logits=None, *, topk_ids=None, topk_weights=None,
            per_token_scale=None, out=None, output_dtype=None, skip_finalize=False,
            return_routing=False):
    """The layer on NumPy arrays: from router logits, or (topk_ids, topk_weights) chosen by the
    caller. Returns the output [T, H] ([T*k, H] with skip_finalize), and with return_routing
    (router-logits calls only) also the chosen ids [T, k] int32 and weights [T, k] float32.

    out: an optional C-contiguous array to write (in place into hidden_states is allowed)."""
    if (router_logits is None) == (topk_ids is None):
        raise ValueError("fp4moe.forward: give router_logits, or topk_ids and topk_weights")
    if topk_ids is not None and topk_weights is None:
        raise ValueError("fp4moe.forward: topk_ids needs topk_weights")
    if topk_ids is not None and return_routing:
        raise ValueError("fp4moe.forward: return_routing needs router_logits")
    cfg = plan.config
    hidden = _host("hidden_states", hidden_states)
    logits = _host("router_logits", router_logits)
    ids = _host("topk_ids", topk_ids)
    weights = _host("topk_weights", topk_weights)
    pts = _host("per_token_scale", per_token_scale, np.float32)
    hidden_code = dtype_code(hidden)
    code = _resolve_output_dtype(output_dtype, hidden_code, out, hidden)
    t = hidden.shape[0] if hidden.ndim == 2 else 0
    rows = t * cfg.top_k if skip_finalize else t
    output = _output_array(out, rows, cfg.hidden_size, code, hidden)
    ids_out = np.empty((t, cfg.top_k), np.int32) if return_routing else None
    w_out = np.empty((t, cfg.top_k), np.float32) if return_routing else None
    _tensors.check_forward(
        cfg, info("hidden_states", hidden), info("out", output),
        router_logits=info("router_logits", logits) if logits is not None else None,
        topk_ids=info("topk_ids", ids) if ids is not None else None,
        topk_weights=info("topk_weights", weights) if weights is not None else None,
        per_token_scale=info("per_token_scale", pts) if pts is not None else None,
        skip_finalize=skip_finalize,
        topk_ids_out=info("topk_ids_out", ids_out) if ids_out is not None else None,
        topk_weights_out=info("topk_weights_out", w_out) if w_out is not None else None)
    in_place = out is not None and np.shares_memory(out, hidden)
    ws_bytes = plan.workspace_size(t)
    with _Staging(plan) as st:
        hidden_addr = st.input(hidden)
        plan.forward_raw(
            num_tokens=t, hidden_states=hidden_addr, hidden_dtype=hidden_code,
            output=hidden_addr if (in_place and st.on_device) else st.output(output),
            output_dtype=code,
            router_logits=st.input(logits),
            router_logits_dtype=dtype_code(logits) if logits is not None else DType.F32,
            topk_ids=st.input(ids), topk_weights=st.input(weights),
            topk_weights_dtype=dtype_code(weights) if weights is not None else DType.F32,
            per_token_scale=st.input(pts), skip_finalize=skip_finalize,
            topk_ids_out=st.output(ids_out), topk_weights_out=st.output(w_out),
            workspace=st.workspace(ws_bytes), workspace_bytes=ws_bytes)
        if in_place and st.on_device:
            st.downloads.append((output, hidden_addr))
        st.finish()
    if return_routing:
        return output, ids_out, w_out
    return output


def forward_routed(plan, hidden_states, topk_ids, topk_weights, **kwargs):
    """forward() with the experts and weights chosen by the caller."""
    return forward(plan, hidden_states, topk_ids=topk_ids, topk_weights=topk_weights, **kwargs)


def route(plan, router_logits):
    """Routing alone: logits [T, E] -> (ids [T, k] int32 global ids, weights [T, k] float32)."""
    cfg = plan.config
    logits = _host("router_logits", router_logits)
    if logits.ndim != 2 or logits.shape[1] != cfg.num_experts:
        raise _tensors.invalid(f"router_logits has shape {tuple(logits.shape)}, expected "
                               f"[T, {cfg.num_experts}]")
    t = logits.shape[0]
    if not 1 <= t <= cfg.max_tokens:
        raise _tensors.invalid(f"router_logits has {t} tokens; a call takes 1..max_tokens = "
                               f"{cfg.max_tokens}")
    _tensors.check_tensor(info("router_logits", logits), (t, cfg.num_experts),
                          _tensors.FLOAT_DTYPES)
    ids = np.empty((t, cfg.top_k), np.int32)
    weights = np.empty((t, cfg.top_k), np.float32)
    ws_bytes = plan.workspace_size(t)
    with _Staging(plan) as st:
        plan.route_raw(num_tokens=t, router_logits=st.input(logits),
                       router_logits_dtype=dtype_code(logits), topk_ids_out=st.output(ids),
                       topk_weights_out=st.output(weights), workspace=st.workspace(ws_bytes),
                       workspace_bytes=ws_bytes)
        st.finish()
    return ids, weights


__all__ = ["create_plan", "forward", "forward_routed", "route", "dtype_code", "aligned_empty",
           "Plan", "ScaleLayout"]
