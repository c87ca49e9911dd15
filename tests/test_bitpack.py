"""Round trips and byte sizes of every packing (triton_kernels/bitpack.py, QuantizedWeight)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_myqasr.formats import weight_nbytes
from torch_myqasr.ops import QuantizedWeight, quantize_weight
from triton_kernels import bitpack

ALL_FORMATS = ["int8", "int7", "int6", "int5", "int4", "int3", "int2", "int1", "nf4"]


def _bits(fmt: str) -> int:
    return 4 if fmt == "nf4" else int(fmt[3:])


@pytest.mark.parametrize("bits", range(1, 9))
def test_planes_cover_every_bit_once(bits):
    planes, shifts = bitpack.plane_bits(bits), bitpack.plane_shifts(bits)
    assert sum(planes) == bits
    assert all(p in (1, 2, 4, 8) for p in planes)
    covered = sorted(b for p, s in zip(planes, shifts) for b in range(s, s + p))
    assert covered == list(range(bits))


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 37), k_units=st.integers(1, 12), seed=st.integers(0, 2**31))
def test_pack_unpack_round_trip_random(bits, n, k_units, seed):
    k_pad = 8 * k_units  # any multiple of 8 fills whole bytes in every plane
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k_pad), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = bitpack.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == n * k_pad * bits // 8  # dense: no wasted bit
    assert torch.equal(bitpack.unpack_codes(packed, bits, k_pad), codes)


def test_pack_layout_is_documented_little_end_first():
    # int2, one column: k = 0..3 land in bits [0,2), [2,4), [4,6), [6,8) of byte 0.
    codes = torch.tensor([[1, 2, 3, 0, 3, 3, 3, 3]], dtype=torch.uint8)
    packed = bitpack.pack_codes(codes, 2)
    assert packed[:, 0].tolist() == [1 | 2 << 2 | 3 << 4, 255]
    # int3 = 2-bit plane (bits 2..1) then 1-bit plane (bit 0).
    codes3 = torch.tensor([[5, 0, 0, 0, 0, 0, 0, 7]], dtype=torch.uint8)
    p3 = bitpack.pack_codes(codes3, 3)[:, 0].tolist()
    assert p3 == [2, 3 << 6, 0b10000001]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="out of range"):
        bitpack.pack_codes(torch.full((2, 8), 4, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="whole bytes"):
        bitpack.pack_codes(torch.zeros(2, 12, dtype=torch.uint8), 3)
    with pytest.raises(TypeError, match="integer"):
        bitpack.pack_codes(torch.zeros(2, 8), 2)
    with pytest.raises(ValueError, match="bits must be"):
        bitpack.plane_bits(9)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("n,k,group", [(16, 64, 64), (40, 200, 64), (3, 96, 32), (5, 10, 8)])
def test_from_codes_round_trip_and_exact_nbytes(fmt, n, k, group):
    g = torch.Generator().manual_seed(n * 1000 + k)
    k_pad = -(-k // group) * group
    codes = torch.randint(0, 2 ** _bits(fmt), (n, k_pad), generator=g).to(torch.uint8)
    scale = torch.rand(n, k_pad // group, generator=g) + 0.01
    zero = torch.rand(n, k_pad // group, generator=g) * (2 ** _bits(fmt) - 1) if fmt not in ("int1", "nf4") else None
    qw = QuantizedWeight.from_codes(codes, scale, zero, fmt=fmt, group_size=group, in_features=k)
    assert torch.equal(qw.codes(), codes)
    assert torch.equal(qw.scales(), scale.half().float())
    if zero is not None:
        assert torch.equal(qw.zeros(), zero.half().float())
    assert qw.nbytes == weight_nbytes(fmt, n, k, group) == qw.expected_nbytes()
    assert qw.shape == (n, k) and qw.dequantize().shape == (n, k)
    # state_dict round trip (what the artifact stores)
    d = qw.state_dict()
    qw2 = QuantizedWeight.from_state_dict({**d, "shape": str(d["shape"]), "group_size": str(d["group_size"])})
    assert torch.equal(qw2.dequantize(), qw.dequantize()) and qw2.nbytes == qw.nbytes


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_quantize_weight_error_is_bounded(fmt):
    torch.manual_seed(0)
    w = torch.randn(24, 136)
    qw = quantize_weight(w, fmt, group_size=64)
    err = (qw.dequantize() - w).abs()
    if fmt.startswith("int") and fmt != "int1":
        # round to nearest: at most half a step (plus float16 rounding of scale and zero)
        step = qw.scales().repeat_interleave(64, dim=1)[:, :136]
        assert (err <= 0.5 * step * 1.01 + 1e-6).all()
    rel = (err.norm() / w.norm()).item()
    bound = {"int8": 0.01, "int7": 0.02, "int6": 0.04, "int5": 0.08, "int4": 0.16, "nf4": 0.16,
             "int3": 0.32, "int2": 0.7, "int1": 0.8}[fmt]
    assert rel < bound, f"{fmt}: relative error {rel}"


def test_int1_and_nf4_semantics():
    w = torch.tensor([[0.5, -1.0, 2.0, -0.5, 0.0, 1.0, -2.0, 1.0]])
    qw1 = quantize_weight(w, "int1", group_size=8)
    assert qw1.codes()[0].tolist() == [1, 0, 1, 0, 1, 1, 0, 1]
    assert torch.allclose(qw1.dequantize(), torch.sign(w + 1e-9) * w.abs().mean())
    qn = quantize_weight(w, "nf4", group_size=8)
    assert qn.codes()[0, 2].item() == 15 and qn.codes()[0, 6].item() == 0 and qn.codes()[0, 4].item() == 7
    assert qn.dequantize()[0, 2].item() == 2.0


def test_nf4_double_quant_size_and_error():
    torch.manual_seed(1)
    w = torch.randn(64, 640)  # 640 blocks of 64 -> 3 chunks of 256 scales
    plain = quantize_weight(w, "nf4", 64)
    dq = quantize_weight(w, "nf4", 64, double_quant=True)
    assert dq.nbytes == weight_nbytes("nf4", 64, 640, 64, double_quant=True) < plain.nbytes
    assert torch.equal(dq.codes(), plain.codes())
    assert (dq.scales() - plain.scales()).abs().max() <= (plain.scales().max() - plain.scales().min()) / 255
    with pytest.raises(ValueError, match="nf4 only"):
        quantize_weight(w, "int4", 64, double_quant=True)


def test_constant_and_zero_groups():
    # The range always includes 0, so a constant group is its top (or bottom) code: exact up to the
    # float16 rounding of the scale; an all-zero group is exactly zero.
    w = torch.cat([torch.full((2, 64), 3.0), torch.zeros(2, 64), torch.full((2, 64), -0.25)])
    for fmt in ("int8", "int4", "int2"):
        deq = quantize_weight(w, fmt, 64).dequantize()
        torch.testing.assert_close(deq, w, rtol=1e-3, atol=0), fmt
        assert torch.equal(deq[2:4], w[2:4])


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown weight format 'int9'"):
        quantize_weight(torch.randn(4, 8), "int9")
    with pytest.raises(ValueError, match="unquantized"):
        quantize_weight(torch.randn(4, 8), "fp16")
    with pytest.raises(ValueError, match="floating-point"):
        quantize_weight(torch.randn(4, 8, 2), "int4")
    with pytest.raises(ValueError, match="float16 range"):
        quantize_weight(torch.full((1, 8), 1e6), "nf4", 8)
    codes = torch.zeros(2, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="scale must be"):
        QuantizedWeight.from_codes(codes, torch.ones(2, 2), torch.ones(2, 2), fmt="int4", group_size=64)
    with pytest.raises(ValueError, match="asymmetric"):
        QuantizedWeight.from_codes(codes, torch.ones(2, 1), None, fmt="int4", group_size=64)
    with pytest.raises(ValueError, match="out of range"):
        QuantizedWeight.from_codes(codes + 16, torch.ones(2, 1), torch.ones(2, 1), fmt="int4", group_size=64)
