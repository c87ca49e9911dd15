"""`use_cpu_kernels`: opt-in fast CPU numerics for a lowered module (activations in bfloat16).

Why opt-in: the exported Whisper programs run float32 activations, and with float32 activations
the ``myqasr::linear_*`` CPU path dequantizes the whole weight on every call (aten's int4 kernel is
10-30x slower than a float32 ``F.linear`` there; docs/formats.md). aten's
``_weight_int4pack_mm_for_cpu`` is fast with **bfloat16** activations, so this pass

* casts the activation to ``compute_dtype`` before every packed linear op and the result back to
  the graph's dtype after it (the rest of the graph - attention, norms, softmax - stays float32);
* builds the int4 weight-pack operands once per weight (`QuantizedWeight.prepare_cpu`) and stores
  them as buffers ``<prefix>_cpu_packed`` / ``<prefix>_cpu_scales_zeros`` that the op reads, so a
  compiled graph sees them as plain inputs.

Costs, stated: rounding changes (activations and the kernel's per-group zero in bfloat16: outputs
differ from the converted model by about bfloat16 precision, and greedy transcripts can differ);
memory grows by ``N * K_pad / 2`` bytes per eligible weight plus its float32 scales-and-zeros (the
packed codes stay too, they are the portable copy), reported by `kernel_cache_bytes`. Artifacts
never store these buffers: `torch_myqasr.artifact.load_artifact` re-attaches them on request.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import fx

from torch_myqasr.lowering.passes import LINEAR_OPS, _get_attr, _unique_name
from torch_myqasr.ops import QuantizedWeight

aten = torch.ops.aten

CACHE_SUFFIXES = ("_cpu_packed", "_cpu_scales_zeros")
"""Suffixes of the kernel-cache buffers this pass registers."""

_ALLOWED = (torch.bfloat16, torch.float16)


def _weight_of(gm: fx.GraphModule, node: fx.Node) -> Optional[QuantizedWeight]:
    """The `QuantizedWeight` a linear_affine / linear_binary node reads (None for nf4)."""
    a = node.args
    if node.target == torch.ops.myqasr.linear_affine.default:
        packed, scale, zero, bits, group, n, k = a[1], a[2], a[3], a[4], a[5], a[6], a[7]
        fmt = f"int{bits}"
    elif node.target == torch.ops.myqasr.linear_binary.default:
        packed, scale, group, n, k = a[1], a[2], a[3], a[4], a[5]
        zero, fmt = None, "int1"
    else:
        return None
    t = lambda x: None if x is None else _get_attr(gm, x.target)  # noqa: E731
    return QuantizedWeight(fmt=fmt, group_size=group, shape=(n, k), packed=t(packed), scale_t=t(scale), zero_t=t(zero))


def use_cpu_kernels(gm: fx.GraphModule, *, compute_dtype: torch.dtype = torch.bfloat16) -> fx.GraphModule:
    """Run every packed linear op of a lowered ``gm`` in ``compute_dtype`` on aten's int4 CPU kernel, in place.

    Args:
        gm: a module from `lower_quantized` (or a loaded artifact's module); weights on CPU.
        compute_dtype: ``torch.bfloat16`` (default) or ``torch.float16``: the matmul activation dtype.
    Returns:
        ``gm``, recompiled; ``gm.meta["myqasr_compute_dtype"]`` records the choice. Calling it twice
        with the same dtype is a no-op; with another dtype it is an error.
    """
    if compute_dtype not in _ALLOWED:
        raise ValueError(f"compute_dtype must be torch.bfloat16 or torch.float16 (the aten int4 CPU kernel's dtypes), got {compute_dtype}")
    done = gm.meta.get("myqasr_compute_dtype")
    if done is not None:
        if done != compute_dtype:
            raise ValueError(f"this module already computes in {done}; lower it again to use {compute_dtype}")
        return gm
    graph = gm.graph
    caches: dict[str, tuple[fx.Node, fx.Node] | None] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in LINEAR_OPS:
            continue
        val = node.meta.get("val")
        out_dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32
        with graph.inserting_before(node):
            x = graph.call_function(aten.to.dtype, (node.args[0], compute_dtype))
        args = list(node.args)
        args[0] = x
        qw = _weight_of(gm, node)
        if qw is not None and qw.device.type == "cpu":
            key = node.args[1].target
            if key not in caches:
                caches[key] = None
                if qw.prepare_cpu():
                    base = key[: -len("_packed")] if key.endswith("_packed") else key
                    names = [_unique_name(gm, base + s) for s in CACHE_SUFFIXES]
                    gm.register_buffer(names[0], qw._cpu_packed)
                    gm.register_buffer(names[1], qw._cpu_scales_zeros)
                    with graph.inserting_before(node):
                        caches[key] = (graph.get_attr(names[0]), graph.get_attr(names[1]))
            if caches[key] is not None:
                # the cache operands are the schema's last two (optional) arguments
                n_args = len(node.target._schema.arguments)
                args += [None] * (n_args - len(args))
                args[-2], args[-1] = caches[key]
        node.args = tuple(args)
        with graph.inserting_after(node):
            back = graph.call_function(aten.to.dtype, (node, out_dtype))
        node.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
        if val is not None:
            back.meta["val"] = val
    graph.lint()
    gm.recompile()
    gm.meta["myqasr_compute_dtype"] = compute_dtype
    return gm


__all__ = ["CACHE_SUFFIXES", "use_cpu_kernels"]
