"""Bytes a lowered module holds: packed quantized weights, kernel caches, everything else."""

from __future__ import annotations

import torch
from torch import fx

from torch_myqasr.lowering.passes import EMBEDDING_OP

# Positions of the packed weight's tensor arguments in each op's schema (not x / bias / caches).
_WEIGHT_ARGS = {
    torch.ops.myqasr.linear_affine.default: (1, 2, 3),
    torch.ops.myqasr.linear_binary.default: (1, 2),
    torch.ops.myqasr.linear_nf4.default: (1, 2, 7, 8),
    EMBEDDING_OP: (1, 2, 3),
}
_CACHE_ARGS = {torch.ops.myqasr.linear_affine.default: (9, 10), torch.ops.myqasr.linear_binary.default: (7, 8)}


def _graph_module(module: torch.nn.Module) -> fx.GraphModule:
    inner = getattr(module, "_orig_mod", module)  # a torch.compile'd module wraps the original
    if not isinstance(inner, fx.GraphModule):
        raise TypeError(f"expected a lowered GraphModule (or torch.compile of one), got {type(module).__name__}")
    return inner


def _attr_bytes(module: torch.nn.Module, positions: dict) -> int:
    gm = _graph_module(module)
    seen: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in positions:
            continue
        for i in positions[node.target]:
            arg = node.args[i] if i < len(node.args) else None
            while isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target == torch.ops.aten.slice.Tensor:
                arg = arg.args[0]  # use_cpu_kernels' split of a ragged N reads views of the buffers
            if isinstance(arg, fx.Node) and arg.op == "get_attr" and arg.target not in seen:
                t = gm
                for part in arg.target.split("."):
                    t = getattr(t, part)
                seen[arg.target] = t.numel() * t.element_size()
    return sum(seen.values())


def quantized_weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the packed low-bit weights a lowered module holds (codes + scales + zero points).

    Counts each buffer read by a ``myqasr::linear_*`` / ``embedding_packed`` op once (a tied weight
    once). Equals the sum of the scheme's quantized layers' ``nbytes`` (`torch_myqasr.formats.weight_nbytes`)
    for the layers in this module. Kernel caches are not included (`kernel_cache_bytes`).
    """
    return _attr_bytes(module, _WEIGHT_ARGS)


def kernel_cache_bytes(module: torch.nn.Module) -> int:
    """Bytes of the aten int4 CPU kernel operands `use_cpu_kernels` attached (0 when not used)."""
    return _attr_bytes(module, _CACHE_ARGS)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module`` (each storage once), kernel caches included."""
    gm = getattr(module, "_orig_mod", module)
    seen: dict[tuple, int] = {}
    for t in list(gm.parameters()) + list(gm.buffers()):
        seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
    return sum(seen.values())


__all__ = ["kernel_cache_bytes", "module_bytes", "quantized_weight_bytes"]
