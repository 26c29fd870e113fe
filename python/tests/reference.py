"""A NumPy float64 reference of the NVFP4 MoE layer (docs/DESIGN.md, "The function, exactly"),
written from the spec with its own codecs: it shares no code with the library or the package.

Where the contract rounds (16-bit FC2 inputs, the W4A4 quantiser) the reference rounds its
float64 value, which can land on the other side of a boundary from the library's FP32 value:
the tests allow for that with their tolerances.
"""
import math

import numpy as np

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                 -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def e4m3_value(code):
    code = int(code)
    sign = -1.0 if code & 0x80 else 1.0
    exponent, mantissa = (code >> 3) & 0xF, code & 7
    if exponent == 15 and mantissa == 7:
        return math.nan
    if exponent == 0:
        return sign * mantissa / 8.0 * 2.0 ** -6
    return sign * (1.0 + mantissa / 8.0) * 2.0 ** (exponent - 7)


E4M3 = np.array([e4m3_value(c) for c in range(256)])
E4M3_POSITIVE = np.unique(E4M3[:0x7F][~np.isnan(E4M3[:0x7F])])


def round_to_grid(x, grid):
    """Nearest grid value (ties to the even index: the mantissa's last bit), saturating."""
    ax = np.minimum(np.abs(x), grid[-1])
    hi = np.clip(np.searchsorted(grid, ax), 1, len(grid) - 1)
    lo = hi - 1
    d_lo, d_hi = ax - grid[lo], grid[hi] - ax
    pick = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
    return np.sign(x) * grid[pick]


def dequantize(packed, scales, global_scale):
    """[rows, cols/2] codes and linear [rows, cols/16] E4M3 scales -> float64 [rows, cols]."""
    codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
    values = E2M1[codes]
    block = E4M3[scales].repeat(16, axis=1)
    return values * block * float(global_scale)


def fake_quantize(x, g):
    """NVFP4 quantise-dequantise of the rows of x with quantisation scale g, without 1/g:
    codes times block scales (spec section 2, in float64)."""
    blocks = x.reshape(*x.shape[:-1], -1, 16)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    s = round_to_grid(g * amax / 6.0, E4M3_POSITIVE)
    with np.errstate(divide="ignore", invalid="ignore"):
        out_scale = np.where(amax != 0, 1.0 / (s / g), 0.0)
    q = round_to_grid(blocks * out_scale, E2M1_GRID)
    return (q * s).reshape(x.shape)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def topk_indices(scores, k):
    """Best first; ties toward the lower index (a stable sort of the negated scores)."""
    return np.argsort(-scores, kind="stable")[:k]


def route(logits, method, k, bias=None, n_group=1, topk_group=1, norm=True, scale=1.0):
    """One token's routing: (ids [k], weights [k]) in float64."""
    x = np.asarray(logits, np.float64)
    b = np.zeros_like(x) if bias is None else np.asarray(bias, np.float64)
    if method in ("softmax_topk", "renormalize_naive"):
        p = softmax(x + b)
        ids = topk_indices(p, k)
        w = p[ids]
        if method == "renormalize_naive":
            w = w / w.sum()
    elif method == "renormalize":
        ids = topk_indices(x + b, k)
        w = softmax((x + b)[ids])
    elif method == "topk":
        ids = topk_indices(x, k)
        w = x[ids]
    elif method in ("sigmoid", "sigmoid_renorm"):
        s = sigmoid(x)
        ids = topk_indices(s, k)
        w = s[ids]
        if method == "sigmoid_renorm" and norm:
            w = w / max(w.sum(), 1e-20)
    elif method == "topk_sigmoid":
        ids = topk_indices(x, k)
        w = sigmoid(x[ids])
    elif method == "deepseek_v3":
        s = sigmoid(x)
        biased = s + b
        groups = biased.reshape(n_group, -1)
        top = min(2, groups.shape[1])
        group_scores = np.sort(groups, axis=1)[:, ::-1][:, :top].sum(axis=1)
        kept = topk_indices(group_scores, topk_group)
        masked = np.full_like(biased, -np.inf)
        size = groups.shape[1]
        for g in kept:
            masked[g * size:(g + 1) * size] = biased[g * size:(g + 1) * size]
        ids = topk_indices(masked, k)
        w = s[ids]
        if norm:
            w = w / w.sum()
        w = w * scale
    elif method == "minimax2":
        s = sigmoid(x)
        ids = topk_indices(s + b, k)
        w = s[ids] * scale / (s[ids].sum() + 1e-20)
    elif method == "llama4":
        ids = topk_indices(x, 1)
        w = sigmoid(x[ids])
    else:
        raise ValueError(method)
    return ids.astype(np.int32), w


def gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def activation(h, name, order, i, alpha=1.0, beta=0.0, limit=math.inf):
    if name in ("swiglu", "geglu", "geglu_tanh"):
        first, second = h[:i], h[i:]
        gate, up = (first, second) if order == "gate_up" else (second, first)
        if name == "swiglu":
            gate = np.minimum(gate, limit)
            up = np.clip(up, -limit, limit)
            return gate * sigmoid(alpha * gate) * (up + beta)
        return (gelu(gate) if name == "geglu" else gelu_tanh(gate)) * up
    if name == "relu2":
        return np.maximum(h, 0.0) ** 2
    if name == "silu":
        return h * sigmoid(h)
    if name == "gelu":
        return gelu(h)
    if name == "identity":
        return h
    raise ValueError(name)


def round_bf16(x):
    """float64 -> nearest bfloat16 value (ties to even), via float32 bits."""
    f = np.asarray(x, np.float64)
    # Round the float64 to bf16 directly: 8 significant bits.
    m, e = np.frexp(f)
    return np.ldexp(np.round(m * 256.0), e - 8)  # np.round ties to even


def round_act(x, act_dtype):
    if act_dtype == "f32":
        return x
    if act_dtype == "f16":
        return np.asarray(x, np.float64).astype(np.float16).astype(np.float64)
    return round_bf16(x)


class Layer:
    """Canonical weights (linear scales) and attributes, as plain NumPy arrays and names."""

    def __init__(self, E, k, H, I, *, activation="swiglu", order="gate_up",
                 routing="renormalize", n_group=1, topk_group=1, norm=True, scale=1.0,
                 e0=0, e_loc=None, precision="w4a16", alpha=None, beta=None, limit=None,
                 on_input=False, **weights):
        self.E, self.k, self.H, self.I = E, k, H, I
        self.activation, self.order, self.routing = activation, order, routing
        self.n_group, self.topk_group, self.norm, self.scale = n_group, topk_group, norm, scale
        self.e0 = e0
        self.e_loc = e_loc if e_loc else E - e0
        self.precision = precision
        self.alpha, self.beta, self.limit = alpha, beta, limit
        self.on_input = on_input or routing == "llama4"
        self.w = weights

    def expert(self, e, x, act_dtype):
        w = self.w
        gated = self.activation in ("swiglu", "geglu", "geglu_tanh")
        if self.precision == "w4a4":
            g1 = float(np.float32(w["a1_global_scale"][e]))
            a = fake_quantize(x, g1)
            sa = float(np.float32(1.0) / np.float32(g1))
        else:
            a, sa = x, 1.0
        wq1 = dequantize(w["w1"][e], w["w1_scale"][e], 1.0)
        n1 = wq1.shape[0]
        glob = np.full(n1, float(np.float32(sa) * np.float32(w["w1_global_scale"][e])))
        if w.get("w1_global_scale_half2") is not None and gated:
            glob[self.I:] = float(np.float32(sa) * np.float32(w["w1_global_scale_half2"][e]))
        h = (wq1 @ a) * glob
        if w.get("b1") is not None:
            h = h + w["b1"][e]
        params = {}
        if self.activation == "swiglu":
            params = dict(alpha=self.alpha[e] if self.alpha is not None else 1.0,
                          beta=self.beta[e] if self.beta is not None else 0.0,
                          limit=self.limit[e] if self.limit is not None else math.inf)
        u = round_act(activation(h, self.activation, self.order, self.I, **params), act_dtype)
        if self.precision == "w4a4":
            g2 = float(np.float32(w["a2_global_scale"][e]))
            c = fake_quantize(u, g2)
            sc = float(np.float32(1.0) / np.float32(g2))
        else:
            c, sc = u, 1.0
        wq2 = dequantize(w["w2"][e], w["w2_scale"][e], 1.0)
        y = (wq2 @ c) * float(np.float32(sc) * np.float32(w["w2_global_scale"][e]))
        if w.get("b2") is not None:
            y = y + w["b2"][e]
        return y

    def route(self, logits):
        ids, ws = [], []
        for row in logits:
            i, wt = route(row, self.routing, self.k, self.w.get("routing_bias"), self.n_group,
                          self.topk_group, self.norm, self.scale)
            ids.append(i)
            ws.append(wt)
        return np.array(ids, np.int32), np.array(ws)

    def forward(self, x, *, logits=None, ids=None, weights=None, per_token_scale=None,
                finalize=True, act_dtype="f32"):
        x = np.asarray(x, np.float64)
        if logits is not None:
            ids, weights = self.route(np.asarray(logits, np.float64))
        weights = np.asarray(weights, np.float64)
        T = x.shape[0]
        out = np.zeros((T, self.H)) if finalize else np.zeros((T * self.k, self.H))
        for t in range(T):
            acc = np.zeros(self.H)
            for j in range(self.k):
                e = int(ids[t, j]) - self.e0
                if not 0 <= e < self.e_loc:
                    continue
                xin, wt = x[t], weights[t, j]
                if self.on_input:
                    xin, wt = round_act(wt * xin, act_dtype), 1.0
                y = self.expert(e, xin, act_dtype)
                if finalize:
                    acc += wt * y
                else:
                    out[t * self.k + j] = y
            if finalize:
                p = 1.0 if per_token_scale is None else float(per_token_scale[t])
                out[t] = p * acc
        return out, ids, weights
