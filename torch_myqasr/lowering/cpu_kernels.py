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
from torch_myqasr.ops import QuantizedWeight, cpu

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


_N_ALIGN = 16  # aten's int4 weight-pack kernel takes N % 16 == 0


def _sliced(qw: QuantizedWeight, start: int, stop: int) -> QuantizedWeight:
    """Output rows ``start:stop`` of ``qw`` (copies of the column slices of its tensors)."""
    cut = lambda t: None if t is None else t[:, start:stop]  # noqa: E731
    return QuantizedWeight(fmt=qw.fmt, group_size=qw.group_size, shape=(stop - start, qw.shape[1]),
                           packed=cut(qw.packed), scale_t=cut(qw.scale_t), zero_t=cut(qw.zero_t))


def _register_cache(gm: fx.GraphModule, before: fx.Node, key: str, qw: QuantizedWeight):
    """Build aten's int4 operands for ``qw``, register them as buffers, return their get_attr nodes (or None)."""
    if not qw.prepare_cpu():
        return None
    base = key[: -len("_packed")] if key.endswith("_packed") else key
    names = [_unique_name(gm, base + s) for s in CACHE_SUFFIXES]
    gm.register_buffer(names[0], qw._cpu_packed)
    gm.register_buffer(names[1], qw._cpu_scales_zeros)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(names[0]), gm.graph.get_attr(names[1])


def _split_ragged(gm: fx.GraphModule, node: fx.Node, args: list, qw: QuantizedWeight, n_main: int, caches: dict) -> None:
    """Replace ``node`` (its activation already cast in ``args[0]``) by kernel(rows :n_main) ++ fallback(rows n_main:)."""
    graph = gm.graph
    affine = node.target == torch.ops.myqasr.linear_affine.default
    n, k = qw.shape
    tensor_pos = (1, 2, 3) if affine else (1, 2)
    bias_pos = 8 if affine else 6
    key = node.args[1].target + ":main"
    if key not in caches:
        caches[key] = _register_cache(gm, node, node.args[1].target.replace("_packed", "_main_packed"), _sliced(qw, 0, n_main))
    parts = []
    with graph.inserting_before(node):
        for start, stop, cache in ((0, n_main, caches[key]), (n_main, n, None)):
            part = list(args) + [None] * (len(node.target._schema.arguments) - len(args))
            for i in tensor_pos:  # column slices of [rows, N] tensors are views: no copy of the weight
                part[i] = graph.call_function(aten.slice.Tensor, (node.args[i], 1, start, stop))
            if part[bias_pos] is not None:
                part[bias_pos] = graph.call_function(aten.slice.Tensor, (part[bias_pos], 0, start, stop))
            part[6 if affine else 4] = stop - start  # n
            if cache is not None:
                part[-2], part[-1] = cache
            parts.append(graph.call_function(node.target, tuple(part)))
        joined = graph.call_function(aten.cat.default, (parts, -1))
    node.replace_all_uses_with(joined)
    graph.erase_node(node)
    val = node.meta.get("val")
    out_dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32
    with graph.inserting_after(joined):
        back = graph.call_function(aten.to.dtype, (joined, out_dtype))
    joined.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)


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
        n = qw.shape[0] if qw is not None else 0
        n_main = n - n % _N_ALIGN
        if qw is not None and qw.device.type == "cpu" and n % _N_ALIGN and n_main and cpu.int4pack_eligible(
            _sliced(qw, 0, n_main)
        ):
            # aten's kernel needs N % 16 == 0 (Whisper's vocabulary, 51865, is not): run the first
            # n_main outputs on it, through views of the packed buffers, and the last few rows on the
            # exact fallback (a [n % 16, K] dequantize per call), then concatenate.
            _split_ragged(gm, node, args, qw, n_main, caches)
            continue
        if qw is not None and qw.device.type == "cpu":
            key = node.args[1].target
            if key not in caches:
                caches[key] = _register_cache(gm, node, key, qw)
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
