"""The ctypes view of include/fp4moe.h: library loading, enums, structs and prototypes.

Every struct here mirrors the C header field by field, in order, with the same C types, so that
ctypes computes the same offsets as the compiler; python/tests/test_layout.py checks each offset
and size against a program compiled from the header.
"""
import ctypes
import enum
import os
import pathlib

# ------------------------------------------------------------------------------ enumerations
# The values are the header's; C enums are int-sized on every ABI we target.


class Status(enum.IntEnum):
    SUCCESS = 0
    INVALID_ARGUMENT = 1
    UNSUPPORTED = 2
    OUT_OF_MEMORY = 3
    WORKSPACE_TOO_SMALL = 4
    CORRUPT_DATA = 5
    VERSION_MISMATCH = 6
    BACKEND_UNAVAILABLE = 7
    CUDA = 8
    INTERNAL = 9


class DType(enum.IntEnum):
    F32 = 0
    F16 = 1
    BF16 = 2
    I32 = 3
    U8 = 4
    E4M3 = 5


class Backend(enum.IntEnum):
    AUTO = 0
    CPU = 1
    CUDA = 2


class Activation(enum.IntEnum):
    SWIGLU = 0
    GEGLU = 1
    GEGLU_TANH = 2
    RELU2 = 3
    SILU = 4
    GELU = 5
    IDENTITY = 6


class Routing(enum.IntEnum):
    """Values equal FlashInfer's RoutingMethodType."""
    SOFTMAX_TOPK = 0
    RENORMALIZE = 1
    DEEPSEEK_V3 = 2
    LLAMA4 = 3
    RENORMALIZE_NAIVE = 4
    TOPK = 5
    SIGMOID_RENORM = 6
    MINIMAX2 = 7
    SIGMOID = 8
    TOPK_SIGMOID = 9


class Precision(enum.IntEnum):
    W4A16 = 0
    W4A4 = 1


class GateUpOrder(enum.IntEnum):
    GATE_UP = 0
    UP_GATE = 1


class ScaleLayout(enum.IntEnum):
    LINEAR = 0
    SWIZZLED_128x4 = 1


GATED_ACTIVATIONS = (Activation.SWIGLU, Activation.GEGLU, Activation.GEGLU_TANH)

# ------------------------------------------------------------------------------ structs
_enum = ctypes.c_int
_f32p = ctypes.POINTER(ctypes.c_float)
_u8p = ctypes.POINTER(ctypes.c_uint8)
_i32p = ctypes.POINTER(ctypes.c_int32)


class ContextOptions(ctypes.Structure):
    _fields_ = [
        ("backend", _enum),
        ("num_threads", ctypes.c_int),
        ("cuda_device", ctypes.c_int),
    ]


class ConfigStruct(ctypes.Structure):
    _fields_ = [
        ("num_experts", ctypes.c_int64),
        ("top_k", ctypes.c_int32),
        ("hidden_size", ctypes.c_int64),
        ("intermediate_size", ctypes.c_int64),
        ("activation", _enum),
        ("swiglu_alpha", ctypes.c_float),
        ("swiglu_beta", ctypes.c_float),
        ("swiglu_limit", ctypes.c_float),
        ("gate_up_order", _enum),
        ("routing", _enum),
        ("n_group", ctypes.c_int32),
        ("topk_group", ctypes.c_int32),
        ("norm_topk_prob", ctypes.c_int32),
        ("routed_scaling_factor", ctypes.c_float),
        ("apply_router_weight_on_input", ctypes.c_int32),
        ("local_expert_offset", ctypes.c_int64),
        ("local_num_experts", ctypes.c_int64),
        ("precision", _enum),
        ("fc2_input_fp8", ctypes.c_int32),
        ("decode_threshold", ctypes.c_int64),
        ("max_tokens", ctypes.c_int64),
    ]


class WeightsStruct(ctypes.Structure):
    # Pointers are declared void* (c_void_p) where the header has typed pointers: same size and
    # alignment, and it lets callers assign plain integer addresses.
    _fields_ = [
        ("w1", ctypes.c_void_p),
        ("w1_scale", ctypes.c_void_p),
        ("w1_global_scale", ctypes.c_void_p),
        ("w1_global_scale_half2", ctypes.c_void_p),
        ("w2", ctypes.c_void_p),
        ("w2_scale", ctypes.c_void_p),
        ("w2_global_scale", ctypes.c_void_p),
        ("w1_scale_layout", _enum),
        ("w2_scale_layout", _enum),
        ("b1", ctypes.c_void_p),
        ("b2", ctypes.c_void_p),
        ("routing_bias", ctypes.c_void_p),
        ("a1_global_scale", ctypes.c_void_p),
        ("a2_global_scale", ctypes.c_void_p),
        ("fc2_input_fp8_scale", ctypes.c_void_p),
        ("swiglu_alpha", ctypes.c_void_p),
        ("swiglu_beta", ctypes.c_void_p),
        ("swiglu_limit", ctypes.c_void_p),
    ]


class ForwardArgs(ctypes.Structure):
    _fields_ = [
        ("num_tokens", ctypes.c_int64),
        ("hidden_states", ctypes.c_void_p),
        ("hidden_dtype", _enum),
        ("router_logits", ctypes.c_void_p),
        ("router_logits_dtype", _enum),
        ("topk_ids", ctypes.c_void_p),
        ("topk_weights", ctypes.c_void_p),
        ("topk_weights_dtype", _enum),
        ("per_token_scale", ctypes.c_void_p),
        ("output", ctypes.c_void_p),
        ("output_dtype", _enum),
        ("skip_finalize", ctypes.c_int32),
        ("topk_ids_out", ctypes.c_void_p),
        ("topk_weights_out", ctypes.c_void_p),
    ]


STRUCTS = {
    "fp4moe_context_options": ContextOptions,
    "fp4moe_config": ConfigStruct,
    "fp4moe_weights": WeightsStruct,
    "fp4moe_forward_args": ForwardArgs,
}

# ------------------------------------------------------------------------------ prototypes
_vp = ctypes.c_void_p
_sz = ctypes.c_size_t
_i64 = ctypes.c_int64
_szp = ctypes.POINTER(ctypes.c_size_t)
_vpp = ctypes.POINTER(ctypes.c_void_p)

# name: (restype, argtypes). Opaque handles (context, plan) travel as void*.
PROTOTYPES = {
    "fp4moe_version": (ctypes.c_int, []),
    "fp4moe_status_string": (ctypes.c_char_p, [_enum]),
    "fp4moe_context_options_init": (None, [ctypes.POINTER(ContextOptions)]),
    "fp4moe_context_create": (_enum, [ctypes.POINTER(ContextOptions), _vpp]),
    "fp4moe_context_destroy": (None, [_vp]),
    "fp4moe_context_backend": (_enum, [_vp]),
    "fp4moe_context_description": (ctypes.c_char_p, [_vp]),
    "fp4moe_last_error": (ctypes.c_char_p, [_vp]),
    "fp4moe_buffer_alloc": (_enum, [_vp, _sz, _vpp]),
    "fp4moe_buffer_free": (None, [_vp, _vp]),
    "fp4moe_buffer_upload": (_enum, [_vp, _vp, _vp, _sz]),
    "fp4moe_buffer_download": (_enum, [_vp, _vp, _vp, _sz]),
    "fp4moe_synchronize": (_enum, [_vp, _vp]),
    "fp4moe_config_init": (None, [ctypes.POINTER(ConfigStruct)]),
    "fp4moe_config_validate": (_enum, [_vp, ctypes.POINTER(ConfigStruct)]),
    "fp4moe_config_fc1_rows": (_i64, [ctypes.POINTER(ConfigStruct)]),
    "fp4moe_plan_create": (_enum, [_vp, ctypes.POINTER(ConfigStruct),
                                   ctypes.POINTER(WeightsStruct), _vpp]),
    "fp4moe_plan_destroy": (None, [_vp]),
    "fp4moe_plan_get_config": (_enum, [_vp, ctypes.POINTER(ConfigStruct)]),
    "fp4moe_plan_workspace_size": (_enum, [_vp, _i64, _szp]),
    "fp4moe_forward_args_init": (None, [ctypes.POINTER(ForwardArgs)]),
    "fp4moe_forward": (_enum, [_vp, ctypes.POINTER(ForwardArgs), _vp, _sz, _vp]),
    "fp4moe_forward_routed": (_enum, [_vp, ctypes.POINTER(ForwardArgs), _vp, _sz, _vp]),
    "fp4moe_route": (_enum, [_vp, _i64, _vp, _enum, _vp, _vp, _vp, _sz, _vp]),
    "fp4moe_plan_serialized_size": (_enum, [_vp, _szp]),
    "fp4moe_plan_serialize": (_enum, [_vp, _vp, _sz, _szp]),
    "fp4moe_plan_deserialize": (_enum, [_vp, _vp, _sz, _vpp]),
    "fp4moe_e2m1_to_float": (ctypes.c_float, [ctypes.c_uint8]),
    "fp4moe_e4m3_to_float": (ctypes.c_float, [ctypes.c_uint8]),
    "fp4moe_float_to_e2m1": (ctypes.c_uint8, [ctypes.c_float]),
    "fp4moe_float_to_e4m3": (ctypes.c_uint8, [ctypes.c_float]),
    "fp4moe_bf16_to_float": (ctypes.c_float, [ctypes.c_uint16]),
    "fp4moe_float_to_bf16": (ctypes.c_uint16, [ctypes.c_float]),
    "fp4moe_f16_to_float": (ctypes.c_float, [ctypes.c_uint16]),
    "fp4moe_float_to_f16": (ctypes.c_uint16, [ctypes.c_float]),
    "fp4moe_nvfp4_global_scale": (_enum, [_vp, _vp, _enum, _i64, _f32p]),
    "fp4moe_nvfp4_quantize": (_enum, [_vp, _vp, _enum, _i64, _i64, ctypes.c_float, _vp, _vp,
                                      _enum]),
    "fp4moe_nvfp4_dequantize": (_enum, [_vp, _vp, _vp, _enum, _i64, _i64, ctypes.c_float, _vp]),
    "fp4moe_nvfp4_quantize_experts": (_enum, [_vp, _vp, _enum, _i64, _i64, _i64, _vp, _vp, _enum,
                                              _vp]),
    "fp4moe_scale_bytes": (_sz, [_i64, _i64, _enum]),
    "fp4moe_scales_convert": (_enum, [_vp, _vp, _enum, _vp, _enum, _i64, _i64]),
    "fp4moe_swizzled_scale_offset": (_i64, [_i64, _i64, _i64]),
}

# The ModelOpt checkpoint loader (include/fp4moe_checkpoint.h) is bound in checkpoint.py when
# the loaded library exports it; see OPTIONAL_PROTOTYPES there.

# ------------------------------------------------------------------------------ loading
_LIBRARY_NAMES = ("libfp4moe.so", "libfp4moe.so.0", "libfp4moe.dylib", "fp4moe.dll")


def _candidate_paths():
    """FP4MOE_LIBRARY, else a copy inside the package, else the repository's build folders."""
    env = os.environ.get("FP4MOE_LIBRARY")
    if env:
        yield pathlib.Path(env)
        return
    package_dir = pathlib.Path(__file__).resolve().parent
    for name in _LIBRARY_NAMES:
        yield package_dir / name
    repo_root = package_dir.parent.parent  # python/fp4moe -> repository root (source checkout)
    for build in ("build", "build-python"):
        for name in _LIBRARY_NAMES:
            yield repo_root / build / name


def find_library():
    tried = []
    for path in _candidate_paths():
        tried.append(str(path))
        if path.is_file():
            return path
    raise OSError("fp4moe: shared library not found; set FP4MOE_LIBRARY to libfp4moe.so "
                  "(built by `cmake --build build --target fp4moe`). Tried: " + ", ".join(tried))


def _bind(lib, name, restype, argtypes):
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = argtypes
    return fn


class _Library:
    """The loaded library, with every prototype set; attributes are the C functions."""

    def __init__(self, path):
        self.path = str(path)
        self._dll = ctypes.CDLL(self.path)
        missing = []
        for name, (restype, argtypes) in PROTOTYPES.items():
            try:
                setattr(self, name, _bind(self._dll, name, restype, argtypes))
            except AttributeError:
                missing.append(name)
        if missing:
            raise OSError(f"fp4moe: {self.path} lacks {', '.join(missing)} (an older build?)")

    def has(self, name):
        return hasattr(self._dll, name)

    def bind_optional(self, name, restype, argtypes):
        """Binds a function that only newer builds export; None when absent."""
        try:
            fn = _bind(self._dll, name, restype, argtypes)
        except AttributeError:
            return None
        setattr(self, name, fn)
        return fn


_library = None


def lib():
    """The library, loaded on first use (importing the package never fails for want of it)."""
    global _library  # the process-wide handle of a loaded DLL, set once
    if _library is None:
        _library = _Library(find_library())
    return _library


# ------------------------------------------------------------------------------ errors
class Fp4moeError(RuntimeError):
    """A failing fp4moe call: .status (Status) and .message (fp4moe_last_error)."""

    def __init__(self, status, message, function=""):
        self.status = Status(status) if status in Status._value2member_map_ else status
        self.message = message
        self.function = function
        text = status_string(status)
        if function:
            text = f"{function}: {text}"
        if message:
            text = f"{text}: {message}"
        super().__init__(text)


class InvalidArgumentError(Fp4moeError, ValueError):
    pass


class UnsupportedError(Fp4moeError, NotImplementedError):
    pass


class OutOfMemoryError(Fp4moeError, MemoryError):
    pass


class CorruptDataError(Fp4moeError, ValueError):
    pass


class BackendUnavailableError(Fp4moeError):
    pass


_ERROR_CLASSES = {
    Status.INVALID_ARGUMENT: InvalidArgumentError,
    Status.WORKSPACE_TOO_SMALL: InvalidArgumentError,
    Status.UNSUPPORTED: UnsupportedError,
    Status.OUT_OF_MEMORY: OutOfMemoryError,
    Status.CORRUPT_DATA: CorruptDataError,
    Status.VERSION_MISMATCH: CorruptDataError,
    Status.BACKEND_UNAVAILABLE: BackendUnavailableError,
}


def status_string(status):
    text = lib().fp4moe_status_string(int(status))
    return text.decode() if text else "unknown status"


def check(status, ctx_handle=None, function=""):
    """Raises the exception of a failing status, with the context's last error message."""
    if status == Status.SUCCESS:
        return
    message = ""
    if ctx_handle:
        raw = lib().fp4moe_last_error(ctx_handle)
        message = raw.decode(errors="replace") if raw else ""
    cls = _ERROR_CLASSES.get(status, Fp4moeError)
    raise cls(status, message, function)
