"""The myqasr:: ops on CPU: reference agreement, which path runs, opcheck, torch.compile, errors."""

import pytest
import torch
import torch.nn.functional as F

from torch_myqasr.ops import QuantizedWeight, library, quantize_weight, quantized_linear

FORMATS = ["int8", "int7", "int6", "int5", "int4", "int3", "int2", "int1", "nf4"]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _rel_err(y, x, qw, bias):
    ref = F.linear(x.double(), qw.dequantize(torch.float64), None if bias is None else bias.double())
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m,n,k", [(1, 48, 200), (17, 32, 64), (3, 40, 96)])
def test_cpu_path_matches_float64_reference(fmt, dtype, m, n, k):
    g = torch.Generator().manual_seed(m + n + k)
    qw = quantize_weight(torch.randn(n, k, generator=g), fmt, group_size=64)
    x = (torch.randn(m, k, generator=g) + 0.1).to(dtype)
    bias = torch.randn(n, generator=g)
    y = quantized_linear(x, qw, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    assert _rel_err(y, x, qw, bias) < TOL[dtype]
    # aten's int4 weight-pack kernel is used exactly where documented (intB / int1; N padded to 16).
    assert (qw._cpu_packed is not None) == (fmt != "nf4")


def test_int4pack_path_is_taken_and_cached(monkeypatch):
    qw = quantize_weight(torch.randn(32, 128), "int3", group_size=128)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    quantized_linear(x, qw)
    packed = qw._cpu_packed
    calls = []
    monkeypatch.setattr("torch_myqasr.ops.cpu.fallback_linear", lambda *a, **kw: calls.append(a))
    monkeypatch.setattr(type(qw), "prepare_cpu", lambda self: pytest.fail("rebuilt the CPU pack"))
    y = quantized_linear(x, qw)
    assert qw._cpu_packed is packed and not calls  # no rebuild, no fallback
    assert _rel_err(y, x, qw, None) < TOL[torch.bfloat16]


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2", "int1"])
def test_int4pack_handles_group_256_and_512(fmt):
    # group sizes above aten's 256 are run with repeated scales
    qw = quantize_weight(torch.randn(16, 512), fmt, group_size=512)
    x = torch.randn(2, 512, dtype=torch.bfloat16)
    assert _rel_err(quantized_linear(x, qw), x, qw, None) < TOL[torch.bfloat16]
    assert qw._cpu_packed is not None


def _op_args(fmt, with_cpu_pack, dtype=torch.bfloat16):
    torch.manual_seed(0)
    qw = quantize_weight(torch.randn(32, 96), fmt, group_size=32, double_quant=fmt == "nf4")
    if with_cpu_pack:
        assert qw.prepare_cpu()
    x = torch.randn(3, 96, dtype=dtype)
    bias = torch.randn(32, dtype=dtype)
    n, k = qw.shape
    if fmt == "nf4":
        return torch.ops.myqasr.linear_nf4.default, (x, qw.packed, qw.scale_t, 32, n, k, bias, qw.dq_scale, qw.dq_offset)
    cpu = (qw._cpu_packed, qw._cpu_scales_zeros)
    if fmt == "int1":
        return torch.ops.myqasr.linear_binary.default, (x, qw.packed, qw.scale_t, 32, n, k, bias, *cpu)
    return torch.ops.myqasr.linear_affine.default, (x, qw.packed, qw.scale_t, qw.zero_t, qw.bits, 32, n, k, bias, *cpu)


@pytest.mark.parametrize("fmt,with_cpu_pack", [("int4", True), ("int6", True), ("int3", False), ("int1", True), ("nf4", False)])
def test_opcheck(fmt, with_cpu_pack):
    op, args = _op_args(fmt, with_cpu_pack)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    args = tuple(a.float().requires_grad_() if i == 0 else a for i, a in enumerate(args))
    torch.library.opcheck(op, args, test_utils=("test_autograd_registration",))


def test_opcheck_aot_dispatch():
    op, args = _op_args("int4", True)
    torch.library.opcheck(op, args, test_utils=("test_aot_dispatch_dynamic",))


def test_ops_registered_as_documented():
    assert library.OP_KIND == ("triton_op" if torch.cuda.is_available() else "custom_op")
    for name in ("linear_affine", "linear_binary", "linear_nf4"):
        assert hasattr(torch.ops.myqasr, name)


class _TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q1 = quantize_weight(torch.randn(64, 96), "int4", 32)
        self.q2 = quantize_weight(torch.randn(40, 64), "nf4", 32)
        self.bias = torch.nn.Parameter(torch.randn(64))

    def forward(self, x):
        h = torch.nn.functional.gelu(quantized_linear(x, self.q1, self.bias.to(x.dtype)))
        return quantized_linear(h, self.q2) * 2.0


def test_torch_compile_on_cpu_matches_eager():
    torch.manual_seed(0)
    mod = _TwoLayers()
    x = torch.randn(2, 5, 96, dtype=torch.bfloat16)
    eager = mod(x)  # builds the int4 CPU pack before compiling
    assert mod.q1._cpu_packed is not None
    compiled = torch.compile(mod, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["int4", "int1", "nf4"])
def test_gradients_reach_input_and_bias(fmt):
    qw = quantize_weight(torch.randn(16, 64), fmt, 32)
    x = torch.randn(3, 64, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    quantized_linear(x, qw, bias).square().sum().backward()
    x2, b2 = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    F.linear(x2, qw.dequantize(), b2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bias.grad, b2.grad, rtol=1e-4, atol=1e-4)


def test_torch_export_keeps_the_ops():
    mod = _TwoLayers()
    x = torch.randn(3, 96)
    mod(x)
    ep = torch.export.export(mod, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "myqasr.linear_affine.default" in targets and "myqasr.linear_nf4.default" in targets
    torch.testing.assert_close(ep.module()(x), mod(x))


def test_to_device_and_state_dict_keep_results():
    qw = quantize_weight(torch.randn(16, 64), "int5", 32)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    y = quantized_linear(x, qw)
    qw2 = QuantizedWeight.from_state_dict(qw.to("cpu").state_dict())
    assert qw2._cpu_packed is None  # caches are not saved
    torch.testing.assert_close(quantized_linear(x, qw2), y, rtol=0, atol=0)


def test_clear_errors():
    qw = quantize_weight(torch.randn(16, 64), "int4", 32)
    with pytest.raises(ValueError, match="63 input features .* weight is \\[16, 64\\]"):
        quantized_linear(torch.randn(2, 63), qw)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        quantized_linear(torch.ones(2, 64, dtype=torch.int64), qw)
    with pytest.raises(TypeError, match="QuantizedWeight"):
        quantized_linear(torch.randn(2, 64), torch.randn(16, 64))
    with pytest.raises(ValueError, match="bias must be \\[16\\]"):
        quantized_linear(torch.randn(2, 64), qw, torch.randn(15))
    with pytest.raises(ValueError, match="weight expects k=64"):
        torch.ops.myqasr.linear_affine(torch.randn(2, 60), qw.packed, qw.scale_t, qw.zero_t, 4, 32, 16, 64)
    with pytest.raises(ValueError, match="bits 2..8"):
        torch.ops.myqasr.linear_affine(torch.randn(2, 64), qw.packed, qw.scale_t, qw.zero_t, 1, 32, 16, 64)
    meta_x = torch.randn(2, 64, device="meta")
    with pytest.raises(ValueError, match="x is on meta but the weight is on cpu"):
        quantized_linear(meta_x, qw)
