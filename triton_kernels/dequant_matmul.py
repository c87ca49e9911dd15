"""Triton dequantize-in-registers matmul for every low-bit weight format: ``y = x @ W^T (+ bias)``.

One kernel body serves the three format families (affine intB, binary int1, NF4 codebook) through
a compile-time ``FMT`` switch: tiling, split-K, masking and the epilogue are shared and only the
~10 lines that turn codes into floats differ, so each family is specialised at compile time with
no runtime branching. Two launch shapes:

* **GEMV path** (M <= 16, decoding; memory-bound): every program owns a BLOCK_N slice of output
  columns and a 1/SPLIT_K share of K, streams its packed weight tile once and applies it to all M
  rows (M <= 4: CUDA-core multiply-reduce, 4 < M <= 16: a 16-row tensor-core dot); partial sums
  are atomically added into a float32 buffer so small-N layers still fill the GPU.
* **GEMM path** (M > 16, the encoder; compute-bound): classic tiled tensor-core matmul, one
  program per (BLOCK_M, BLOCK_N) output tile, full K loop, bias fused into the epilogue.

Both are autotuned on GPU (configs below, keyed on N, K and an M bucket). Under
``TRITON_INTERPRET=1`` autotuning is skipped (it would benchmark every config on the CPU) and a
fixed large-block config is used; bf16 activations are upcast to float32 before ``tl.dot`` there
because the interpreter's bf16 dot is wrong (it multiplies raw bits).

Layout of the packed weights: triton_kernels/bitpack.py (planes of ``uint8 [K_pad*b/8, N]``);
scales / zeros are ``[n_groups, N]`` (N contiguous).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from triton_kernels import bitpack

FMT_AFFINE, FMT_BINARY, FMT_NF4 = 0, 1, 2
GEMV_MAX_M = 16
"""Largest M (rows of activations) sent to the GEMV path."""


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else False


@triton.jit
def _load_plane(w_ptr, row0, offs_k, offs_n, N, mask, WIDTH: tl.constexpr):
    """Codes of one bit plane for a [BLOCK_K, BLOCK_N] tile, int32 in [0, 2**WIDTH)."""
    PER: tl.constexpr = 8 // WIDTH
    rows = row0 + offs_k // PER
    byte = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :], mask=mask, other=0).to(tl.int32)
    if PER == 1:
        return byte
    return (byte >> ((offs_k % PER) * WIDTH)[:, None]) & ((1 << WIDTH) - 1)


@triton.jit
def _dequant_mm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, dqs_ptr, dqo_ptr, cb_ptr, bias_ptr, y_ptr,
    M, N, K, K_PAD, stride_xm, stride_ym, M_BUCKET,
    FMT: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
    GROUP: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_start = pid_k * per_split
    t_end = tl.minimum(t_start + per_split, k_tiles)
    for t in range(t_start, t_end):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wmask = mask_k[:, None] & mask_n[None, :]
        # Codes: the planes of the bitpack layout, most significant first.
        q = _load_plane(w_ptr, 0, offs_k, offs_n, N, wmask, P0) << S0
        if P1 > 0:
            q = q | (_load_plane(w_ptr, K_PAD * P0 // 8, offs_k, offs_n, N, wmask, P1) << S1)
        if P2 > 0:
            q = q | (_load_plane(w_ptr, K_PAD * (P0 + P1) // 8, offs_k, offs_n, N, wmask, P2) << S2)
        # Per-group metadata: one row per tile when the tile sits inside a group, else a gather.
        if GROUP % BLOCK_K == 0:
            g = (t * BLOCK_K) // GROUP + tl.zeros((1, BLOCK_N), dtype=tl.int32)
            meta_mask = mask_n[None, :]
        else:
            g = (offs_k // GROUP)[:, None] + tl.zeros((1, BLOCK_N), dtype=tl.int32)
            meta_mask = wmask
        meta_off = g * N + offs_n[None, :]
        if DOUBLE_QUANT:
            code = tl.load(s_ptr + meta_off, mask=meta_mask, other=0).to(tl.float32)
            chunk = meta_off // 256
            scale = code * tl.load(dqs_ptr + chunk, mask=meta_mask, other=0.0) \
                + tl.load(dqo_ptr + chunk, mask=meta_mask, other=0.0)
        else:
            scale = tl.load(s_ptr + meta_off, mask=meta_mask, other=0.0).to(tl.float32)
        if FMT == 0:
            zero = tl.load(z_ptr + meta_off, mask=meta_mask, other=0.0).to(tl.float32)
            w = (q.to(tl.float32) - zero) * scale
        elif FMT == 1:
            w = (q.to(tl.float32) * 2.0 - 1.0) * scale
        else:
            w = tl.load(cb_ptr + q) * scale
        if USE_DOT:
            if UPCAST:
                acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")
        else:
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += bias[None, :] * (pid_k == 0).to(tl.float32)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, acc, mask=out_mask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


def _gemv_configs() -> list[triton.Config]:
    configs = []
    for bn in (64, 128, 256):
        for bk in (32, 64, 128):
            for split in (1, 2, 4, 8, 16):
                for warps in (4, 8):
                    configs.append(triton.Config(
                        {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split}, num_warps=warps, num_stages=3))
    return configs


def _gemm_configs() -> list[triton.Config]:
    configs = []
    for bm, bn, bk, warps, stages in [
        (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4),
        (64, 256, 32, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (256, 128, 64, 8, 3),
    ]:
        configs.append(triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages))
    return configs


_KEY = ["M_BUCKET", "N", "K", "FMT", "P0", "P1", "P2", "GROUP"]
_gemv_tuned = triton.autotune(configs=_gemv_configs(), key=_KEY, reset_to_zero=["y_ptr"])(_dequant_mm_kernel)
_gemm_tuned = triton.autotune(configs=_gemm_configs(), key=_KEY)(_dequant_mm_kernel)


_CODEBOOKS: dict[torch.device, torch.Tensor] = {}


def _codebook(device: torch.device) -> torch.Tensor:
    """The NF4 table as float32 on ``device``, copied there once (not on every call)."""
    if device not in _CODEBOOKS:
        _CODEBOOKS[device] = torch.tensor(bitpack.NF4_CODEBOOK, dtype=torch.float32, device=device)
    return _CODEBOOKS[device]


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def dequant_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale_t: torch.Tensor,
    zero_t: Optional[torch.Tensor],
    *,
    fmt: str,
    group_size: int,
    n: int,
    k: int,
    bias: Optional[torch.Tensor] = None,
    dq_scale: Optional[torch.Tensor] = None,
    dq_offset: Optional[torch.Tensor] = None,
    config: Optional[dict] = None,
    wrap: Callable = lambda kernel: kernel,
) -> torch.Tensor:
    """``x [..., k] @ W^T (+ bias)`` with W given by packed low-bit tensors; returns x.dtype [..., n].

    ``fmt`` is one of int1..int8 / nf4, tensors as in `QuantizedWeight` (``packed`` uint8
    [K_pad*bits/8, n], ``scale_t`` / ``zero_t`` [n_groups, n]). ``config`` forces a launch config
    (keys BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, USE_DOT, num_warps) instead of autotuning; tests use
    it to drive both paths under the interpreter. ``wrap`` is ``torch.library.wrap_triton`` when
    called from a ``triton_op``, so torch.compile sees the kernel.
    """
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"activations must be float16, bfloat16 or float32, got {x.dtype}")
    bits = 4 if fmt == "nf4" else int(fmt[3:])
    fmt_id = FMT_NF4 if fmt == "nf4" else FMT_BINARY if fmt == "int1" else FMT_AFFINE
    planes = list(bitpack.plane_bits(bits)) + [0, 0]
    shifts = list(bitpack.plane_shifts(bits)) + [0, 0]
    k_pad = scale_t.shape[0] * group_size
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    gemv = m <= GEMV_MAX_M
    cb = _codebook(x.device) if fmt_id == FMT_NF4 else scale_t
    dummy = scale_t  # unused pointer arguments still need a tensor
    interp = interpreting()
    common = dict(
        M_BUCKET=min(_next_pow2(m), 4096),
        FMT=fmt_id, P0=planes[0], P1=planes[1], P2=planes[2], S0=shifts[0], S1=shifts[1], S2=shifts[2],
        GROUP=group_size, DOUBLE_QUANT=dq_scale is not None, HAS_BIAS=bias is not None,
        UPCAST=interp and x.dtype == torch.bfloat16,
    )
    if config is None and interp:
        # Few, large programs: interpreter time grows with the program count.
        config = dict(BLOCK_N=min(64, _next_pow2(n)), BLOCK_K=64, SPLIT_K=1)
        config.update(dict(BLOCK_M=min(_next_pow2(m), 4), USE_DOT=False) if m <= 4 else
                      dict(BLOCK_M=min(max(16, _next_pow2(m)), 32), USE_DOT=True))
    if config is not None:
        cfg = dict(config)
        num_warps = cfg.pop("num_warps", 4)
        split = cfg.get("SPLIT_K", 1)
        y = torch.zeros(m, n, dtype=torch.float32, device=x.device) if split > 1 else \
            torch.empty(m, n, dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), split)
        wrap(_dequant_mm_kernel)[grid](
            x2, packed, scale_t, dummy if zero_t is None else zero_t,
            dummy if dq_scale is None else dq_scale, dummy if dq_offset is None else dq_offset,
            cb, dummy if bias is None else bias, y,
            m, n, k, k_pad, x2.stride(0), y.stride(0),
            **common, **cfg, num_warps=num_warps,
        )
    elif gemv:
        y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        wrap(_gemv_tuned)[grid](
            x2, packed, scale_t, dummy if zero_t is None else zero_t,
            dummy if dq_scale is None else dq_scale, dummy if dq_offset is None else dq_offset,
            cb, dummy if bias is None else bias, y,
            m, n, k, k_pad, x2.stride(0), y.stride(0),
            **common, BLOCK_M=_next_pow2(m) if m <= 4 else 16, USE_DOT=m > 4,
        )
    else:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), 1)  # noqa: E731
        wrap(_gemm_tuned)[grid](
            x2, packed, scale_t, dummy if zero_t is None else zero_t,
            dummy if dq_scale is None else dq_scale, dummy if dq_offset is None else dq_offset,
            cb, dummy if bias is None else bias, y,
            m, n, k, k_pad, x2.stride(0), y.stride(0),
            **common, USE_DOT=True, SPLIT_K=1,
        )
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
