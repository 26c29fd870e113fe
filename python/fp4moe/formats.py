"""NVFP4 formats on NumPy arrays: codecs, quantise/dequantise, scale layouts.

These are the library's host functions (bit-identical to what the plans use). Each takes an
optional `ctx` for its error messages; by default a CPU context private to the calling thread.
"""
import ctypes
import threading

import numpy as np

from . import _names, _tensors
from ._lib import DType, ScaleLayout, lib
from .core import Context
from .numpy_api import dtype_code

_thread_state = threading.local()


def _ctx(ctx):
    if ctx is not None:
        return ctx
    if getattr(_thread_state, "ctx", None) is None:
        _thread_state.ctx = Context("cpu", num_threads=1)
    return _thread_state.ctx


def _float_input(name, x):
    a = np.ascontiguousarray(x)
    code = dtype_code(a)
    if code not in _tensors.FLOAT_DTYPES:
        a = np.ascontiguousarray(a, dtype=np.float32)
        code = DType.F32
    return a, code


# ------------------------------------------------------------------------------ scalar codecs
def e2m1_to_float(code):
    return float(lib().fp4moe_e2m1_to_float(int(code) & 0xFF))


def e4m3_to_float(code):
    return float(lib().fp4moe_e4m3_to_float(int(code) & 0xFF))


def float_to_e2m1(x):
    return int(lib().fp4moe_float_to_e2m1(float(x)))


def float_to_e4m3(x):
    return int(lib().fp4moe_float_to_e4m3(float(x)))


def bf16_to_float(bits):
    return float(lib().fp4moe_bf16_to_float(int(bits) & 0xFFFF))


def float_to_bf16(x):
    return int(lib().fp4moe_float_to_bf16(float(x)))


def f16_to_float(bits):
    return float(lib().fp4moe_f16_to_float(int(bits) & 0xFFFF))


def float_to_f16(x):
    return int(lib().fp4moe_float_to_f16(float(x)))


# Whole-array versions in NumPy (the C functions are per value). Tables come from the library.
def e2m1_table():
    """The 16 E2M1 values by code, float32."""
    return np.array([lib().fp4moe_e2m1_to_float(c) for c in range(16)], np.float32)


def e4m3_table():
    """The 256 E4M3 values by code, float32 (NaN at 0x7f and 0xff)."""
    return np.array([lib().fp4moe_e4m3_to_float(c) for c in range(256)], np.float32)


def to_bf16(x):
    """float32 values -> bfloat16 bit patterns (uint16), round to nearest even, NaN kept."""
    f = np.ascontiguousarray(x, dtype=np.float32)
    bits = f.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(f)
    return np.where(nan, ((bits >> 16) | 0x40).astype(np.uint16), rounded)


def from_bf16(bits):
    """bfloat16 bit patterns (uint16) -> float32."""
    b = np.ascontiguousarray(bits, dtype=np.uint16)
    return (b.astype(np.uint32) << 16).view(np.float32)


def unpack_e2m1(packed, cols=None):
    """Packed [..., cols/2] uint8 -> codes [..., cols] (element 2i in the low nibble)."""
    p = np.asarray(packed, dtype=np.uint8)
    codes = np.stack([p & 0xF, p >> 4], axis=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    return codes if cols is None else codes[..., :cols]


def pack_e2m1(codes):
    """Codes [..., cols] (cols even) -> packed [..., cols/2] uint8."""
    c = np.asarray(codes, dtype=np.uint8) & 0xF
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


# ------------------------------------------------------------------------------ NVFP4
def scale_bytes(rows, cols, layout="linear"):
    """Bytes of one [rows, cols/16] scale matrix in a layout; 0 for invalid arguments."""
    return int(lib().fp4moe_scale_bytes(int(rows), int(cols), int(_names.scale_layout(layout))))


def swizzled_scale_offset(row, scale_col, scale_cols):
    return int(lib().fp4moe_swizzled_scale_offset(int(row), int(scale_col), int(scale_cols)))


def global_scale(x, ctx=None):
    """g = 6*448/amax of a tensor (1 when amax is 0 or not finite)."""
    ctx = _ctx(ctx)
    a, code = _float_input("x", x)
    out = ctypes.c_float()
    ctx.check(lib().fp4moe_nvfp4_global_scale(ctx.handle, a.ctypes.data, int(code), a.size,
                                              ctypes.byref(out)), "fp4moe_nvfp4_global_scale")
    return float(out.value)


def _scale_array(rows, cols, layout, lead=()):
    n = scale_bytes(rows, cols, layout)
    if layout == ScaleLayout.LINEAR:
        return np.empty((*lead, rows, cols // 16), np.uint8)
    return np.empty((*lead, n), np.uint8)


_global_scale = global_scale  # quantize's parameter shadows the function


def quantize(x, global_scale=None, layout="linear", ctx=None):
    """NVFP4 quantisation of a [rows, cols] matrix with quantisation scale g (default: the
    matrix's own 6*448/amax). Returns (packed [rows, cols/2] uint8, scales uint8 in `layout`:
    linear [rows, cols/16] or swizzled flat bytes, global dequantisation scale 1/g)."""
    ctx = _ctx(ctx)
    a, code = _float_input("x", x)
    if a.ndim != 2:
        raise _tensors.invalid(f"x has shape {a.shape}, expected [rows, cols]")
    layout = _names.scale_layout(layout)
    rows, cols = a.shape
    if cols % 16:
        raise _tensors.invalid(f"x has {cols} columns, expected a multiple of 16")
    g = _global_scale(a, ctx) if global_scale is None else float(global_scale)
    packed = np.empty((rows, cols // 2), np.uint8)
    scales = _scale_array(rows, cols, layout)
    ctx.check(lib().fp4moe_nvfp4_quantize(ctx.handle, a.ctypes.data, int(code), rows, cols,
                                          g, packed.ctypes.data, scales.ctypes.data,
                                          int(layout)), "fp4moe_nvfp4_quantize")
    return packed, scales, np.float32(1.0) / np.float32(g)


def dequantize(packed, scales, global_dequant_scale, cols=None, layout="linear", ctx=None):
    """v = e2m1 * e4m3 * global_dequant_scale, as float32 [rows, cols]."""
    ctx = _ctx(ctx)
    p = np.ascontiguousarray(packed, dtype=np.uint8)
    s = np.ascontiguousarray(scales).view(np.uint8) if np.asarray(scales).dtype.itemsize == 1 \
        else None
    if s is None:
        raise _tensors.invalid("scales must be a 1-byte type (uint8 or float8_e4m3fn)")
    if p.ndim != 2:
        raise _tensors.invalid(f"packed has shape {p.shape}, expected [rows, cols/2]")
    rows = p.shape[0]
    cols = p.shape[1] * 2 if cols is None else int(cols)
    if p.shape[1] * 2 != cols:
        raise _tensors.invalid(f"packed has shape {p.shape}, expected [{rows}, {cols // 2}]")
    layout = _names.scale_layout(layout)
    need = scale_bytes(rows, cols, layout)
    if s.size != need:
        raise _tensors.invalid(f"scales hold {s.size} bytes, expected {need} "
                               f"({layout.name.lower()} scales of [{rows}, {cols}])")
    out = np.empty((rows, cols), np.float32)
    ctx.check(lib().fp4moe_nvfp4_dequantize(ctx.handle, p.ctypes.data, s.ctypes.data,
                                            int(layout), rows, cols,
                                            float(global_dequant_scale), out.ctypes.data),
              "fp4moe_nvfp4_dequantize")
    return out


def quantize_experts(x, layout="linear", ctx=None):
    """[experts, rows, cols] -> (packed [experts, rows, cols/2], scales per expert in layout,
    global dequantisation scales [experts] float32 = 1/g, ModelOpt's weight_scale_2)."""
    ctx = _ctx(ctx)
    a, code = _float_input("x", x)
    if a.ndim != 3:
        raise _tensors.invalid(f"x has shape {a.shape}, expected [experts, rows, cols]")
    layout = _names.scale_layout(layout)
    experts, rows, cols = a.shape
    if cols % 16:
        raise _tensors.invalid(f"x has {cols} columns, expected a multiple of 16")
    packed = np.empty((experts, rows, cols // 2), np.uint8)
    scales = _scale_array(rows, cols, layout, (experts,))
    dequant = np.empty((experts,), np.float32)
    ctx.check(lib().fp4moe_nvfp4_quantize_experts(ctx.handle, a.ctypes.data, int(code), experts,
                                                  rows, cols, packed.ctypes.data,
                                                  scales.ctypes.data, int(layout),
                                                  dequant.ctypes.data),
              "fp4moe_nvfp4_quantize_experts")
    return packed, scales, dequant


def convert_scales(scales, rows, cols, in_layout, out_layout, ctx=None):
    """One [rows, cols/16] scale matrix from one layout to another (padding written as 0).
    Linear results are [rows, cols/16]; swizzled ones flat bytes."""
    ctx = _ctx(ctx)
    in_layout, out_layout = _names.scale_layout(in_layout), _names.scale_layout(out_layout)
    s = np.ascontiguousarray(scales)
    if s.dtype.itemsize != 1:
        raise _tensors.invalid("scales must be a 1-byte type (uint8 or float8_e4m3fn)")
    s = s.view(np.uint8)
    need = scale_bytes(rows, cols, in_layout)
    if need == 0 or s.size != need:
        raise _tensors.invalid(f"scales hold {s.size} bytes, expected {need} "
                               f"({in_layout.name.lower()} scales of [{rows}, {cols}])")
    out = _scale_array(rows, cols, out_layout)
    ctx.check(lib().fp4moe_scales_convert(ctx.handle, s.ctypes.data, int(in_layout),
                                          out.ctypes.data, int(out_layout), int(rows),
                                          int(cols)), "fp4moe_scales_convert")
    return out
