"""The PyTorch front-end: tensors on CPU (CPU plans) or CUDA (CUDA plans), zero-copy.

Tensors are passed by data_ptr(); CUDA calls run on torch.cuda.current_stream(), never
synchronise the host and allocate only through PyTorch's caching allocator, so they can be
captured in a CUDA graph. Three torch.library custom ops make the layer visible to
torch.compile:

    torch.ops.fp4moe.forward(plan_id, hidden, logits, per_token_scale, out_dtype, skip_finalize)
        -> (output, topk_ids, topk_weights)
    torch.ops.fp4moe.forward_routed(plan_id, hidden, topk_ids, topk_weights, per_token_scale,
                                    out_dtype, skip_finalize) -> output
    torch.ops.fp4moe.route(plan_id, logits) -> (topk_ids, topk_weights)

plan_id is Plan.op_id (see register); out_dtype is an fp4moe.DType value or -1 for the hidden
states' dtype. The functions moe(), moe_routed() and route() below call them.
"""
import itertools
import weakref
from typing import Optional, Tuple

import numpy as np
import torch

from . import _tensors, numpy_api
from ._lib import Backend, DType
from .core import Plan

_TORCH_DTYPES = {
    torch.float32: DType.F32, torch.float16: DType.F16, torch.bfloat16: DType.BF16,
    torch.int32: DType.I32, torch.uint8: DType.U8,
}
if hasattr(torch, "float8_e4m3fn"):
    _TORCH_DTYPES[torch.float8_e4m3fn] = DType.E4M3
_FROM_CODE = {DType.F32: torch.float32, DType.F16: torch.float16, DType.BF16: torch.bfloat16}


def torch_dtype_code(dtype):
    return _TORCH_DTYPES.get(dtype)


def device_name(tensor):
    d = tensor.device
    if d.type == "cuda":
        return f"cuda:{d.index if d.index is not None else torch.cuda.current_device()}"
    return d.type


def info(name, t):
    return _tensors.TensorInfo(
        name=name, address=t.data_ptr(), shape=tuple(t.shape), dtype=torch_dtype_code(t.dtype),
        dtype_name=str(t.dtype).replace("torch.", ""), itemsize=t.element_size(),
        contiguous=t.is_contiguous(), device=device_name(t))


def plan_device(plan):
    """Where the plan's tensors must live: "cpu" or "cuda:N"."""
    if plan.backend == Backend.CUDA:
        return f"cuda:{plan.ctx.cuda_device}"
    return "cpu"


# ------------------------------------------------------------------------------ plans
_PLANS = weakref.WeakValueDictionary()
_NEXT_ID = itertools.count(1)


def register(plan):
    """Gives the plan an op_id by which the custom ops find it (kept while the plan lives)."""
    if getattr(plan, "op_id", None) is None:
        plan.op_id = next(_NEXT_ID)
        _PLANS[plan.op_id] = plan
    return plan


def plan_of(op_id):
    plan = _PLANS.get(int(op_id))
    if plan is None:
        raise ValueError(f"fp4moe: no live plan has op_id {op_id} (was it garbage collected?)")
    return plan


def _host_array(name, t):
    """A host NumPy view (or copy) of a weight tensor; 1-byte types as uint8."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        return np.asarray(t)
    t = t.detach()
    if t.element_size() == 1 and t.dtype != torch.uint8:
        t = t.view(torch.uint8)
    if t.dtype == torch.bfloat16 or t.dtype == torch.float16:
        t = t.float()
    return t.cpu().contiguous().numpy()


def create_plan(ctx, config, w1, w1_scale, w1_global_scale, w2, w2_scale, w2_global_scale, *,
                w1_scale_layout="linear", w2_scale_layout="linear", **optional):
    """A plan from tensors (any device: weights are read once, on the host) or arrays, with
    the arguments of fp4moe.create_plan. The plan is registered for the custom ops."""
    args = [_host_array(n, t) for n, t in (("w1", w1), ("w1_scale", w1_scale),
                                            ("w1_global_scale", w1_global_scale), ("w2", w2),
                                            ("w2_scale", w2_scale),
                                            ("w2_global_scale", w2_global_scale))]
    extra = {name: _host_array(name, t) for name, t in optional.items()}
    plan = numpy_api.create_plan(ctx, config, *args, w1_scale_layout=w1_scale_layout,
                                 w2_scale_layout=w2_scale_layout, **extra)
    return register(plan)


# ------------------------------------------------------------------------------ launching
def _stream(plan, device):
    if plan.backend != Backend.CUDA:
        return None
    return torch.cuda.current_stream(device).cuda_stream


def _workspace(plan, num_tokens, device):
    """A 256-aligned workspace tensor from the caching allocator (graph-safe)."""
    nbytes = plan.workspace_size(num_tokens)
    raw = torch.empty(nbytes + 256, dtype=torch.uint8, device=device)
    offset = (-raw.data_ptr()) % 256
    return raw, raw.data_ptr() + offset, nbytes


def _out_code(output_dtype, hidden):
    if output_dtype is None or output_dtype == -1:
        return torch_dtype_code(hidden.dtype)
    if isinstance(output_dtype, torch.dtype):
        code = torch_dtype_code(output_dtype)
        if code is None:
            raise _tensors.invalid(f"output dtype {output_dtype} is not supported")
        return code
    return DType(int(output_dtype))


def _launch(plan, hidden, output, *, router_logits=None, topk_ids=None, topk_weights=None,
            per_token_scale=None, skip_finalize=False, topk_ids_out=None,
            topk_weights_out=None):
    """Checks every tensor against the plan, then runs forward or forward_routed on them."""
    device = plan_device(plan)
    infos = {name: (info(name, t) if t is not None else None) for name, t in (
        ("router_logits", router_logits), ("topk_ids", topk_ids), ("topk_weights", topk_weights),
        ("per_token_scale", per_token_scale), ("topk_ids_out", topk_ids_out),
        ("topk_weights_out", topk_weights_out))}
    hidden_info = info("hidden_states", hidden)
    out_info = info("out", output)
    t = _tensors.check_forward(plan.config, hidden_info, out_info, skip_finalize=skip_finalize,
                               device=device, **infos)
    keep, ws, ws_bytes = _workspace(plan, t, hidden.device)

    def addr(name):
        return infos[name].address if infos[name] is not None else None

    plan.forward_raw(
        num_tokens=t, hidden_states=hidden_info.address, hidden_dtype=hidden_info.dtype,
        output=out_info.address, output_dtype=out_info.dtype,
        router_logits=addr("router_logits"),
        router_logits_dtype=infos["router_logits"].dtype if router_logits is not None
        else DType.F32,
        topk_ids=addr("topk_ids"), topk_weights=addr("topk_weights"),
        topk_weights_dtype=infos["topk_weights"].dtype if topk_weights is not None
        else DType.F32,
        per_token_scale=addr("per_token_scale"), skip_finalize=skip_finalize,
        topk_ids_out=addr("topk_ids_out"), topk_weights_out=addr("topk_weights_out"),
        workspace=ws, workspace_bytes=ws_bytes, stream=_stream(plan, hidden.device))
    del keep  # the caching allocator reuses it only after the stream's work (stream-ordered)


def _empty_output(plan, hidden, code, skip_finalize):
    cfg = plan.config
    t = hidden.shape[0] if hidden.dim() == 2 else 0
    rows = t * cfg.top_k if skip_finalize else t
    if code not in _FROM_CODE:
        raise _tensors.invalid(f"output dtype {code!r} must be f32, f16 or bf16")
    return torch.empty((rows, cfg.hidden_size), dtype=_FROM_CODE[code], device=hidden.device)


def forward(plan, hidden_states, router_logits=None, *, topk_ids=None, topk_weights=None,
            per_token_scale=None, out=None, output_dtype=None, skip_finalize=False,
            topk_ids_out=None, topk_weights_out=None):
    """The layer, eagerly, on tensors (no custom op; see moe() for torch.compile).

    out: written in place when given (may be hidden_states itself, finalize on, same dtype);
    topk_ids_out / topk_weights_out: optional [T, k] int32 / float32 routing replay outputs."""
    if (router_logits is None) == (topk_ids is None):
        raise ValueError("fp4moe.forward: give router_logits, or topk_ids and topk_weights")
    if topk_ids is not None and topk_weights is None:
        raise ValueError("fp4moe.forward: topk_ids needs topk_weights")
    if out is None:
        out = _empty_output(plan, hidden_states, _out_code(output_dtype, hidden_states),
                            skip_finalize)
    _launch(plan, hidden_states, out, router_logits=router_logits, topk_ids=topk_ids,
            topk_weights=topk_weights, per_token_scale=per_token_scale,
            skip_finalize=skip_finalize, topk_ids_out=topk_ids_out,
            topk_weights_out=topk_weights_out)
    return out


def route_eager(plan, router_logits, topk_ids_out=None, topk_weights_out=None):
    cfg = plan.config
    logits = info("router_logits", router_logits)
    if len(logits.shape) != 2 or logits.shape[1] != cfg.num_experts:
        raise _tensors.invalid(f"router_logits has shape {logits.shape}, expected "
                               f"[T, {cfg.num_experts}]")
    t = logits.shape[0]
    _tensors.check_tensor(logits, (t, cfg.num_experts), _tensors.FLOAT_DTYPES)
    if logits.device != plan_device(plan):
        raise _tensors.invalid(f"router_logits is on {logits.device}, but this plan computes "
                               f"on {plan_device(plan)}")
    dev = router_logits.device
    ids = topk_ids_out if topk_ids_out is not None else torch.empty(
        (t, cfg.top_k), dtype=torch.int32, device=dev)
    weights = topk_weights_out if topk_weights_out is not None else torch.empty(
        (t, cfg.top_k), dtype=torch.float32, device=dev)
    _tensors.check_tensor(info("topk_ids_out", ids), (t, cfg.top_k), (DType.I32,))
    _tensors.check_tensor(info("topk_weights_out", weights), (t, cfg.top_k), (DType.F32,))
    for name, x in (("topk_ids_out", ids), ("topk_weights_out", weights)):
        if device_name(x) != plan_device(plan):
            raise _tensors.invalid(f"{name} is on {device_name(x)}, expected {plan_device(plan)}")
    keep, ws, ws_bytes = _workspace(plan, t, dev)
    plan.route_raw(num_tokens=t, router_logits=logits.address, router_logits_dtype=logits.dtype,
                   topk_ids_out=ids.data_ptr(), topk_weights_out=weights.data_ptr(),
                   workspace=ws, workspace_bytes=ws_bytes, stream=_stream(plan, dev))
    del keep
    return ids, weights


# ------------------------------------------------------------------------------ custom ops
def _fake_rows(plan, hidden, skip_finalize):
    t = hidden.shape[0]
    return t * plan.config.top_k if skip_finalize else t


def _register_ops():
    if not hasattr(torch.library, "custom_op"):
        return False

    @torch.library.custom_op("fp4moe::forward", mutates_args=())
    def forward_op(plan_id: int, hidden_states: torch.Tensor, router_logits: torch.Tensor,
                   per_token_scale: Optional[torch.Tensor], out_dtype: int,
                   skip_finalize: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        plan = plan_of(plan_id)
        out = _empty_output(plan, hidden_states, _out_code(out_dtype, hidden_states),
                            skip_finalize)
        t, k = hidden_states.shape[0], plan.config.top_k
        ids = torch.empty((t, k), dtype=torch.int32, device=hidden_states.device)
        weights = torch.empty((t, k), dtype=torch.float32, device=hidden_states.device)
        _launch(plan, hidden_states, out, router_logits=router_logits,
                per_token_scale=per_token_scale, skip_finalize=skip_finalize,
                topk_ids_out=ids, topk_weights_out=weights)
        return out, ids, weights

    @forward_op.register_fake
    def _(plan_id, hidden_states, router_logits, per_token_scale, out_dtype, skip_finalize):
        plan = plan_of(plan_id)
        k = plan.config.top_k
        code = _out_code(out_dtype, hidden_states)
        out = hidden_states.new_empty((_fake_rows(plan, hidden_states, skip_finalize),
                                       plan.config.hidden_size), dtype=_FROM_CODE[code])
        ids = hidden_states.new_empty((hidden_states.shape[0], k), dtype=torch.int32)
        weights = hidden_states.new_empty((hidden_states.shape[0], k), dtype=torch.float32)
        return out, ids, weights

    @torch.library.custom_op("fp4moe::forward_routed", mutates_args=())
    def forward_routed_op(plan_id: int, hidden_states: torch.Tensor, topk_ids: torch.Tensor,
                          topk_weights: torch.Tensor, per_token_scale: Optional[torch.Tensor],
                          out_dtype: int, skip_finalize: bool) -> torch.Tensor:
        plan = plan_of(plan_id)
        out = _empty_output(plan, hidden_states, _out_code(out_dtype, hidden_states),
                            skip_finalize)
        _launch(plan, hidden_states, out, topk_ids=topk_ids, topk_weights=topk_weights,
                per_token_scale=per_token_scale, skip_finalize=skip_finalize)
        return out

    @forward_routed_op.register_fake
    def _(plan_id, hidden_states, topk_ids, topk_weights, per_token_scale, out_dtype,
          skip_finalize):
        plan = plan_of(plan_id)
        code = _out_code(out_dtype, hidden_states)
        return hidden_states.new_empty((_fake_rows(plan, hidden_states, skip_finalize),
                                        plan.config.hidden_size), dtype=_FROM_CODE[code])

    @torch.library.custom_op("fp4moe::route", mutates_args=())
    def route_op(plan_id: int, router_logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return route_eager(plan_of(plan_id), router_logits)

    @route_op.register_fake
    def _(plan_id, router_logits):
        k = plan_of(plan_id).config.top_k
        t = router_logits.shape[0]
        return (router_logits.new_empty((t, k), dtype=torch.int32),
                router_logits.new_empty((t, k), dtype=torch.float32))

    return True


HAVE_CUSTOM_OPS = _register_ops()


def _require_ops():
    if not HAVE_CUSTOM_OPS:
        raise RuntimeError(f"fp4moe: torch {torch.__version__} lacks torch.library.custom_op "
                           "(PyTorch >= 2.4); use fp4moe.torch_api.forward (eager) instead")


def _out_dtype_int(output_dtype, hidden):
    if output_dtype is None:
        return -1
    return int(_out_code(output_dtype, hidden))


def moe(plan, hidden_states, router_logits, *, per_token_scale=None, output_dtype=None,
        skip_finalize=False, return_routing=False):
    """The layer from router logits through the custom op (torch.compile, CUDA graphs)."""
    _require_ops()
    out, ids, weights = torch.ops.fp4moe.forward(
        register(plan).op_id, hidden_states, router_logits, per_token_scale,
        _out_dtype_int(output_dtype, hidden_states), bool(skip_finalize))
    return (out, ids, weights) if return_routing else out


def moe_routed(plan, hidden_states, topk_ids, topk_weights, *, per_token_scale=None,
               output_dtype=None, skip_finalize=False):
    """The layer from caller-chosen experts through the custom op."""
    _require_ops()
    return torch.ops.fp4moe.forward_routed(
        register(plan).op_id, hidden_states, topk_ids, topk_weights, per_token_scale,
        _out_dtype_int(output_dtype, hidden_states), bool(skip_finalize))


def route(plan, router_logits):
    """Routing alone through the custom op: (ids [T, k] int32, weights [T, k] float32)."""
    _require_ops()
    return torch.ops.fp4moe.route(register(plan).op_id, router_logits)


class MoE(torch.nn.Module):
    """An nn.Module over a plan: forward(hidden_states, router_logits) -> output."""

    def __init__(self, plan, output_dtype=None):
        super().__init__()
        self.plan = register(plan)
        self.output_dtype = output_dtype

    def forward(self, hidden_states, router_logits, per_token_scale=None):
        return moe(self.plan, hidden_states, router_logits, per_token_scale=per_token_scale,
                   output_dtype=self.output_dtype)


__all__ = ["MoE", "Plan", "create_plan", "forward", "moe", "moe_routed", "register", "route",
           "route_eager", "plan_device", "HAVE_CUSTOM_OPS"]
