"""Enum values from the names people write ("swiglu", "deepseek_v3", "bf16", torch dtypes...)."""
from ._lib import Activation, Backend, DType, GateUpOrder, Precision, Routing, ScaleLayout


def _lookup(enum_type, value, aliases, what):
    if isinstance(value, enum_type):
        return value
    if isinstance(value, bool):
        raise TypeError(f"{what}: expected a name or {enum_type.__name__}, got {value!r}")
    if isinstance(value, int):
        try:
            return enum_type(value)
        except ValueError:
            raise ValueError(f"{what}: {value} is not a valid {enum_type.__name__}") from None
    if isinstance(value, str):
        key = value.strip().lower().replace("-", "_")
        key = aliases.get(key, key)
        for member in enum_type:
            if member.name.lower() == key:
                return member
        names = sorted({m.name.lower() for m in enum_type} | set(aliases))
        raise ValueError(f"{what}: unknown name {value!r}; expected one of {', '.join(names)}")
    raise TypeError(f"{what}: expected a name or {enum_type.__name__}, got {type(value).__name__}")


def backend(value):
    return _lookup(Backend, value, {"gpu": "cuda", "host": "cpu"}, "backend")


def activation(value):
    return _lookup(Activation, value, {"swiglu_oai": "swiglu", "silu_and_mul": "swiglu",
                                       "gelu_and_mul": "geglu", "relu_squared": "relu2",
                                       "squared_relu": "relu2", "gelu_erf": "gelu",
                                       "none": "identity"}, "activation")


def routing(value):
    return _lookup(Routing, value, {"default": "softmax_topk", "deepseekv3": "deepseek_v3",
                                    "deepseek": "deepseek_v3", "renormalizenaive":
                                    "renormalize_naive", "sigmoidrenorm": "sigmoid_renorm",
                                    "topksigmoid": "topk_sigmoid"}, "routing")


def precision(value):
    return _lookup(Precision, value, {"w4a4_faithful": "w4a4"}, "precision")


def gate_up_order(value):
    return _lookup(GateUpOrder, value, {"w1w3": "gate_up", "w3w1": "up_gate"}, "gate_up_order")


def scale_layout(value):
    return _lookup(ScaleLayout, value, {"swizzled": "swizzled_128x4", "128x4": "swizzled_128x4",
                                        "interleaved": "swizzled_128x4"}, "scale_layout")


def dtype(value):
    return _lookup(DType, value, {"float32": "f32", "float": "f32", "float16": "f16",
                                  "half": "f16", "bfloat16": "bf16", "int32": "i32",
                                  "uint8": "u8", "float8_e4m3fn": "e4m3", "fp8": "e4m3"},
                   "dtype")
