"""``myqasr::dequantize_groupwise``: the one op a converted graph uses to rebuild a weight.

torchao's ``dequantize_affine`` computes ``(q - zero) * scale`` with a float zero too, but it
cannot drop the K padding or restore a Conv1d's [O, I, k] shape, so a converted weight would be
several ops (dequantize, slice, reshape) that the lowering pass would have to match together. This
op carries everything in its arguments instead, so ``dequantize_groupwise -> linear / conv1d /
embedding`` is a two-node pattern for the lowering pass to replace with packed kernels.
"""

from __future__ import annotations

import torch

from torch_myqasr.quantizer.weight_quant import bits_of, dequantize_groupwise


@torch.library.custom_op("myqasr::dequantize_groupwise", mutates_args=())
def dequantize_groupwise_op(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    fmt: str,
    group_size: int,
    shape: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Dequantize group-wise ``fmt`` codes to a float weight of ``shape`` and ``dtype``.

    Args:
        codes: uint8 [N, K_padded], one code per weight (unpacked).
        scale: float16 [N, K_padded / group_size].
        zero: float16 [N, K_padded / group_size], in quantized units.
        fmt: ``"int2"`` .. ``"int8"`` (checked: codes must lie in ``[0, 2**bits - 1]`` by construction).
        group_size: weights per group along K.
        shape: the original weight shape ([N, K] linear / embedding, [O, I, k] conv1d).
        dtype: dtype of the returned weight.
    """
    bits_of(fmt)
    return dequantize_groupwise(codes, scale, zero, group_size, shape=shape, dtype=dtype)


@dequantize_groupwise_op.register_fake
def _(codes, scale, zero, fmt, group_size, shape, dtype):
    return codes.new_empty(shape, dtype=dtype)
