"""`lower_quantized`: turn a ``convert_pt2e`` graph's (dequantize -> linear / conv1d / embedding)
patterns into ``myqasr::`` ops on packed low-bit weights.

Before (what `MyQASRQuantizer` + ``convert_pt2e`` leave, docs/quantizer.md)::

    codes, scale, zero = get_attr <layer>_myqasr_{codes,scale,zero}     # uint8 codes, one byte per weight
    w = myqasr.dequantize_groupwise(codes, scale, zero, "int4", 64, shape, float32)
    y = aten.linear(x, w, b) | aten.conv1d(x, w, b, ...) | aten.embedding(w, ids)

After::

    packed, scale_t, zero_t = get_attr <layer>_myqasr_{packed,scale_t,zero_t}   # QuantizedWeight tensors
    y = myqasr.linear_affine(x, packed, scale_t, zero_t, bits, 64, N, K, b)        # linear
    y = transpose(linear_affine(flatten(permute(unfold(pad(x))))), 1, 2)          # conv1d: im2col
    y = myqasr.embedding_packed(ids, packed, scale_t, zero_t, "int4", 64, N, K, float32)  # lookup

* One dequantize node feeding several ops (Whisper's tied ``embed_tokens`` / ``proj_out``) gets ONE
  set of packed buffers that every replacement reads: the weight exists once.
* The uint8 codes, the float16 scale / zero buffers and the dequantize node are removed, so no
  float (or one-byte-per-weight) copy of a quantized weight remains.
* Conv1d (Whisper's conv1 / conv2: kernel 3, padding 1, stride 1 / 2) is lowered with **im2col**:
  pad, unfold the time axis into ``[B, L_out, I*k]`` patches (the ``[O, I*k]`` layout the quantizer
  used for the codes) and run the same packed linear op. No dequantized conv fallback exists:
  dilation != 1, groups != 1 or transposed convs are refused with an error (the quantizer never
  annotates them).
* Numerics are unchanged by default: on CPU with float32 activations the op dequantizes exactly
  as ``dequantize_groupwise`` did and calls ``F.linear``, so outputs equal the q/dq graph's.
  ``compute_dtype=torch.bfloat16`` switches to the CPU deployment layout (see `use_cpu_kernels`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import fx

from torch_myqasr.ops import QuantizedWeight
from torch_myqasr.ops import embedding as _embedding  # noqa: F401  (registers myqasr::embedding_packed)
from torch_myqasr.ops import library as _library  # noqa: F401  (registers myqasr::linear_*)

aten = torch.ops.aten

PACKED_SUFFIXES = ("_packed", "_scale_t", "_zero_t")
"""Suffixes of the buffers a lowered layer owns (``<prefix>_packed`` ...)."""

LINEAR_OPS = (
    torch.ops.myqasr.linear_affine.default,
    torch.ops.myqasr.linear_binary.default,
    torch.ops.myqasr.linear_nf4.default,
)
"""The packed linear ops a lowered graph calls."""

EMBEDDING_OP = torch.ops.myqasr.embedding_packed.default


class LoweringError(ValueError):
    """A converted graph holds a pattern the lowering pass cannot turn into packed ops."""


@dataclass(frozen=True)
class LoweredLayer:
    """One packed weight in a lowered module.

    Attributes:
        prefix: buffer name prefix (``<prefix>_packed`` / ``_scale_t`` / ``_zero_t``).
        fmt: weight format (``"int4"`` ...).
        group_size: weights per group along K.
        shape: the original weight shape ([N, K] linear / embedding, [O, I, k] conv1d).
        uses: the ops that read it (``"linear"``, ``"conv1d"``, ``"embedding"``), in graph order.
        nbytes: bytes of the packed tensors (codes + scales + zeros), equal to
            `torch_myqasr.formats.weight_nbytes`.
    """

    prefix: str
    fmt: str
    group_size: int
    shape: tuple[int, ...]
    uses: tuple[str, ...]
    nbytes: int


def _get_attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _del_attr(gm: torch.nn.Module, target: str) -> None:
    *path, name = target.split(".")
    owner = _get_attr(gm, ".".join(path)) if path else gm
    delattr(owner, name)


def _prefix(codes_target: str) -> str:
    """``m_fc1_myqasr_codes`` -> ``m_fc1_myqasr`` (the quantizer's naming; anything else is sanitised)."""
    base = codes_target[: -len("_codes")] if codes_target.endswith("_codes") else codes_target + "_q"
    return base.replace(".", "_")


def _unique_name(gm: torch.nn.Module, name: str) -> str:
    candidate, i = name, 1
    while hasattr(gm, candidate):
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _single(value: Any, what: str, node: fx.Node) -> int:
    """A 1-D conv's stride / padding / dilation given as ``[v]`` or ``v``."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise LoweringError(f"{node.name}: expected a 1-D conv {what} of one value, got {value}")
        value = value[0]
    if not isinstance(value, int):
        raise LoweringError(f"{node.name}: conv {what} must be an int, got {value!r} (string padding is not supported)")
    return value


def _conv_params(user: fx.Node) -> tuple[Any, Any, int, int]:
    """(x, bias, stride, padding) of a 1-D ``aten.conv1d`` / ``aten.convolution``; refuses other convs."""
    x, bias = user.args[0], _arg(user, 2, "bias", None)
    if user.target == aten.convolution.default:
        stride, padding, dilation, transposed, groups = (user.args[i] for i in (3, 4, 5, 6, 8))
        if transposed:
            raise LoweringError(f"{user.name}: transposed convolutions are not lowered; keep this layer in full precision")
    else:
        stride = _arg(user, 3, "stride", [1])
        padding = _arg(user, 4, "padding", [0])
        dilation = _arg(user, 5, "dilation", [1])
        groups = _arg(user, 6, "groups", 1)
    if _single(dilation, "dilation", user) != 1 or groups != 1:
        raise LoweringError(
            f"{user.name}: only dilation 1 and groups 1 convs are lowered (im2col), got dilation={dilation} "
            f"groups={groups}; keep this layer in full precision (MyQASRQuantizer(keep_full_precision=...))"
        )
    val = user.args[0].meta.get("val") if isinstance(user.args[0], fx.Node) else None
    if val is not None and val.dim() != 3:
        raise LoweringError(f"{user.name}: conv input must be batched [B, C, L], got rank {val.dim()}")
    return x, bias, _single(stride, "stride", user), _single(padding, "padding", user)


def lower_quantized(
    gm: fx.GraphModule,
    *,
    compute_dtype: Optional[torch.dtype] = None,
) -> fx.GraphModule:
    """Replace every ``myqasr.dequantize_groupwise`` pattern of ``gm`` by packed ``myqasr::`` ops, in place.

    Args:
        gm: a ``convert_pt2e`` result (or any GraphModule with ``dequantize_groupwise`` nodes
            whose codes / scale / zero are ``get_attr`` buffers). Nodes not fed by a dequantize
            are left alone.
        compute_dtype: None (default): the ops compute in the activations' dtype on the portable
            packed weights, so outputs equal the converted model's. ``torch.bfloat16`` /
            ``torch.float16``: then call `use_cpu_kernels` (weights move to aten's int4 CPU layout,
            matmuls run in that dtype): the fast CPU deployment, with different rounding.
    Returns:
        ``gm`` itself, recompiled. ``gm.meta["myqasr_layers"]`` lists the `LoweredLayer` s.
    Raises:
        LoweringError: a dequantized weight feeds an op other than linear / 1-D conv / embedding,
            or a conv the im2col path cannot express; the message names the node and the fix.
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"lower_quantized takes the GraphModule convert_pt2e returns, got {type(gm).__name__}")
    from torch_myqasr.quantizer.dequant_op import dequantize_groupwise_op  # registers the op we match

    graph = gm.graph
    dequant_op = dequantize_groupwise_op._opoverload
    layers: list[LoweredLayer] = list(gm.meta.get("myqasr_layers", []))
    stale_attrs: list[fx.Node] = []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (dequant_op, dequant_op._overloadpacket):
            continue
        codes_n, scale_n, zero_n, fmt, group_size, shape, dtype = node.args
        for a, what in ((codes_n, "codes"), (scale_n, "scale"), (zero_n, "zero")):
            if not (isinstance(a, fx.Node) and a.op == "get_attr"):
                raise LoweringError(f"{node.name}: dequantize_groupwise {what} must be a get_attr buffer, got {a}")
        shape = [int(s) for s in shape]
        n, k = shape[0], math.prod(shape[1:])
        qw = QuantizedWeight.from_codes(
            _get_attr(gm, codes_n.target), _get_attr(gm, scale_n.target), _get_attr(gm, zero_n.target),
            fmt=fmt, group_size=int(group_size), in_features=k,
        )
        prefix = _prefix(codes_n.target)
        if any(hasattr(gm, prefix + suffix) for suffix in PACKED_SUFFIXES):
            prefix = _unique_name(gm, prefix)  # a name clash with an existing attribute: never overwrite it
        with graph.inserting_before(node):
            attrs = []
            for suffix, tensor in zip(PACKED_SUFFIXES, (qw.packed, qw.scale_t, qw.zero_t)):
                gm.register_buffer(prefix + suffix, tensor)
                attrs.append(graph.get_attr(prefix + suffix))
        packed_n, scalet_n, zerot_n = attrs
        uses = []
        for user in list(node.users):
            if user.op != "call_function":
                raise LoweringError(f"{node.name} feeds {user.op} {user.target}; only call_function users are lowered")
            if user.target == aten.linear.default and user.args[1] is node and user.args[0] is not node:
                bias = _arg(user, 2, "bias", None)
                with graph.inserting_before(user):
                    new = graph.call_function(
                        torch.ops.myqasr.linear_affine.default,
                        (user.args[0], packed_n, scalet_n, zerot_n, qw.bits, qw.group_size, n, k, bias),
                    )
                uses.append("linear")
            elif user.target in (aten.conv1d.default, aten.convolution.default) and user.args[1] is node:
                x, bias, stride, padding = _conv_params(user)
                kernel = shape[2]
                with graph.inserting_before(user):
                    if padding:
                        x = graph.call_function(aten.constant_pad_nd.default, (x, [padding, padding], 0.0))
                    patches = graph.call_function(aten.unfold.default, (x, 2, kernel, stride))  # [B, I, L_out, k]
                    patches = graph.call_function(aten.permute.default, (patches, [0, 2, 1, 3]))  # [B, L_out, I, k]
                    patches = graph.call_function(aten.flatten.using_ints, (patches, 2, 3))  # [B, L_out, I*k]
                    out = graph.call_function(
                        torch.ops.myqasr.linear_affine.default,
                        (patches, packed_n, scalet_n, zerot_n, qw.bits, qw.group_size, n, k, bias),
                    )
                    new = graph.call_function(aten.transpose.int, (out, 1, 2))  # [B, O, L_out]
                uses.append("conv1d")
            elif user.target == aten.embedding.default and user.args[0] is node:
                with graph.inserting_before(user):
                    new = graph.call_function(
                        EMBEDDING_OP, (user.args[1], packed_n, scalet_n, zerot_n, fmt, qw.group_size, n, k, dtype)
                    )
                uses.append("embedding")
            else:
                raise LoweringError(
                    f"{node.name} (a quantized {fmt} weight of shape {shape}) feeds {user.target} ({user.name}); "
                    "only aten.linear, 1-D aten.conv1d / aten.convolution and aten.embedding are lowered. "
                    "Keep that layer in full precision with MyQASRQuantizer(keep_full_precision=...)"
                )
            if "val" in user.meta:
                new.meta["val"] = user.meta["val"]
            new.meta["nn_module_stack"] = user.meta.get("nn_module_stack", {})
            user.replace_all_uses_with(new)
            graph.erase_node(user)
        graph.erase_node(node)
        stale_attrs += [codes_n, scale_n, zero_n]
        layers.append(LoweredLayer(prefix, fmt, qw.group_size, tuple(shape), tuple(uses), qw.nbytes))
    for attr in stale_attrs:
        if attr in graph.nodes and not attr.users:
            target = attr.target
            graph.erase_node(attr)
            if not any(n.op == "get_attr" and n.target == target for n in graph.nodes):
                _del_attr(gm, target)  # the codes / float16 scale / zero leave the module
    graph.lint()
    gm.recompile()
    gm.meta["myqasr_layers"] = layers
    if compute_dtype is not None:
        from torch_myqasr.lowering.cpu_kernels import use_cpu_kernels

        use_cpu_kernels(gm, compute_dtype=compute_dtype)
    return gm


__all__ = ["EMBEDDING_OP", "LINEAR_OPS", "LoweredLayer", "LoweringError", "PACKED_SUFFIXES", "lower_quantized"]
