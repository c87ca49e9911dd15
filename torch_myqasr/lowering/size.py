"""Bytes a lowered module holds: its low-bit weights (portable or CPU-resident layout), everything else."""

from __future__ import annotations

import torch
from torch import fx

from torch_myqasr.lowering.cpu_kernels import EMBEDDING_INT4PACK, LINEAR_INT4PACK
from torch_myqasr.lowering.passes import EMBEDDING_OP

# Positions of the packed weight's tensor arguments in each op's schema (not x / bias / caches).
_WEIGHT_ARGS = {
    torch.ops.myqasr.linear_affine.default: (1, 2, 3),
    torch.ops.myqasr.linear_binary.default: (1, 2),
    torch.ops.myqasr.linear_nf4.default: (1, 2, 7, 8),
    EMBEDDING_OP: (1, 2, 3),
    LINEAR_INT4PACK: (1, 2),
    EMBEDDING_INT4PACK: (1, 2),
}


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
            if isinstance(arg, fx.Node) and arg.op == "get_attr" and arg.target not in seen:
                t = gm
                for part in arg.target.split("."):
                    t = getattr(t, part)
                seen[arg.target] = t.numel() * t.element_size()
    return sum(seen.values())


def quantized_weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the low-bit weights a lowered module holds (codes + scales + zero points), in memory now.

    Counts each buffer read by a ``myqasr::`` linear / lookup op once (a tied weight once). In the
    portable layout (`lower_quantized`) it equals the sum of the scheme's quantized layers' ``nbytes``
    (`torch_myqasr.formats.weight_nbytes`) for the layers in this module. In the CPU-resident layout
    (`use_cpu_kernels`) int4 / int8 weights cost the same plus N's padding to 16 rows, and int1-3 /
    int5-7 weights more (docs/lowering.md).
    """
    return _attr_bytes(module, _WEIGHT_ARGS)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module`` (each storage once)."""
    gm = getattr(module, "_orig_mod", module)
    seen: dict[tuple, int] = {}
    for t in list(gm.parameters()) + list(gm.buffers()):
        seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
    return sum(seen.values())


__all__ = ["module_bytes", "quantized_weight_bytes"]
