"""`use_cpu_kernels`: deploy a lowered module on CPU, weights in aten's int4 layout, matmuls in bfloat16.

Why: the exported Whisper programs run float32 activations, and with float32 activations the
portable ``myqasr::linear_*`` ops dequantize the whole weight on every call (exact, but slower than
the float32 model). aten's ``_weight_int4pack_mm_for_cpu`` is fast with **bfloat16** activations at the few rows of
decoding (the deployed tiny.en decodes faster than the fp32 model: benchmarks/results/e2e_tiny-en_cpu2.md).
This pass

* converts every eligible packed weight (intB / int1, group size a multiple of 32) once into the
  kernel's own layout (`cpu.build_int4pack`: N padded to 16 rows, scales and zeros in
  ``compute_dtype``) and registers it as buffers ``<prefix>_cpu_packed`` / ``<prefix>_cpu_scales_zeros``;
* rewrites the linear ops to ``myqasr::linear_int4pack`` and the token lookups to
  ``myqasr::embedding_int4pack`` on those buffers (a tied embedding / output projection stays one copy);
* **deletes** the portable bit planes those ops read, so the weights are held once.

Memory (`torch_myqasr.lowering.quantized_weight_bytes`): an int4 or int8 weight costs exactly its portable bytes (bfloat16
scale and zero per group where the portable format has float16 ones; int5-8 use two nibble planes
whose high plane's scale is derived); int1-int3 weights are stored in 4-bit nibbles and int5-int7 in
8 bits, so a scheme of those formats takes more memory on CPU than its size says. N rounds up to a
multiple of 16 (Whisper's 51865-token vocabulary: 7 rows). nf4 weights and group sizes the kernel
does not take stay on the portable ops.

Numerics: the activations of the decoding matmuls are rounded to bfloat16; the encoder's (more than
`torch_myqasr.ops.int4pack.KERNEL_MAX_ROWS` rows) run in float32 on the dequantized weight;
attention, norms, softmax and the residual stream stay float32: outputs differ from the converted model by about bfloat16
precision and greedy transcripts can differ. Artifacts always store the portable layout;
`torch_myqasr.artifact.load_artifact(..., compute_dtype=torch.bfloat16)` applies this pass at load.
"""

from __future__ import annotations

import warnings

import torch
from torch import fx

from torch_myqasr.lowering.passes import EMBEDDING_OP, _arg, _del_attr, _get_attr, _unique_name
from torch_myqasr.ops import QuantizedWeight, cpu
from torch_myqasr.ops import int4pack as _int4pack  # noqa: F401  (registers the ops below)

RESIDENT_SUFFIXES = ("_cpu_packed", "_cpu_scales_zeros")
"""Suffixes of the CPU-resident weight buffers this pass registers."""

LINEAR_INT4PACK = torch.ops.myqasr.linear_int4pack.default
EMBEDDING_INT4PACK = torch.ops.myqasr.embedding_int4pack.default

_ALLOWED = (torch.bfloat16, torch.float16)
_AFFINE = torch.ops.myqasr.linear_affine.default
_BINARY = torch.ops.myqasr.linear_binary.default


def _portable_weight(gm: fx.GraphModule, node: fx.Node) -> tuple[QuantizedWeight, int, fx.Node | None] | None:
    """(weight, group size, bias node) of a portable linear / lookup node; None for other nodes and nf4."""
    t = lambda x: None if x is None else _get_attr(gm, x.target)  # noqa: E731
    a = node.args
    if node.target == _AFFINE:
        packed, scale, zero, fmt, group, n, k, bias = a[1], a[2], a[3], f"int{a[4]}", a[5], a[6], a[7], _arg(node, 8, "bias", None)
    elif node.target == _BINARY:
        packed, scale, zero, fmt, group, n, k, bias = a[1], a[2], None, "int1", a[3], a[4], a[5], _arg(node, 6, "bias", None)
    elif node.target == EMBEDDING_OP and a[4] != "nf4":
        packed, scale, zero, fmt, group, n, k, bias = a[1], a[2], a[3], a[4], a[5], a[6], a[7], None
    else:
        return None
    qw = QuantizedWeight(fmt=fmt, group_size=group, shape=(n, k), packed=t(packed), scale_t=t(scale), zero_t=t(zero))
    return qw, group, bias


def use_cpu_kernels(gm: fx.GraphModule, *, compute_dtype: torch.dtype = torch.bfloat16) -> fx.GraphModule:
    """Hold ``gm``'s packed weights in aten's int4 CPU layout and run its matmuls in ``compute_dtype``, in place.

    Args:
        gm: a module from `lower_quantized` (or a loaded artifact's module), weights on CPU.
        compute_dtype: ``torch.bfloat16`` (default) or ``torch.float16``: the matmuls' activation dtype.
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
    if not cpu.check_int4pack_layout():
        # the lookup and the encoder's path read aten's private byte order; never guess it
        warnings.warn(
            "this torch's int4 CPU weight layout is not the one torch_myqasr reads; the module stays on the "
            "portable myqasr ops (exact, slower)", stacklevel=2,
        )
        return gm
    graph = gm.graph
    resident: dict[str, list[str]] = {}  # portable packed buffer -> resident buffer names
    portable_targets: set[str] = set()
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        found = _portable_weight(gm, node)
        if found is None:
            continue
        qw, group, bias = found
        if qw.device.type != "cpu" or not cpu.int4pack_eligible(qw):
            continue
        key = node.args[1].target
        if key not in resident:
            packed, scales_zeros = cpu.build_int4pack(qw, compute_dtype)
            base = key[: -len("_packed")] if key.endswith("_packed") else key
            names = [_unique_name(gm, base + s) for s in RESIDENT_SUFFIXES]
            gm.register_buffer(names[0], packed)
            gm.register_buffer(names[1], scales_zeros)
            resident[key] = names
        portable_targets.update(a.target for a in node.args[1:4] if isinstance(a, fx.Node) and a.op == "get_attr")
        n, k = qw.shape
        with graph.inserting_before(node):
            packed_n, sz_n = (graph.get_attr(name) for name in resident[key])
            if node.target == EMBEDDING_OP:
                new = graph.call_function(EMBEDDING_INT4PACK, (node.args[0], packed_n, sz_n, group, n, k, node.args[8]))
            else:
                new = graph.call_function(LINEAR_INT4PACK, (node.args[0], packed_n, sz_n, group, n, k, bias))
        new.meta.update({key_: node.meta[key_] for key_ in ("val", "nn_module_stack") if key_ in node.meta})
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    still_read = {n.target for n in graph.nodes if n.op == "get_attr"}
    for target in sorted(portable_targets - still_read):
        _del_attr(gm, target)  # the portable bit planes leave: the weight is held once
    graph.lint()
    gm.recompile()
    gm.meta["myqasr_compute_dtype"] = compute_dtype
    return gm


__all__ = ["EMBEDDING_INT4PACK", "LINEAR_INT4PACK", "RESIDENT_SUFFIXES", "use_cpu_kernels"]
