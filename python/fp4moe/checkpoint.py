"""The ModelOpt checkpoint loader and quantiser (include/fp4moe_checkpoint.h).

    with fp4moe.Checkpoint(ctx, "path/to/model") as ckpt:
        print(ckpt.summary, ckpt.problems)
        plan = ckpt.plan(layer=3, precision="w4a16")
        logits = ckpt.router_logits(3, hidden_states)

Bound when the loaded library exports these functions (builds from before the loader lack
them: using them then raises UnsupportedError naming the missing function).
"""
import ctypes
import dataclasses
import os

import numpy as np

from . import _names, _tensors
from ._lib import ConfigStruct, DType, Status, UnsupportedError, lib
from .core import Config, Plan
from .numpy_api import dtype_code

_enum = ctypes.c_int


class CheckpointSummaryStruct(ctypes.Structure):
    _fields_ = [
        ("model_type", ctypes.c_char_p),
        ("quant_algo", ctypes.c_char_p),
        ("quant_source", ctypes.c_char_p),
        ("group_size", ctypes.c_int64),
        ("num_shards", ctypes.c_int32),
        ("num_tensors", ctypes.c_int64),
        ("num_layers", ctypes.c_int32),
        ("num_problems", ctypes.c_int32),
        ("num_exclude_modules", ctypes.c_int32),
    ]


class CheckpointLayerInfoStruct(ctypes.Structure):
    _fields_ = [
        ("layer", ctypes.c_int64),
        ("prefix", ctypes.c_char_p),
        ("naming", ctypes.c_char_p),
        ("config", ConfigStruct),
        ("quantized", ctypes.c_int32),
        ("weight_dtype", _enum),
        ("has_input_scales", ctypes.c_int32),
        ("split_gate_up_scale", ctypes.c_int32),
        ("has_router", ctypes.c_int32),
        ("router_dtype", _enum),
        ("has_routing_bias", ctypes.c_int32),
        ("num_problems", ctypes.c_int32),
    ]


class CheckpointPlanOptionsStruct(ctypes.Structure):
    _fields_ = [
        ("precision", _enum),
        ("max_tokens", ctypes.c_int64),
        ("decode_threshold", ctypes.c_int64),
        ("local_expert_offset", ctypes.c_int64),
        ("local_num_experts", ctypes.c_int64),
        ("gate_up_order", _enum),
        ("top_k", ctypes.c_int32),
    ]


class QuantizeTensorReportStruct(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("amax", ctypes.c_double),
        ("weight_scale_2", ctypes.c_float),
        ("input_scale", ctypes.c_float),
        ("rel_l2_error", ctypes.c_double),
        ("max_abs_error", ctypes.c_double),
    ]


PROGRESS_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint64,
                                     ctypes.c_uint64)
REPORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p,
                                   ctypes.POINTER(QuantizeTensorReportStruct))


class QuantizeOptionsStruct(ctypes.Structure):
    _fields_ = [
        ("input_scales_path", ctypes.c_char_p),
        ("calibration_path", ctypes.c_char_p),
        ("input_scale", ctypes.c_float),
        ("progress", PROGRESS_CALLBACK),
        ("report", REPORT_CALLBACK),
        ("user", ctypes.c_void_p),
    ]


STRUCTS = {
    "fp4moe_checkpoint_summary": CheckpointSummaryStruct,
    "fp4moe_checkpoint_layer_info": CheckpointLayerInfoStruct,
    "fp4moe_checkpoint_plan_options": CheckpointPlanOptionsStruct,
    "fp4moe_quantize_tensor_report": QuantizeTensorReportStruct,
    "fp4moe_quantize_options": QuantizeOptionsStruct,
}

_vp = ctypes.c_void_p
_vpp = ctypes.POINTER(ctypes.c_void_p)
OPTIONAL_PROTOTYPES = {
    "fp4moe_checkpoint_open": (_enum, [_vp, ctypes.c_char_p, _vpp]),
    "fp4moe_checkpoint_close": (None, [_vp]),
    "fp4moe_checkpoint_get_summary": (_enum, [_vp, ctypes.POINTER(CheckpointSummaryStruct)]),
    "fp4moe_checkpoint_problem": (ctypes.c_char_p, [_vp, ctypes.c_int32]),
    "fp4moe_checkpoint_exclude_module": (ctypes.c_char_p, [_vp, ctypes.c_int32]),
    "fp4moe_checkpoint_get_layer": (_enum, [_vp, _vp, ctypes.c_int32,
                                            ctypes.POINTER(CheckpointLayerInfoStruct)]),
    "fp4moe_checkpoint_find_layer": (_enum, [_vp, _vp, ctypes.c_int64,
                                             ctypes.POINTER(ctypes.c_int32)]),
    "fp4moe_checkpoint_plan_options_init": (None, [ctypes.POINTER(CheckpointPlanOptionsStruct)]),
    "fp4moe_checkpoint_plan_create": (_enum, [_vp, _vp, ctypes.c_int64,
                                              ctypes.POINTER(CheckpointPlanOptionsStruct), _vpp]),
    "fp4moe_checkpoint_router_weight": (_enum, [_vp, _vp, ctypes.c_int64, _vp]),
    "fp4moe_checkpoint_routing_bias": (_enum, [_vp, _vp, ctypes.c_int64, _vp]),
    "fp4moe_checkpoint_router_logits": (_enum, [_vp, _vp, ctypes.c_int64, ctypes.c_int64, _vp,
                                                _enum, _vp]),
    "fp4moe_quantize_options_init": (None, [ctypes.POINTER(QuantizeOptionsStruct)]),
    "fp4moe_checkpoint_quantize": (_enum, [_vp, ctypes.c_char_p, ctypes.c_char_p,
                                           ctypes.POINTER(QuantizeOptionsStruct)]),
}


def available():
    """Whether the loaded library has the checkpoint API."""
    return all(lib().has(name) for name in OPTIONAL_PROTOTYPES)


def _fn(name):
    fn = getattr(lib(), name, None)
    if fn is None:
        restype, argtypes = OPTIONAL_PROTOTYPES[name]
        fn = lib().bind_optional(name, restype, argtypes)
    if fn is None:
        raise UnsupportedError(Status.UNSUPPORTED, f"{lib().path} does not export {name} (built "
                               "before the checkpoint loader?)", name)
    return fn


def _text(raw):
    return raw.decode(errors="replace") if raw else ""


def _path(path):
    return os.fsencode(os.fspath(path))


@dataclasses.dataclass
class Summary:
    model_type: str
    quant_algo: str
    quant_source: str
    group_size: int
    num_shards: int
    num_tensors: int
    num_layers: int
    num_problems: int
    num_exclude_modules: int


@dataclasses.dataclass
class LayerInfo:
    layer: int
    prefix: str
    naming: str
    config: Config
    quantized: bool
    weight_dtype: DType
    has_input_scales: bool
    split_gate_up_scale: bool
    has_router: bool
    router_dtype: DType
    has_routing_bias: bool
    num_problems: int


class Checkpoint:
    """An opened checkpoint folder or .safetensors file (memory-mapped)."""

    def __init__(self, ctx, path):
        self.ctx = ctx
        handle = ctypes.c_void_p()
        ctx.check(_fn("fp4moe_checkpoint_open")(ctx.handle, _path(path), ctypes.byref(handle)),
                  "fp4moe_checkpoint_open")
        self._handle = handle.value

    @property
    def handle(self):
        if self._handle is None:
            raise ValueError("fp4moe: the checkpoint was closed")
        return self._handle

    def close(self):
        if self._handle is not None:
            _fn("fp4moe_checkpoint_close")(self._handle)
            self._handle = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def summary(self):
        s = CheckpointSummaryStruct()
        self.ctx.check(_fn("fp4moe_checkpoint_get_summary")(self.handle, ctypes.byref(s)),
                       "fp4moe_checkpoint_get_summary")
        return Summary(_text(s.model_type), _text(s.quant_algo), _text(s.quant_source),
                       s.group_size, s.num_shards, s.num_tensors, s.num_layers, s.num_problems,
                       s.num_exclude_modules)

    def _strings(self, fn_name, count):
        fn = _fn(fn_name)
        return [_text(fn(self.handle, i)) for i in range(count)]

    @property
    def problems(self):
        return self._strings("fp4moe_checkpoint_problem", self.summary.num_problems)

    @property
    def exclude_modules(self):
        return self._strings("fp4moe_checkpoint_exclude_module",
                             self.summary.num_exclude_modules)

    def layer_info(self, index):
        """The index-th MoE layer (0 .. num_layers-1, by increasing layer number)."""
        s = CheckpointLayerInfoStruct()
        self.ctx.check(_fn("fp4moe_checkpoint_get_layer")(self.ctx.handle, self.handle,
                                                          int(index), ctypes.byref(s)),
                       "fp4moe_checkpoint_get_layer")
        return LayerInfo(s.layer, _text(s.prefix), _text(s.naming), Config.from_struct(s.config),
                         bool(s.quantized), DType(s.weight_dtype), bool(s.has_input_scales),
                         bool(s.split_gate_up_scale), bool(s.has_router), DType(s.router_dtype),
                         bool(s.has_routing_bias), s.num_problems)

    @property
    def layers(self):
        return [self.layer_info(i) for i in range(self.summary.num_layers)]

    def find_layer(self, layer):
        """The index of the MoE layer numbered `layer` (the L of "layers.L")."""
        index = ctypes.c_int32()
        self.ctx.check(_fn("fp4moe_checkpoint_find_layer")(self.ctx.handle, self.handle,
                                                           int(layer), ctypes.byref(index)),
                       "fp4moe_checkpoint_find_layer")
        return index.value

    def plan(self, layer, *, precision="w4a16", max_tokens=16384, decode_threshold=-1,
             local_expert_offset=0, local_num_experts=0, gate_up_order="gate_up", top_k=0):
        """A plan for the MoE layer numbered `layer` (fp4moe_checkpoint_plan_create)."""
        o = CheckpointPlanOptionsStruct()
        _fn("fp4moe_checkpoint_plan_options_init")(ctypes.byref(o))
        o.precision = int(_names.precision(precision))
        o.max_tokens = int(max_tokens)
        o.decode_threshold = int(decode_threshold)
        o.local_expert_offset = int(local_expert_offset)
        o.local_num_experts = int(local_num_experts)
        o.gate_up_order = int(_names.gate_up_order(gate_up_order))
        o.top_k = int(top_k)
        handle = ctypes.c_void_p()
        self.ctx.check(_fn("fp4moe_checkpoint_plan_create")(self.ctx.handle, self.handle,
                                                            int(layer), ctypes.byref(o),
                                                            ctypes.byref(handle)),
                       "fp4moe_checkpoint_plan_create")
        return Plan(self.ctx, handle.value)

    def _layer_config(self, layer):
        return self.layer_info(self.find_layer(layer)).config

    def router_weight(self, layer):
        """The router [E, H] of layer `layer` in float32."""
        cfg = self._layer_config(layer)
        out = np.empty((cfg.num_experts, cfg.hidden_size), np.float32)
        self.ctx.check(_fn("fp4moe_checkpoint_router_weight")(self.ctx.handle, self.handle,
                                                              int(layer), out.ctypes.data),
                       "fp4moe_checkpoint_router_weight")
        return out

    def routing_bias(self, layer):
        cfg = self._layer_config(layer)
        out = np.empty((cfg.num_experts,), np.float32)
        self.ctx.check(_fn("fp4moe_checkpoint_routing_bias")(self.ctx.handle, self.handle,
                                                             int(layer), out.ctypes.data),
                       "fp4moe_checkpoint_routing_bias")
        return out

    def router_logits(self, layer, hidden_states):
        """Router logits [T, E] float32 of host hidden states [T, H] (f32, f16 or bf16 bits)."""
        cfg = self._layer_config(layer)
        x = np.ascontiguousarray(hidden_states)
        code = dtype_code(x)
        if code not in _tensors.FLOAT_DTYPES or x.ndim != 2 or x.shape[1] != cfg.hidden_size:
            raise _tensors.invalid(f"hidden_states ({x.dtype} {x.shape}) must be [T, "
                                   f"{cfg.hidden_size}] float32, float16 or bfloat16")
        out = np.empty((x.shape[0], cfg.num_experts), np.float32)
        self.ctx.check(_fn("fp4moe_checkpoint_router_logits")(
            self.ctx.handle, self.handle, int(layer), x.shape[0], x.ctypes.data, int(code),
            out.ctypes.data), "fp4moe_checkpoint_router_logits")
        return out


def quantize_checkpoint(ctx, in_path, out_path, *, input_scales_path=None,
                        calibration_path=None, input_scale=0.0, progress=None, report=None):
    """ModelOpt-style NVFP4 quantisation of a float checkpoint (fp4moe_checkpoint_quantize).

    progress(tensor_name, bytes_done, bytes_total) and report(dict) are optional callables."""
    o = QuantizeOptionsStruct()
    _fn("fp4moe_quantize_options_init")(ctypes.byref(o))
    o.input_scales_path = _path(input_scales_path) if input_scales_path else None
    o.calibration_path = _path(calibration_path) if calibration_path else None
    o.input_scale = float(input_scale)
    errors = []

    # Exceptions cannot cross the C frames: remember the first, raise it after the call.
    def on_progress(user, name, done, total):
        if progress is not None and not errors:
            try:
                progress(_text(name), int(done), int(total))
            except BaseException as e:  # noqa: B902 - re-raised below
                errors.append(e)

    def on_report(user, r):
        if report is not None and not errors:
            c = r.contents
            try:
                report({"name": _text(c.name), "rows": c.rows, "cols": c.cols, "amax": c.amax,
                        "weight_scale_2": c.weight_scale_2, "input_scale": c.input_scale,
                        "rel_l2_error": c.rel_l2_error, "max_abs_error": c.max_abs_error})
            except BaseException as e:  # noqa: B902 - re-raised below
                errors.append(e)

    progress_cb = PROGRESS_CALLBACK(on_progress)
    report_cb = REPORT_CALLBACK(on_report)
    o.progress = progress_cb
    o.report = report_cb
    status = _fn("fp4moe_checkpoint_quantize")(ctx.handle, _path(in_path), _path(out_path),
                                               ctypes.byref(o))
    if errors:
        raise errors[0]
    ctx.check(status, "fp4moe_checkpoint_quantize")
