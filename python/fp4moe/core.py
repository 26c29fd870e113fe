"""Contexts, layer configurations and plans over the C API, independent of any array library.

Arrays reach this module as raw addresses (see numpy_api.py and torch_api.py for the
front-ends); the classes here own the C handles and turn failing statuses into exceptions.
"""
import ctypes
import dataclasses
import math
import weakref

from . import _names
from ._lib import (GATED_ACTIVATIONS, Backend, ConfigStruct, ContextOptions, DType, ForwardArgs,
                   InvalidArgumentError, Status, check, lib)


def version():
    """The loaded library's version as (major, minor, patch)."""
    v = lib().fp4moe_version()
    return (v // 10000, (v // 100) % 100, v % 100)


# ------------------------------------------------------------------------------ context
class Context:
    """A backend choice (CPU or CUDA), its threads or device, and the last error message.

    Like the C context: one host thread at a time; use one context per thread."""

    def __init__(self, backend="auto", num_threads=0, cuda_device=0):
        options = ContextOptions()
        lib().fp4moe_context_options_init(ctypes.byref(options))
        options.backend = int(_names.backend(backend))
        options.num_threads = int(num_threads)
        options.cuda_device = int(cuda_device)
        handle = ctypes.c_void_p()
        status = lib().fp4moe_context_create(ctypes.byref(options), ctypes.byref(handle))
        # No context exists to hold a message when creation fails: say what was asked.
        if status != Status.SUCCESS:
            from ._lib import _ERROR_CLASSES, Fp4moeError
            cls = _ERROR_CLASSES.get(status, Fp4moeError)
            raise cls(status, f"backend={_names.backend(backend).name.lower()}, "
                      f"num_threads={num_threads}, cuda_device={cuda_device}",
                      "fp4moe_context_create")
        self._handle = handle.value
        self.cuda_device = int(cuda_device)
        self._plans = weakref.WeakSet()  # closed before the context, which they point into
        self._finalizer = weakref.finalize(self, lib().fp4moe_context_destroy, self._handle)

    @property
    def handle(self):
        if self._handle is None:
            raise ValueError("fp4moe: the context was closed")
        return self._handle

    def close(self):
        """Destroys the context, after closing the plans made from it."""
        for plan in list(self._plans):
            plan.close()
        self._finalizer()
        self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def backend(self):
        return Backend(lib().fp4moe_context_backend(self.handle))

    @property
    def description(self):
        return lib().fp4moe_context_description(self.handle).decode()

    @property
    def last_error(self):
        return lib().fp4moe_last_error(self.handle).decode(errors="replace")

    def check(self, status, function=""):
        check(status, self.handle, function)

    def __repr__(self):
        return f"fp4moe.Context({self.description!r})" if self._handle else "fp4moe.Context(closed)"

    # Memory where the backend computes (device memory for CUDA), for front-ends that stage
    # host arrays.
    def buffer_alloc(self, nbytes):
        out = ctypes.c_void_p()
        self.check(lib().fp4moe_buffer_alloc(self.handle, int(nbytes), ctypes.byref(out)),
                   "fp4moe_buffer_alloc")
        return out.value

    def buffer_free(self, address):
        lib().fp4moe_buffer_free(self.handle, address)

    def buffer_upload(self, dst, host_src, nbytes):
        self.check(lib().fp4moe_buffer_upload(self.handle, dst, host_src, int(nbytes)),
                   "fp4moe_buffer_upload")

    def buffer_download(self, host_dst, src, nbytes):
        self.check(lib().fp4moe_buffer_download(self.handle, host_dst, src, int(nbytes)),
                   "fp4moe_buffer_download")

    def synchronize(self, stream=None):
        self.check(lib().fp4moe_synchronize(self.handle, stream), "fp4moe_synchronize")


# ------------------------------------------------------------------------------ configuration
_ENUM_FIELDS = {
    "activation": _names.activation,
    "gate_up_order": _names.gate_up_order,
    "routing": _names.routing,
    "precision": _names.precision,
}
_BOOL_FIELDS = ("norm_topk_prob", "apply_router_weight_on_input", "fc2_input_fp8")


@dataclasses.dataclass
class Config:
    """fp4moe_config with the C defaults; enum fields take names ("swiglu") or enum members."""
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    activation: object = "swiglu"
    swiglu_alpha: float = 1.0
    swiglu_beta: float = 0.0
    swiglu_limit: float = math.inf
    gate_up_order: object = "gate_up"
    routing: object = "renormalize"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    apply_router_weight_on_input: bool = False
    local_expert_offset: int = 0
    local_num_experts: int = 0
    precision: object = "w4a16"
    fc2_input_fp8: bool = False
    decode_threshold: int = -1  # auto: decode while T * top_k <= 5.5 * E (16-bit), 10 * E (FP32)
    max_tokens: int = 16384

    def __post_init__(self):
        for name, convert in _ENUM_FIELDS.items():
            setattr(self, name, convert(getattr(self, name)))

    def to_struct(self):
        s = ConfigStruct()
        lib().fp4moe_config_init(ctypes.byref(s))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in _ENUM_FIELDS or field.name in _BOOL_FIELDS:
                value = int(value)
            setattr(s, field.name, value)
        return s

    @classmethod
    def from_struct(cls, s):
        values = {f.name: getattr(s, f.name) for f in dataclasses.fields(cls)}
        for name in _BOOL_FIELDS:
            values[name] = bool(values[name])
        return cls(**values)

    @property
    def num_local_experts(self):
        """E_loc: local_num_experts, or every expert from local_expert_offset when 0."""
        if self.local_num_experts:
            return int(self.local_num_experts)
        return int(self.num_experts - self.local_expert_offset)

    @property
    def fc1_rows(self):
        s = self.to_struct()
        return int(lib().fp4moe_config_fc1_rows(ctypes.byref(s)))

    @property
    def is_gated(self):
        return self.activation in GATED_ACTIVATIONS

    def validate(self, ctx):
        s = self.to_struct()
        ctx.check(lib().fp4moe_config_validate(ctx.handle, ctypes.byref(s)),
                  "fp4moe_config_validate")


# ------------------------------------------------------------------------------ plan
def _aligned(address):
    return address % 256 == 0


class Plan:
    """A layer ready to run: the configuration and the (repacked) weights, on one context.

    Built by numpy_api.create_plan / torch_api.create_plan from arrays, or by deserialize.
    The C handle is freed by close() or when the Plan is garbage collected (after its context
    is kept alive by the reference held here)."""

    def __init__(self, ctx, handle):
        self.ctx = ctx
        self._handle = handle
        self._finalizer = weakref.finalize(self, lib().fp4moe_plan_destroy, handle)
        raw = ConfigStruct()
        ctx.check(lib().fp4moe_plan_get_config(handle, ctypes.byref(raw)),
                  "fp4moe_plan_get_config")
        self.config = Config.from_struct(raw)
        self._config_struct = raw
        ctx._plans.add(self)

    @property
    def handle(self):
        if self._handle is None:
            raise ValueError("fp4moe: the plan was closed")
        return self._handle

    def close(self):
        self._finalizer()
        self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        c = self.config
        return (f"fp4moe.Plan(E={c.num_experts}, k={c.top_k}, H={c.hidden_size}, "
                f"I={c.intermediate_size}, {c.activation.name.lower()}, "
                f"{c.routing.name.lower()}, {c.precision.name.lower()}, "
                f"{self.ctx.backend.name.lower()})")

    @property
    def backend(self):
        return self.ctx.backend

    def workspace_size(self, num_tokens=None):
        """Bytes of workspace for a call with num_tokens tokens (default: max_tokens)."""
        if num_tokens is None:
            num_tokens = self.config.max_tokens
        out = ctypes.c_size_t()
        self.ctx.check(lib().fp4moe_plan_workspace_size(self.handle, int(num_tokens),
                                                        ctypes.byref(out)),
                       "fp4moe_plan_workspace_size")
        return out.value

    # -- raw calls on addresses (the front-ends check shapes, dtypes and devices first)
    def forward_raw(self, *, num_tokens, hidden_states, hidden_dtype, output, output_dtype,
                    router_logits=None, router_logits_dtype=DType.F32, topk_ids=None,
                    topk_weights=None, topk_weights_dtype=DType.F32, per_token_scale=None,
                    skip_finalize=False, topk_ids_out=None, topk_weights_out=None,
                    workspace=None, workspace_bytes=0, stream=None):
        if workspace is not None and not _aligned(workspace):
            raise ValueError("fp4moe: the workspace must be 256-byte aligned")
        a = ForwardArgs()
        lib().fp4moe_forward_args_init(ctypes.byref(a))
        a.num_tokens = int(num_tokens)
        a.hidden_states = hidden_states
        a.hidden_dtype = int(hidden_dtype)
        a.router_logits = router_logits
        a.router_logits_dtype = int(router_logits_dtype)
        a.topk_ids = topk_ids
        a.topk_weights = topk_weights
        a.topk_weights_dtype = int(topk_weights_dtype)
        a.per_token_scale = per_token_scale
        a.output = output
        a.output_dtype = int(output_dtype)
        a.skip_finalize = 1 if skip_finalize else 0
        a.topk_ids_out = topk_ids_out
        a.topk_weights_out = topk_weights_out
        if topk_ids is not None:
            fn, name = lib().fp4moe_forward_routed, "fp4moe_forward_routed"
        else:
            fn, name = lib().fp4moe_forward, "fp4moe_forward"
        self.ctx.check(fn(self.handle, ctypes.byref(a), workspace, int(workspace_bytes), stream),
                       name)

    def route_raw(self, *, num_tokens, router_logits, router_logits_dtype, topk_ids_out,
                  topk_weights_out, workspace=None, workspace_bytes=0, stream=None):
        if workspace is not None and not _aligned(workspace):
            raise ValueError("fp4moe: the workspace must be 256-byte aligned")
        self.ctx.check(lib().fp4moe_route(self.handle, int(num_tokens), router_logits,
                                          int(router_logits_dtype), topk_ids_out,
                                          topk_weights_out, workspace, int(workspace_bytes),
                                          stream), "fp4moe_route")

    # -- serialisation
    def serialize(self):
        """The whole plan (attributes and weights) as versioned, checksummed bytes."""
        size = ctypes.c_size_t()
        self.ctx.check(lib().fp4moe_plan_serialized_size(self.handle, ctypes.byref(size)),
                       "fp4moe_plan_serialized_size")
        buffer = ctypes.create_string_buffer(size.value)
        written = ctypes.c_size_t()
        self.ctx.check(lib().fp4moe_plan_serialize(self.handle, buffer, size.value,
                                                   ctypes.byref(written)),
                       "fp4moe_plan_serialize")
        return buffer.raw[:written.value]

    def save(self, path):
        data = self.serialize()
        with open(path, "wb") as f:
            f.write(data)

    @classmethod
    def deserialize(cls, ctx, data):
        data = bytes(data)
        handle = ctypes.c_void_p()
        ctx.check(lib().fp4moe_plan_deserialize(ctx.handle, data, len(data),
                                                ctypes.byref(handle)),
                  "fp4moe_plan_deserialize")
        return cls(ctx, handle.value)

    @classmethod
    def load(cls, ctx, path):
        with open(path, "rb") as f:
            return cls.deserialize(ctx, f.read())


def create_plan_raw(ctx, config, weights_struct):
    """fp4moe_plan_create on a filled WeightsStruct (host addresses kept alive by the caller)."""
    if not isinstance(config, Config):
        raise TypeError("fp4moe: config must be an fp4moe.Config")
    cfg = config.to_struct()
    handle = ctypes.c_void_p()
    ctx.check(lib().fp4moe_plan_create(ctx.handle, ctypes.byref(cfg), ctypes.byref(weights_struct),
                                       ctypes.byref(handle)), "fp4moe_plan_create")
    return Plan(ctx, handle.value)


def shape_error(what, got, expected):
    return InvalidArgumentError(Status.INVALID_ARGUMENT,
                                f"{what} has shape {tuple(got)}, expected {tuple(expected)}")
