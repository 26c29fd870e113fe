"""The PyTorch path on the GPU: a layer from CUDA tensors, eagerly, through the custom op inside
a captured CUDA graph, and under torch.compile, each bit-for-bit equal to the C API's result
(fp4moe_forward on device buffers, through the NumPy front-end's staging). Also the routed and
routing-only ops, the CPU backend from CPU tensors, and the FlashInfer drop-in.

Run on the GPU machine (after building libfp4moe.so with CUDA):
    FP4MOE_LIBRARY=build-gpu/libfp4moe.so python3 tests/gpu/test_torch_cuda.py
(also a pytest module). Seeds are printed; FP4MOE_SEED replays one.
"""
import os
import pathlib
import sys
import traceback

import numpy as np
import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "python" / "tests"))

import fp4moe  # noqa: E402
from fp4moe import torch_api  # noqa: E402

SEED = int(os.environ.get("FP4MOE_SEED", np.random.SeedSequence().entropy % 2**32))
print(f"test_torch_cuda seed: {SEED} (FP4MOE_SEED={SEED} replays)")
DEVICE = torch.device("cuda", 0)


def _rng(tag):
    return np.random.default_rng([SEED, sum(map(ord, tag))])


def make_weights(rng, E, H, I, gated=True):
    n1 = 2 * I if gated else I
    w1, s1, g1 = fp4moe.quantize_experts(rng.standard_normal((E, n1, H)).astype(np.float32))
    w2, s2, g2 = fp4moe.quantize_experts(rng.standard_normal((E, H, I)).astype(np.float32))
    return w1, s1, g1, w2, s2, g2


_CONTEXTS = {}


def cuda_ctx():
    if "cuda" not in _CONTEXTS:
        _CONTEXTS["cuda"] = fp4moe.Context("cuda", cuda_device=0)
    return _CONTEXTS["cuda"]


def make_plan(tag, E=16, k=4, H=256, I=128, **cfg_kw):
    rng = _rng(tag)
    cfg = fp4moe.Config(num_experts=E, top_k=k, hidden_size=H, intermediate_size=I,
                        max_tokens=256, **cfg_kw)
    weights = make_weights(rng, E, H, I, cfg.is_gated)
    plan = torch_api.create_plan(cuda_ctx(), cfg, *weights)
    return plan, cfg, rng


def c_api_forward(plan, hidden, logits, **kw):
    """fp4moe_forward on device buffers (the NumPy front-end stages host arrays)."""
    h = hidden.cpu()
    x = h.view(torch.int16).numpy().view(np.uint16) if h.dtype == torch.bfloat16 else h.numpy()
    out = fp4moe.forward(plan, x, logits.cpu().numpy(), **kw)
    if out.dtype == np.uint16:
        return torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(out)


def assert_bitwise_equal(got, want, what):
    got = got.detach().cpu().contiguous()
    want = want.detach().cpu().contiguous()
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, got.shape,
                                                                 want.dtype, want.shape)
    g = got.view(torch.int16 if got.element_size() == 2 else torch.int32)
    w = want.view(torch.int16 if want.element_size() == 2 else torch.int32)
    mismatches = int((g != w).sum())
    assert mismatches == 0, f"{what}: {mismatches} of {g.numel()} values differ (seed {SEED})"


def inputs(rng, T, H, E, dtype=torch.bfloat16):
    x = torch.from_numpy(rng.standard_normal((T, H)).astype(np.float32)).to(dtype).to(DEVICE)
    logits = torch.from_numpy(rng.standard_normal((T, E)).astype(np.float32)).to(DEVICE)
    return x, logits


# ------------------------------------------------------------------------------ tests
def test_eager_equals_c_api():
    # (threshold 16: T = 40 takes the prefill path, as before the default became 128)
    plan, cfg, rng = make_plan("eager", decode_threshold=16)
    for T in (1, 5, 40):
        x, logits = inputs(rng, T, cfg.hidden_size, cfg.num_experts)
        want = c_api_forward(plan, x, logits)
        got = torch_api.forward(plan, x, logits)
        torch.cuda.synchronize()
        assert_bitwise_equal(got, want, f"eager T={T}")
        got_op = torch_api.moe(plan, x, logits)
        assert_bitwise_equal(got_op, want, f"custom op T={T}")
        # in place, F32 output
        want32 = c_api_forward(plan, x, logits, output_dtype="f32")
        assert_bitwise_equal(torch_api.forward(plan, x, logits, output_dtype=torch.float32),
                             want32, f"f32 output T={T}")
        buf = x.clone()
        torch_api.forward(plan, buf, logits, out=buf)
        assert_bitwise_equal(buf, want, f"in place T={T}")


def test_current_stream_is_used():
    plan, cfg, rng = make_plan("stream")
    x, logits = inputs(rng, 8, cfg.hidden_size, cfg.num_experts)
    want = c_api_forward(plan, x, logits)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keeps the side stream busy: a wrong stream would race
        out = torch_api.moe(plan, x, logits)
    torch.cuda.current_stream().wait_stream(side)
    assert_bitwise_equal(out, want, "side stream")


def test_cuda_graph_capture_and_replay():
    plan, cfg, rng = make_plan("graph")
    T = 12
    static_x, static_logits = inputs(rng, T, cfg.hidden_size, cfg.num_experts)
    pts = torch.rand(T, device=DEVICE) + 0.5
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up, as torch.cuda.graphs asks
        for _ in range(2):
            torch_api.moe(plan, static_x, static_logits, per_token_scale=pts)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_ids, static_w = torch_api.moe(plan, static_x, static_logits,
                                                         per_token_scale=pts,
                                                         return_routing=True)
    for replay in range(3):
        x, logits = inputs(rng, T, cfg.hidden_size, cfg.num_experts)
        static_x.copy_(x)
        static_logits.copy_(logits)
        graph.replay()
        torch.cuda.synchronize()
        want = c_api_forward(plan, x, logits, per_token_scale=pts.cpu().numpy())
        assert_bitwise_equal(static_out, want, f"graph replay {replay}")
        ids, w = fp4moe.route(plan, logits.cpu().numpy())
        assert torch.equal(static_ids.cpu(), torch.from_numpy(ids)), "graph routing ids"
        assert_bitwise_equal(static_w, torch.from_numpy(w), "graph routing weights")


def test_torch_compile():
    plan, cfg, rng = make_plan("compile", activation="relu2", routing="deepseek_v3", n_group=4,
                               topk_group=2, routed_scaling_factor=2.5)
    module = torch_api.MoE(plan)

    def block(x, logits):
        return module(x * 1.0, logits) + 0.0  # ops around the layer for inductor to fuse

    compiled = torch.compile(block, fullgraph=True)
    for T in (3, 9):
        x, logits = inputs(rng, T, cfg.hidden_size, cfg.num_experts)
        want = c_api_forward(plan, x, logits)
        assert_bitwise_equal(compiled(x, logits), want, f"torch.compile T={T}")
    graphs = torch.compile(lambda x, l: torch_api.moe(plan, x, l), mode="reduce-overhead",
                           fullgraph=True)
    x, logits = inputs(rng, 16, cfg.hidden_size, cfg.num_experts)
    want = c_api_forward(plan, x, logits)
    for attempt in range(3):  # the later calls replay inductor's CUDA graph
        got = graphs(x, logits).clone()
    assert_bitwise_equal(got, want, "torch.compile reduce-overhead")


def test_routed_and_route_ops():
    plan, cfg, rng = make_plan("routed")
    T = 10
    x, logits = inputs(rng, T, cfg.hidden_size, cfg.num_experts)
    ids, w = torch_api.route(plan, logits)
    want_ids, want_w = fp4moe.route(plan, logits.cpu().numpy())
    assert torch.equal(ids.cpu(), torch.from_numpy(want_ids))
    assert_bitwise_equal(w, torch.from_numpy(want_w), "route op")
    out = torch_api.moe_routed(plan, x, ids, w)
    assert_bitwise_equal(out, torch_api.moe(plan, x, logits), "routed = from logits")
    off = torch_api.moe(plan, x, logits, skip_finalize=True)
    assert off.shape == (T * cfg.top_k, cfg.hidden_size)


def test_errors_are_python_exceptions():
    plan, cfg, rng = make_plan("errors")
    x, logits = inputs(rng, 4, cfg.hidden_size, cfg.num_experts)
    for bad, match in ((lambda: torch_api.forward(plan, x.cpu(), logits), "is on cpu"),
                       (lambda: torch_api.forward(plan, x[:, :64], logits), "hidden_states"),
                       (lambda: torch_api.forward(plan, x.t(), logits), "contiguous"),
                       (lambda: torch_api.forward(plan, x.double(), logits), "dtype")):
        try:
            bad()
        except fp4moe.InvalidArgumentError as e:
            assert match in str(e), (match, str(e))
        else:
            raise AssertionError(f"no error for {match}")


def test_cpu_backend_from_cpu_tensors():
    rng = _rng("cpu")
    cfg = fp4moe.Config(num_experts=8, top_k=2, hidden_size=64, intermediate_size=32)
    with fp4moe.Context("cpu") as ctx:
        plan = torch_api.create_plan(ctx, cfg, *make_weights(rng, 8, 64, 32))
        x = torch.randn(5, 64, dtype=torch.bfloat16)
        logits = torch.randn(5, 8)
        want = c_api_forward(plan, x, logits)
        assert_bitwise_equal(torch_api.moe(plan, x, logits), want, "cpu op")
        compiled = torch.compile(lambda a, b: torch_api.moe(plan, a, b), fullgraph=True)
        assert_bitwise_equal(compiled(x, logits), want, "cpu compile")


def test_flashinfer_drop_in():
    from fp4moe.flashinfer_compat import trtllm_fp4_block_scale_moe
    from test_flashinfer_layout import flashinfer_prepare
    rng = _rng("flashinfer")
    E, k, H, I, T = 8, 2, 256, 128, 6
    w13, s13, dq1 = fp4moe.quantize_experts(rng.standard_normal((E, 2 * I, H)).astype(np.float32))
    w2, s2, dq2 = fp4moe.quantize_experts(rng.standard_normal((E, H, I)).astype(np.float32))
    x32 = rng.standard_normal((T, H)).astype(np.float32)
    logits = rng.standard_normal((T, E)).astype(np.float32)
    a1 = np.float32(fp4moe.global_scale(x32))
    a2 = rng.uniform(100.0, 300.0, E).astype(np.float32)
    cfg = fp4moe.Config(num_experts=E, top_k=k, hidden_size=H, intermediate_size=I,
                        gate_up_order="up_gate", precision="w4a4")
    direct = fp4moe.create_plan(cuda_ctx(), cfg, w13, s13, dq1, w2, s2, dq2,
                                a1_global_scale=np.full(E, a1, np.float32), a2_global_scale=a2)
    x_bf16 = torch.from_numpy(x32).to(torch.bfloat16)
    want = c_api_forward(direct, x_bf16, torch.from_numpy(logits)).float()

    zeros1, zeros2 = np.zeros((E, 2 * I), np.float32), np.zeros((E, H), np.float32)
    pw13, ps13, _, pw2, ps2, _ = flashinfer_prepare(w13, s13, zeros1, w2, s2, zeros2, True)
    og = (np.float32(1) / a1 * dq1).astype(np.float32)
    packed, scales, _ = fp4moe.quantize(fp4moe.from_bf16(fp4moe.to_bf16(x32)), a1)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(DEVICE)
    args = dict(
        routing_logits=t(logits).to(torch.bfloat16).float(), routing_bias=None,
        hidden_states=t(packed), hidden_states_scale=t(scales).view(torch.float8_e4m3fn),
        gemm1_weights=t(pw13), gemm1_weights_scale=t(ps13).view(torch.float8_e4m3fn),
        gemm1_bias=None, gemm1_alpha=None, gemm1_beta=None, gemm1_clamp_limit=None,
        gemm2_weights=t(pw2), gemm2_weights_scale=t(ps2).view(torch.float8_e4m3fn),
        gemm2_bias=None, output1_scale_scalar=t(a2 * og), output1_scale_gate_scalar=t(og),
        output2_scale_scalar=t(dq2 / a2), num_experts=E, top_k=k, n_group=None,
        topk_group=None, intermediate_size=I, local_expert_offset=0, local_num_experts=E,
        routed_scaling_factor=None, routing_method_type=1)
    got = trtllm_fp4_block_scale_moe(**args)[0]
    assert got.dtype == torch.bfloat16 and got.shape == (T, H)
    err = float((got.float().cpu() - want).norm() / want.norm())
    # want quantised the BF16-rounded x with a1 as well; a2 = o1/og may differ by an ulp.
    assert err < 2e-2, err
    replay = torch.zeros(T, k, dtype=torch.int16, device=DEVICE)
    again = trtllm_fp4_block_scale_moe(**args, routing_replay_out=replay)[0]
    assert_bitwise_equal(again, got, "drop-in, cached plan")
    assert int(replay.min()) >= 0 and int(replay.max()) < E

    # do_finalize=False: per-(token, slot) rows, the weights, the identity permutation; the
    # weighted sum of the rows gives the finalized output back.
    rows, weights, index = trtllm_fp4_block_scale_moe(**args, do_finalize=False)
    assert rows.shape == (T * k, H) and weights.shape == (T, k) and index.shape == (T, k)
    summed = (rows.float()[index.long().flatten()].view(T, k, H) *
              weights.float().unsqueeze(-1)).sum(1)
    err = float((summed.cpu() - got.float().cpu()).norm() / got.float().norm())
    assert err < 2e-2, err

    # The routed entry point: the same experts and weights, packed as (id << 16) | bf16 bits.
    from fp4moe.flashinfer_compat import trtllm_fp4_block_scale_routed_moe
    ids = replay.to(torch.int64)
    wbits = weights.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    packed_ids = ((ids << 16) | wbits)
    packed_ids = torch.where(packed_ids >= 2**31, packed_ids - 2**32, packed_ids).to(torch.int32)
    routed_args = {key: value for key, value in args.items() if key != "routing_logits"}
    routed = trtllm_fp4_block_scale_routed_moe(topk_ids=packed_ids, **routed_args)[0]
    err = float((routed.float() - got.float()).norm() / got.float().norm())
    assert err < 1e-2, err


TESTS = [test_eager_equals_c_api, test_current_stream_is_used, test_cuda_graph_capture_and_replay,
         test_torch_compile, test_routed_and_route_ops, test_errors_are_python_exceptions,
         test_cpu_backend_from_cpu_tensors, test_flashinfer_drop_in]


def main():
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, library "
          f"{fp4moe.find_library()}, {cuda_ctx().description}")
    failed = 0
    for test in TESTS:
        try:
            test()
            print(f"  passed  {test.__name__}")
        except Exception:
            failed += 1
            print(f"  FAILED  {test.__name__}")
            traceback.print_exc()
    print(f"test_torch_cuda: {len(TESTS) - failed} passed, {failed} failed (seed {SEED})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
