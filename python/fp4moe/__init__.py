"""fp4moe: the NVFP4 Mixture-of-Experts layer on CPUs and Hopper GPUs, from Python.

A ctypes binding of the C library (libfp4moe.so: found through FP4MOE_LIBRARY, a copy inside
this package, or the repository's build/ folder), with a NumPy front-end (this module's
create_plan / forward / route), a PyTorch front-end (fp4moe.torch: zero-copy tensors, CUDA
streams, torch.library custom ops for torch.compile and CUDA graphs) and a drop-in for
FlashInfer's trtllm_fp4_block_scale_moe (fp4moe.flashinfer). Importing fp4moe needs NumPy only;
PyTorch is imported by fp4moe.torch and fp4moe.flashinfer.

    import fp4moe
    ctx = fp4moe.Context("cpu")
    cfg = fp4moe.Config(num_experts=8, top_k=2, hidden_size=64, intermediate_size=32)
    plan = fp4moe.create_plan(ctx, cfg, w1, w1_scale, w1_g, w2, w2_scale, w2_g)
    out = fp4moe.forward(plan, hidden_states, router_logits)
"""
from ._lib import (Activation, Backend, BackendUnavailableError, CorruptDataError, DType,
                   Fp4moeError, GateUpOrder, InvalidArgumentError, OutOfMemoryError, Precision,
                   Routing, ScaleLayout, Status, UnsupportedError, find_library, status_string)
from .core import Config, Context, Plan, version
from .numpy_api import create_plan, forward, forward_routed, route
from . import formats
from .formats import (dequantize, from_bf16, global_scale, quantize, quantize_experts,
                      to_bf16)

__version__ = "0.1.0"


def load_plan(ctx, path):
    """A plan saved with Plan.save (fp4moe_plan_deserialize)."""
    return Plan.load(ctx, path)


def __getattr__(name):
    # The checkpoint loader binds optional symbols: resolved on first use.
    if name in ("Checkpoint", "quantize_checkpoint"):
        from . import checkpoint
        return getattr(checkpoint, name)
    raise AttributeError(f"module 'fp4moe' has no attribute {name!r}")


__all__ = [
    "Activation", "Backend", "BackendUnavailableError", "Checkpoint", "Config", "Context",
    "CorruptDataError", "DType", "Fp4moeError", "GateUpOrder", "InvalidArgumentError",
    "OutOfMemoryError", "Plan", "Precision", "Routing", "ScaleLayout", "Status",
    "UnsupportedError", "create_plan", "dequantize", "find_library", "formats", "forward",
    "forward_routed", "from_bf16", "global_scale", "load_plan", "quantize", "quantize_checkpoint",
    "quantize_experts", "route", "status_string", "to_bf16", "version",
]
