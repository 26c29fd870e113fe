"""A drop-in for flashinfer.fused_moe.trtllm_fp4_block_scale_moe (and _routed_moe) on Hopper
GPUs and CPUs.

    from fp4moe.flashinfer_compat import trtllm_fp4_block_scale_moe

takes FlashInfer's arguments (its current signature) and computes the same layer with fp4moe.
How FlashInfer's conventions map onto fp4moe's:

- FC1 rows are in FlashInfer's up_gate order ([w3; w1]); the plan uses GateUpOrder.UP_GATE.
- weight_layout="shuffled" (default): the weights as prepared for the trtllm-gen kernels
  (FlashInfer's / vLLM's prepare step: reorder_rows_for_gated_act_gemm, then shuffle_matrix_a
  with epilogue_tile_m=128 on the weights and shuffle_matrix_sf_a, i.e. the same row shuffle then
  the 128x4 swizzle, on the block scales; biases in the weights' row order). The shuffles are
  undone once per weight set. weight_layout="linear": unshuffled rows, linear [rows, K/16]
  scales; "swizzled": unshuffled rows, 128x4-swizzled scales (ModelOpt / CUTLASS layout).
- The three per-expert scalars fold the global scales (FlashInfer's tests define them):
  output1_scale_gate_scalar = w1_dequant / a1_g, output1_scale_scalar = a2_g * w1_dequant / a1_g,
  output2_scale_scalar = w2_dequant / a2_g. With NVFP4 hidden states (uint8 [T, H/2] plus
  hidden_states_scale E4M3 [T, H/16], linear) the layer runs W4A4-faithful: the input is taken
  as e2m1 * e4m3 (exact in BF16) with a1 = 1, w1 scale = output1_scale_gate_scalar,
  a2 = output1_scale_scalar / output1_scale_gate_scalar, w2 scale = output2_scale_scalar * a2.
  With 16-bit or FP32 hidden states (an fp4moe extension: FlashInfer has no BF16-activation
  NVFP4 path) it runs W4A16: the same scales without activation quantisation.
- activation_type is matched by name (FlashInfer's ActivationType numbers moved between
  releases; 3 Swiglu, 4 Geglu and 6 Relu2 are stable): pass the enum member, a name, or one of
  those numbers.

Plans are cached per thread, keyed by the weight tensors (address, shape, version counter) and
every layer attribute: the first call with new weights copies them to the host and builds a
plan (not capturable: call once before CUDA graph capture); later calls only launch.
"""
import collections
import inspect
import threading
from typing import List, Optional

import numpy as np
import torch

from . import torch_api
from ._flashinfer_layout import (activation_from_flashinfer, canonical_weights, fold_scales,
                                 gated_interleave_indices, shuffle_row_indices, unshuffle_rows)
from ._lib import Activation, Routing
from .core import Config, Context

_E2M1_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]

_CACHE_ENTRIES = 8
_state = threading.local()


# ------------------------------------------------------------------------------ caching
def _key_of(t):
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return (t.data_ptr(), tuple(t.shape), str(t.dtype), str(t.device), t._version)
    return repr(t)


def _context_for(device):
    contexts = getattr(_state, "contexts", None)
    if contexts is None:
        contexts = _state.contexts = {}
    key = str(device)
    if key not in contexts:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            contexts[key] = Context("cuda", cuda_device=index)
        else:
            contexts[key] = Context("cpu")
    return contexts[key]


def _plans():
    plans = getattr(_state, "plans", None)
    if plans is None:
        plans = _state.plans = collections.OrderedDict()
    return plans


def _host(t, dtype=None):
    if t is None:
        return None
    a = torch_api._host_array("", t)
    return a.astype(dtype) if dtype is not None else a


class _Entry:
    def __init__(self, plan, lut):
        self.plan = plan
        self.e2m1_lut = lut  # [16] float32 on the plan's device, made outside any capture


def clear_cache():
    """Drops this thread's cached plans and contexts."""
    _plans().clear()
    getattr(_state, "contexts", {}).clear()


# ------------------------------------------------------------------------------ the drop-in
def _nvfp4_to_float(hidden_states, hidden_states_scale, lut, hidden_size):
    """NVFP4 hidden states -> e2m1 * e4m3 (no global scale) in BF16, exactly."""
    t = hidden_states.shape[0]
    packed = hidden_states.view(torch.uint8)
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(t, hidden_size)
    values = lut[codes.long()]
    scales = hidden_states_scale.reshape(t, hidden_size // 16)
    if scales.dtype != torch.float8_e4m3fn:
        scales = scales.view(torch.uint8).view(torch.float8_e4m3fn)
    scales = scales.to(torch.float32)
    x = values.reshape(t, hidden_size // 16, 16) * scales.unsqueeze(-1)
    return x.reshape(t, hidden_size).to(torch.bfloat16)


def _prepare(hidden_states, hidden_states_scale, routing_bias, gemm1_weights, gemm1_weights_scale,
             gemm1_bias, gemm1_alpha, gemm1_beta, gemm1_clamp_limit, gemm2_weights,
             gemm2_weights_scale, gemm2_bias, output1_scale_scalar, output1_scale_gate_scalar,
             output2_scale_scalar, num_experts, top_k, n_group, topk_group, intermediate_size,
             local_expert_offset, local_num_experts, routed_scaling_factor, routing_method_type,
             activation_type, norm_topk_prob, tune_max_num_tokens, weight_layout,
             epilogue_tile_m):
    """The cached plan for these weights and settings, and the hidden states as fp4moe takes
    them: (entry, x, out_dtype). Shared by the logits and the routed entry points, which pass
    their own arguments of these names (_prepare_args)."""
    activation = activation_from_flashinfer(activation_type)
    gated = activation in (Activation.SWIGLU, Activation.GEGLU, Activation.GEGLU_TANH)
    try:
        routing = Routing(int(routing_method_type))
    except ValueError:
        raise ValueError(f"fp4moe: routing_method_type {routing_method_type} is unknown") from None
    nvfp4_input = hidden_states.dtype in (torch.uint8,) or (
        hasattr(torch, "float4_e2m1fn_x2") and hidden_states.dtype == torch.float4_e2m1fn_x2)
    if hidden_states.dim() != 2:
        raise ValueError(f"fp4moe: hidden_states must be 2-D, got {tuple(hidden_states.shape)}")
    e_loc = int(local_num_experts) if local_num_experts else int(num_experts -
                                                                   local_expert_offset)
    if gemm1_weights.dim() != 3 or gemm2_weights.dim() != 3:
        raise ValueError("fp4moe: gemm1_weights and gemm2_weights must be [E_loc, rows, K/2]")
    hidden_size = int(gemm2_weights.shape[1])
    n1 = 2 * intermediate_size if gated else intermediate_size
    expected_w1 = (e_loc, n1, hidden_size // 2)
    if tuple(gemm1_weights.shape) != expected_w1:
        raise ValueError(f"fp4moe: gemm1_weights has shape {tuple(gemm1_weights.shape)}, "
                         f"expected {expected_w1} (local experts, "
                         f"{'2*' if gated else ''}intermediate_size, hidden_size/2)")
    if nvfp4_input:
        if hidden_states_scale is None:
            raise ValueError("fp4moe: NVFP4 hidden_states need hidden_states_scale")
        if hidden_states.shape[1] * 2 != hidden_size:
            raise ValueError(f"fp4moe: hidden_states has {hidden_states.shape[1]} bytes per "
                             f"token, expected hidden_size/2 = {hidden_size // 2}")
        if hidden_states_scale.numel() != hidden_states.shape[0] * hidden_size // 16:
            raise ValueError("fp4moe: hidden_states_scale must hold [T, hidden_size/16] linear "
                             "E4M3 scales")
    elif hidden_states_scale is not None:
        raise ValueError("fp4moe: hidden_states_scale is only for NVFP4 (uint8) hidden_states")

    t = int(hidden_states.shape[0])
    key = (tuple(_key_of(x) for x in (
        routing_bias, gemm1_weights, gemm1_weights_scale, gemm1_bias, gemm1_alpha, gemm1_beta,
        gemm1_clamp_limit, gemm2_weights, gemm2_weights_scale, gemm2_bias, output1_scale_scalar,
        output1_scale_gate_scalar, output2_scale_scalar)),
        int(num_experts), int(top_k), n_group, topk_group, int(intermediate_size),
        int(local_expert_offset), e_loc, routed_scaling_factor, int(routing), activation,
        bool(norm_topk_prob), nvfp4_input, weight_layout, int(epilogue_tile_m),
        str(hidden_states.device))
    plans = _plans()
    entry = plans.get(key)
    if entry is not None and entry.plan.config.max_tokens < t:
        entry = None
    if entry is None:
        ctx = _context_for(hidden_states.device)
        w1, s1, b1, w2, s2, b2, scale_layout = canonical_weights(
            _host(gemm1_weights), _host(gemm1_weights_scale), _host(gemm1_bias, np.float32),
            _host(gemm2_weights), _host(gemm2_weights_scale), _host(gemm2_bias, np.float32),
            gated=gated, layout=weight_layout, epilogue_tile_m=epilogue_tile_m)
        w1_global, w2_global, a1, a2, precision = fold_scales(
            _host(output1_scale_gate_scalar), _host(output1_scale_scalar),
            _host(output2_scale_scalar), nvfp4_input)
        config = Config(num_experts=int(num_experts), top_k=int(top_k), hidden_size=hidden_size,
                        intermediate_size=int(intermediate_size), activation=activation,
                        gate_up_order="up_gate", routing=routing,
                        n_group=int(n_group) if n_group else 1,
                        topk_group=int(topk_group) if topk_group else 1,
                        norm_topk_prob=bool(norm_topk_prob),
                        routed_scaling_factor=float(routed_scaling_factor)
                        if routed_scaling_factor is not None else 1.0,
                        apply_router_weight_on_input=routing == Routing.LLAMA4,
                        local_expert_offset=int(local_expert_offset), local_num_experts=e_loc,
                        precision=precision,
                        max_tokens=max(16384, int(tune_max_num_tokens or 0), t))
        optional = {"b1": b1, "b2": b2, "routing_bias": _host(routing_bias, np.float32),
                    "a1_global_scale": a1, "a2_global_scale": a2,
                    "swiglu_alpha": _host(gemm1_alpha, np.float32),
                    "swiglu_beta": _host(gemm1_beta, np.float32),
                    "swiglu_limit": _host(gemm1_clamp_limit, np.float32)}
        optional = {k: v for k, v in optional.items() if v is not None}
        plan = torch_api.create_plan(ctx, config, w1, s1, w1_global, w2, s2,
                                     w2_global, w1_scale_layout=scale_layout,
                                     w2_scale_layout=scale_layout, **optional)
        lut = torch.tensor(_E2M1_VALUES, dtype=torch.float32, device=hidden_states.device)
        entry = _Entry(plan, lut)
        plans[key] = entry
        while len(plans) > _CACHE_ENTRIES:
            plans.popitem(last=False)
    plans.move_to_end(key)

    if nvfp4_input:
        x = _nvfp4_to_float(hidden_states, hidden_states_scale, entry.e2m1_lut, hidden_size)
        out_dtype = torch.bfloat16
    else:
        x = hidden_states.contiguous()
        out_dtype = torch.bfloat16 if x.dtype == torch.float32 else x.dtype
    return entry, x, out_dtype


def _results(result, weights, do_finalize, output):
    """FlashInfer's return value: [output], or with do_finalize=False (gemm2_output,
    expert_weights, expanded_idx_to_permuted_idx). fp4moe's unfinalized rows are already in
    (token, slot) order, so the permutation is the identity: row t*k + j holds token t's slot j
    (no router weight)."""
    if not do_finalize:
        t, k = weights.shape
        index = torch.arange(t * k, dtype=torch.int32, device=result.device).view(t, k)
        return [result, weights.to(torch.bfloat16), index]
    if output is not None:
        output.copy_(result)
        return [output]
    return [result]


def _check_unsupported(num_fused_shared_experts):
    if num_fused_shared_experts:
        raise NotImplementedError("fp4moe: num_fused_shared_experts is not supported (run the "
                                  "shared experts as a separate MLP)")


def _prepare_args(scope, **overrides):
    """_prepare's arguments from an entry point's locals() (the entry points name their
    parameters as _prepare does), with overrides."""
    args = {name: scope[name] for name in _PREPARE_PARAMS if name in scope}
    args.update(overrides)
    return args


_PREPARE_PARAMS = tuple(inspect.signature(_prepare).parameters)


def trtllm_fp4_block_scale_moe(
    routing_logits: torch.Tensor,
    routing_bias: Optional[torch.Tensor],
    hidden_states: torch.Tensor,
    hidden_states_scale: Optional[torch.Tensor],
    gemm1_weights: torch.Tensor,
    gemm1_weights_scale: torch.Tensor,
    gemm1_bias: Optional[torch.Tensor],
    gemm1_alpha: Optional[torch.Tensor],
    gemm1_beta: Optional[torch.Tensor],
    gemm1_clamp_limit: Optional[torch.Tensor],
    gemm2_weights: torch.Tensor,
    gemm2_weights_scale: torch.Tensor,
    gemm2_bias: Optional[torch.Tensor],
    output1_scale_scalar: Optional[torch.Tensor],
    output1_scale_gate_scalar: Optional[torch.Tensor],
    output2_scale_scalar: Optional[torch.Tensor],
    num_experts: int,
    top_k: int,
    n_group: Optional[int],
    topk_group: Optional[int],
    intermediate_size: int,
    local_expert_offset: int,
    local_num_experts: int,
    routed_scaling_factor: Optional[float],
    routing_method_type: int = 0,
    do_finalize: bool = True,
    enable_pdl: Optional[bool] = None,
    activation_type=3,
    per_token_scale: Optional[torch.Tensor] = None,
    output: Optional[torch.Tensor] = None,
    tune_max_num_tokens: int = 8192,
    norm_topk_prob: bool = True,
    routing_replay_out: Optional[torch.Tensor] = None,
    num_fused_shared_experts: Optional[int] = None,
    *,
    weight_layout: str = "shuffled",
    epilogue_tile_m: int = 128,
) -> List[torch.Tensor]:
    """FlashInfer's trtllm_fp4_block_scale_moe computed by fp4moe; returns [output] (BF16
    [T, H]), or with do_finalize=False [gemm2_output [T*k, H], expert_weights [T, k],
    expanded_idx_to_permuted_idx [T, k]] (see _results). See the module docstring for the
    layouts and scales. enable_pdl and tune_max_num_tokens are performance hints without effect
    here."""
    _check_unsupported(num_fused_shared_experts)
    if routing_logits is None:
        raise ValueError("fp4moe: routing_logits is required (for precomputed routing use "
                         "trtllm_fp4_block_scale_routed_moe)")
    entry, x, out_dtype = _prepare(**_prepare_args(locals()))
    t = int(hidden_states.shape[0])
    logits = routing_logits.contiguous()
    result, ids, weights = torch_api.moe(entry.plan, x, logits, per_token_scale=per_token_scale,
                                         output_dtype=out_dtype, return_routing=True,
                                         skip_finalize=not do_finalize)
    if routing_replay_out is not None:
        routing_replay_out[:t].copy_(ids.to(routing_replay_out.dtype))
    return _results(result, weights, do_finalize, output)


def trtllm_fp4_block_scale_routed_moe(
    topk_ids: torch.Tensor,
    routing_bias: Optional[torch.Tensor],
    hidden_states: torch.Tensor,
    hidden_states_scale: Optional[torch.Tensor],
    gemm1_weights: torch.Tensor,
    gemm1_weights_scale: torch.Tensor,
    gemm1_bias: Optional[torch.Tensor],
    gemm1_alpha: Optional[torch.Tensor],
    gemm1_beta: Optional[torch.Tensor],
    gemm1_clamp_limit: Optional[torch.Tensor],
    gemm2_weights: torch.Tensor,
    gemm2_weights_scale: torch.Tensor,
    gemm2_bias: Optional[torch.Tensor],
    output1_scale_scalar: Optional[torch.Tensor],
    output1_scale_gate_scalar: Optional[torch.Tensor],
    output2_scale_scalar: Optional[torch.Tensor],
    num_experts: int,
    top_k: int,
    n_group: Optional[int],
    topk_group: Optional[int],
    intermediate_size: int,
    local_expert_offset: int,
    local_num_experts: int,
    routed_scaling_factor: Optional[float],
    routing_method_type: int = 0,
    do_finalize: bool = True,
    enable_pdl: Optional[bool] = None,
    activation_type=3,
    output: Optional[torch.Tensor] = None,
    tune_max_num_tokens: int = 8192,
    *,
    weight_layout: str = "shuffled",
    epilogue_tile_m: int = 128,
) -> List[torch.Tensor]:
    """FlashInfer's trtllm_fp4_block_scale_routed_moe: the experts already chosen. topk_ids is
    int32 [T, k] packed as TRT-LLM's PackedScoreIdx {bf16 score; int16 idx} in memory, i.e.
    (expert << 16) | bf16 weight bits (FlashInfer's docstring says the reverse; the struct
    decides: docs/ROUTING.md). Returns as trtllm_fp4_block_scale_moe."""
    if topk_ids is None or topk_ids.dim() != 2 or topk_ids.shape[1] != top_k:
        raise ValueError("fp4moe: topk_ids must be int32 [T, top_k] (packed expert and weight)")
    # (routing is given: norm_topk_prob plays no part; True keeps one cached plan per weights)
    entry, x, out_dtype = _prepare(**_prepare_args(locals(), norm_topk_prob=True))
    packed = topk_ids.to(torch.int64) & 0xFFFFFFFF  # the 32 bits, unsigned
    ids = (packed >> 16).to(torch.int32).contiguous()
    bits = (packed & 0xFFFF) << 16  # a BF16 value's bits are the top half of its FP32 bits
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    weights = bits.view(torch.float32).contiguous()
    result = torch_api.moe_routed(entry.plan, x, ids, weights, output_dtype=out_dtype,
                                  skip_finalize=not do_finalize)
    return _results(result, weights, do_finalize, output)


__all__ = ["trtllm_fp4_block_scale_moe", "trtllm_fp4_block_scale_routed_moe", "clear_cache",
           "canonical_weights", "fold_scales", "activation_from_flashinfer",
           "shuffle_row_indices", "gated_interleave_indices", "unshuffle_rows"]
