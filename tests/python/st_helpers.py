"""Files written and read with the official `safetensors` package (PyPI), numpy codecs for BF16,
E2M1 and E4M3, and the float64 reference of an MoE layer, for the interop tests. Nothing here
comes from fp4moe: a bug there cannot hide in both."""
import json
import os
import subprocess

import numpy as np
import safetensors

# --------------------------------------------------------------------------- files
_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "U8": "uint8",
                "F8_E4M3": "float8_e4m3fn", "I32": "int32"}


def save(path, tensors, metadata=None):
    """tensors: name -> (dtype, shape, numpy array holding the raw elements)."""
    keep = []
    specs = {}
    for name, (dtype, shape, array) in tensors.items():
        array = np.ascontiguousarray(array)
        keep.append(array)
        if hasattr(safetensors, "TensorSpec"):
            specs[name] = safetensors.TensorSpec(dtype=_DTYPE_NAMES[dtype], shape=list(shape),
                                                 data_ptr=array.ctypes.data, data_len=array.nbytes)
        else:  # safetensors < 0.8 takes plain dicts
            specs[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data": array.tobytes()}
    safetensors.serialize_file(specs, str(path), metadata=metadata)


def load(path):
    """name -> (dtype, shape, bytes), through the official parser."""
    with open(path, "rb") as f:
        return {name: (v["dtype"], tuple(v["shape"]), bytes(v["data"]))
                for name, v in safetensors.deserialize(f.read())}


def as_array(entry):
    dtype, shape, data = entry
    np_dtype = {"F32": np.float32, "U8": np.uint8, "F8_E4M3": np.uint8, "I32": np.int32,
                "BF16": np.uint16, "F16": np.float16}[dtype]
    a = np.frombuffer(data, dtype=np_dtype).reshape(shape)
    return bf16_decode(a) if dtype == "BF16" else a


# --------------------------------------------------------------------------- number formats
def bf16_encode(x):
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_decode(bits):
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)


E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float64)


def e4m3_table():
    codes = np.arange(256)
    s = np.where(codes >> 7, -1.0, 1.0)
    e = (codes >> 3) & 15
    m = codes & 7
    v = np.where(e == 0, m / 8.0 * 2.0 ** -6, (1 + m / 8.0) * 2.0 ** (e - 7.0)) * s
    v[(e == 15) & (m == 7)] = np.nan
    return v


E4M3 = e4m3_table()


def unpack_e2m1(packed):
    lo = packed & 15
    hi = packed >> 4
    return E2M1[np.stack([lo, hi], axis=-1).reshape(packed.shape[:-1] + (packed.shape[-1] * 2,))]


def dequantize(packed, scales, ws2):
    """ModelOpt's formula: w = e2m1(code) * e4m3(weight_scale) * weight_scale_2, in float64."""
    v = unpack_e2m1(packed)
    s = np.repeat(E4M3[scales], 16, axis=-1)
    return v * s * float(ws2)


# --------------------------------------------------------------------------- the layer
def silu(x):
    return x / (1.0 + np.exp(-x))


def route(logits, method, k, bias=None, n_group=1, topk_group=1, norm=True, scale=1.0):
    """ids [T,k], weights [T,k] (spec section 4), ties to the lower index."""
    t_count, e_count = logits.shape
    ids = np.zeros((t_count, k), dtype=np.int64)
    weights = np.zeros((t_count, k))
    for t in range(t_count):
        x = logits[t].astype(np.float64)
        if method in ("renormalize_naive", "softmax_topk"):
            z = x + (bias if bias is not None else 0)
            p = np.exp(z - z.max())
            p /= p.sum()
            chosen = np.argsort(-p, kind="stable")[:k]
            w = p[chosen]
            if method == "renormalize_naive":
                w = w / w.sum()
        elif method == "deepseek_v3":
            s = 1.0 / (1.0 + np.exp(-x))
            b = s + (bias if bias is not None else 0)
            size = e_count // n_group
            groups = b.reshape(n_group, size)
            top = np.sort(groups, axis=1)[:, ::-1][:, : min(2, size)].sum(axis=1)
            kept = np.argsort(-top, kind="stable")[:topk_group]
            masked = np.full(e_count, -np.inf)
            for g in kept:
                masked[g * size:(g + 1) * size] = b[g * size:(g + 1) * size]
            chosen = np.argsort(-masked, kind="stable")[:k]
            w = s[chosen]
            if norm:
                w = w / w.sum()
            w = w * scale
        else:
            raise ValueError(method)
        ids[t] = chosen
        weights[t] = w
    return ids, weights


def moe_reference(x, ids, weights, fc1, fc2, activation, bf16_fc2_input=False):
    """out[t] = sum_j w[t,j] * FC2_e(act(FC1_e(x[t]))), float64. fc1[e]: (gate, up) or up alone.
    bf16_fc2_input: the activation's output rounded to BF16, as docs/DESIGN.md has it on a BF16
    call (FC2's input is 16-bit, as on tensor cores)."""
    out = np.zeros((x.shape[0], fc2[0].shape[0]))
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            if activation == "swiglu":
                gate, up = fc1[e]
                a = silu(gate @ x[t]) * (up @ x[t])
            elif activation == "relu2":
                a = np.maximum(fc1[e] @ x[t], 0) ** 2
            else:
                raise ValueError(activation)
            if bf16_fc2_input:
                a = bf16_decode(bf16_encode(a)).astype(np.float64)
            out[t] += weights[t, j] * (fc2[e] @ a)
    return out


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# --------------------------------------------------------------------------- the CLI
def cli():
    path = os.environ.get("FP4MOE_CLI")
    if not path:
        here = os.path.dirname(os.path.abspath(__file__))
        path = os.path.join(here, "..", "..", "build", "fp4moe")
    return path


def run_cli(*args, check=True):
    r = subprocess.run([cli(), *map(str, args)], capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"fp4moe {' '.join(map(str, args))} failed ({r.returncode}):\n"
                             f"{r.stdout}\n{r.stderr}")
    return r


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
