#!/usr/bin/env python3
"""PyTorch BF16 baseline of the MoE layers that `fp4moe bench` times on the GPU.

Same shapes as the fp4moe presets (routed experts only), BF16 weights, routing done in PyTorch
(the preset's method), then the experts with torch._grouped_mm (an expert loop when that is
missing), the activation, and the weighted sum over the k experts. Timed with CUDA events
around each call, median of the repeats after a warm-up, 8 input sets rotated.

usage: python3 bench/torch_moe_baseline.py [--preset a,b] [--tokens 1,4,16] [--repeat 50]
       [--cublas]
"""
import argparse
import json
import statistics
import sys

import torch

PRESETS = {
    # name: E, k, H, I, activation, routing, n_group, topk_group, scale
    "qwen3-30b-a3b": (128, 8, 2048, 768, "swiglu", "renormalize_naive", 1, 1, 1.0),
    "nemotron3-nano-30b-a3b": (128, 6, 2688, 1856, "relu2", "deepseek_v3", 1, 1, 2.5),
    "deepseek-v3": (256, 8, 7168, 2048, "swiglu", "deepseek_v3", 8, 4, 2.5),
}
INPUT_SETS = 8


def route(logits, bias, k, method, n_group, topk_group, scale):
    if method == "renormalize_naive":
        p = torch.softmax(logits.float(), dim=-1)
        w, ids = torch.topk(p, k, dim=-1)
        return ids, w / w.sum(dim=-1, keepdim=True)
    s = torch.sigmoid(logits.float())
    b = s + bias
    t, e = b.shape
    if n_group > 1 and topk_group < n_group:
        g = b.view(t, n_group, e // n_group).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(g).scatter_(1, g.topk(topk_group, dim=-1).indices, 1.0)
        mask = keep.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
        b = b.masked_fill(mask == 0, float("-inf"))
    ids = b.topk(k, dim=-1).indices
    w = s.gather(1, ids)
    return ids, w / (w.sum(-1, keepdim=True) + 1e-20) * scale


def make_layer(name, device):
    e, k, h, inter, act, method, n_group, topk_group, scale = PRESETS[name]
    n1 = 2 * inter if act == "swiglu" else inter
    gen = torch.Generator(device=device).manual_seed(1234)
    w1 = (torch.randn(e, n1, h, device=device, generator=gen) / h ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(e, h, inter, device=device, generator=gen) / inter ** 0.5).to(torch.bfloat16)
    # small beside the top scores' spread, so the load is balanced as in a trained model and
    # as in `fp4moe bench` (tools/fp4moe/synthetic.c)
    bias = torch.randn(e, device=device, generator=gen) * 0.001
    return dict(e=e, k=k, h=h, inter=inter, act=act, method=method, n_group=n_group,
                topk_group=topk_group, scale=scale, w1=w1, w2=w2, bias=bias)


def activation(x, act, inter):
    if act == "swiglu":
        gate, up = x[:, :inter], x[:, inter:]
        return torch.nn.functional.silu(gate.float()).to(x.dtype) * up
    return torch.relu(x).square()


def moe_grouped(layer, x, logits):
    k, e = layer["k"], layer["e"]
    ids, w = route(logits, layer["bias"], k, layer["method"], layer["n_group"],
                   layer["topk_group"], layer["scale"])
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(e, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    tok = order // k
    xs = x[tok]
    hmid = torch._grouped_mm(xs, layer["w1"].transpose(1, 2), offs=offs)
    a = activation(hmid, layer["act"], layer["inter"])
    y = torch._grouped_mm(a, layer["w2"].transpose(1, 2), offs=offs)
    y = y.float() * w.flatten()[order].unsqueeze(1)
    out = torch.zeros(x.shape[0], layer["h"], device=x.device, dtype=torch.float32)
    out.index_add_(0, tok, y)
    return out.to(torch.bfloat16)


def moe_loop(layer, x, logits):
    k = layer["k"]
    ids, w = route(logits, layer["bias"], k, layer["method"], layer["n_group"],
                   layer["topk_group"], layer["scale"])
    out = torch.zeros(x.shape[0], layer["h"], device=x.device, dtype=torch.float32)
    for e in ids.unique().tolist():
        t_idx, j_idx = (ids == e).nonzero(as_tuple=True)
        hmid = x[t_idx] @ layer["w1"][e].t()
        y = activation(hmid, layer["act"], layer["inter"]) @ layer["w2"][e].t()
        out.index_add_(0, t_idx, y.float() * w[t_idx, j_idx].unsqueeze(1))
    return out.to(torch.bfloat16)


def time_call(fn, layer, inputs, repeat):
    for i in range(3 * INPUT_SETS):
        fn(layer, *inputs[i % INPUT_SETS])
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    for r in range(repeat):
        starts[r].record()
        fn(layer, *inputs[r % INPUT_SETS])
        ends[r].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def cublas_bf16_tflops(n=8192, repeat=20):
    """The device's dense BF16 GEMM rate through cuBLAS (torch.mm), n x n x n, median."""
    a = torch.randn(n, n, device="cuda").to(torch.bfloat16)
    b = torch.randn(n, n, device="cuda").to(torch.bfloat16)
    for _ in range(5):
        torch.mm(a, b)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        torch.mm(a, b)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return 2.0 * n ** 3 / (statistics.median(times) * 1e-3) / 1e12


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default=",".join(PRESETS))
    ap.add_argument("--tokens", default="1,4,16")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cublas", action="store_true", help="also measure the cuBLAS BF16 GEMM rate")
    args = ap.parse_args()
    device = "cuda"
    rows = []
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", file=sys.stderr)
    if args.cublas:
        print(f"cublas_bf16_8192 {cublas_bf16_tflops():.1f} TFLOP/s", flush=True)
    for name in args.preset.split(","):
        layer = make_layer(name, device)
        fn = moe_grouped if hasattr(torch, "_grouped_mm") else moe_loop
        for t in [int(v) for v in args.tokens.split(",")]:
            inputs = [(torch.randn(t, layer["h"], device=device).to(torch.bfloat16),
                       torch.randn(t, layer["e"], device=device) * 2.0) for _ in range(INPUT_SETS)]
            used = fn.__name__
            try:
                ms = time_call(fn, layer, inputs, args.repeat)
            except Exception as exc:  # grouped_mm not supported here: the expert loop
                print(f"{name} T={t}: {used} failed ({exc}); expert loop", file=sys.stderr)
                used = "moe_loop"
                ms = time_call(moe_loop, layer, inputs, args.repeat)
            rows.append(dict(preset=name, tokens=t, median_ms=ms, method=used))
            print(f"{name:24s} {t:6d} {ms:10.4f}  ({used})", flush=True)
        del layer
        torch.cuda.empty_cache()
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
