"""Lowering of converted PT2E graphs to packed myqasr ops: graph shape (expecttest), identical outputs,
no float copies, byte counts equal to the scheme, the tied weight held once, the packed lookup op,
the CPU-resident bfloat16 deployment layout, torch.compile on CPU, and (slow) real tiny.en transcripts."""

import copy
import functools

import expecttest
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from torch_myqasr.formats import MIB, float_nbytes, weight_nbytes
from torch_myqasr.lowering import (
    LoweringError,
    lower_quantized,
    module_bytes,
    quantized_weight_bytes,
    use_cpu_kernels,
)
from torch_myqasr.ops import quantize_weight, quantized_embedding
from torch_myqasr.quantizer import MyQASRQuantizer

VOCAB, D, HID, MELS, FRAMES = 72, 64, 128, 8, 12  # VOCAB % 16 != 0, like Whisper's 51865
SHAPES = [(D, MELS * 3), (D, D * 3), (D, D), (VOCAB, D), (HID, D), (D, HID)]


class Tiny(nn.Module):
    """Whisper in miniature: two convs (stride 1 and 2), linears, an embedding tied to the output projection."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(MELS, D, 3, padding=1)
        self.conv2 = nn.Conv1d(D, D, 3, stride=2, padding=1)
        self.enc_fc = nn.Linear(D, D)
        self.embed = nn.Embedding(VOCAB, D)
        self.fc1 = nn.Linear(D, HID)
        self.fc2 = nn.Linear(HID, D)
        self.proj_out = nn.Linear(D, VOCAB, bias=False)
        self.proj_out.weight = self.embed.weight


class Enc(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, feats):
        return self.m.enc_fc(F.gelu(self.m.conv2(F.gelu(self.m.conv(feats)))).transpose(1, 2))


class Dec(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, tok, mem):
        h = self.m.embed(tok) + mem.mean(1, keepdim=True)
        h = h + self.m.fc2(F.gelu(self.m.fc1(h)))
        return self.m.proj_out(h)


def _size(fmt):
    return float_nbytes(3 * D + HID + D) + sum(weight_nbytes(fmt, n, k, 64) for n, k in SHAPES)


@functools.lru_cache(maxsize=None)
def _converted(fmt="int4"):
    """(scheme, converted encoder, converted decoder, (feats, tok)); callers deep-copy before lowering."""
    torch.manual_seed(0)
    m = Tiny().eval()
    enc, dec = Enc(m), Dec(m)
    feats, tok = torch.randn(2, MELS, FRAMES), torch.randint(0, VOCAB, (2, 4))
    ep_enc, ep_dec = torch.export.export(enc, (feats,)), torch.export.export(dec, (tok, enc(feats)))
    q = MyQASRQuantizer(budget_mb=_size(fmt) / MIB, formats=(fmt,), strategy="uniform", progress=False)
    pe, pd = prepare_pt2e(ep_enc.module(), q), prepare_pt2e(ep_dec.module(), q)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(2):
            pd(torch.randint(0, VOCAB, (2, 4), generator=g), pe(torch.randn(2, MELS, FRAMES, generator=g)))
    ce, cd = convert_pt2e(pe), convert_pt2e(pd)  # the scheme is decided at the first convert
    return q.scheme, ce, cd, (feats, tok)


def _lowered(fmt="int4", **kw):
    scheme, ce, cd, inputs = _converted(fmt)
    return scheme, lower_quantized(copy.deepcopy(ce), **kw), lower_quantized(copy.deepcopy(cd), **kw), inputs


def _graph_lines(gm):
    lines = []
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output") or n.name == "_guards_fn":
            continue
        if n.op == "get_attr":
            lines.append(f"{n.name} = get_attr {n.target}")
            continue
        args = ", ".join(a.name if isinstance(a, torch.fx.Node) else repr(a) for a in n.args)
        lines.append(f"{n.name} = {str(n.target).replace('torch.ops.', '')}({args})")
    return "\n".join(lines)


class TestLoweredGraphs(expecttest.TestCase):
    def test_decoder_before_and_after(self):
        _, _, cd, _ = _converted()
        before = _graph_lines(cd)
        self.assertExpectedInline(before, """\
m_fc1_myqasr_codes = get_attr m_fc1_myqasr_codes
m_fc1_myqasr_scale = get_attr m_fc1_myqasr_scale
m_fc1_myqasr_zero = get_attr m_fc1_myqasr_zero
dequantize_groupwise_default = myqasr.dequantize_groupwise.default(m_fc1_myqasr_codes, m_fc1_myqasr_scale, m_fc1_myqasr_zero, 'int4', 64, [128, 64], torch.float32)
m_fc1_bias = get_attr m.fc1.bias
m_fc2_myqasr_codes = get_attr m_fc2_myqasr_codes
m_fc2_myqasr_scale = get_attr m_fc2_myqasr_scale
m_fc2_myqasr_zero = get_attr m_fc2_myqasr_zero
dequantize_groupwise_default_1 = myqasr.dequantize_groupwise.default(m_fc2_myqasr_codes, m_fc2_myqasr_scale, m_fc2_myqasr_zero, 'int4', 64, [64, 128], torch.float32)
m_fc2_bias = get_attr m.fc2.bias
m_embed_myqasr_codes = get_attr m_embed_myqasr_codes
m_embed_myqasr_scale = get_attr m_embed_myqasr_scale
m_embed_myqasr_zero = get_attr m_embed_myqasr_zero
dequantize_groupwise_default_2 = myqasr.dequantize_groupwise.default(m_embed_myqasr_codes, m_embed_myqasr_scale, m_embed_myqasr_zero, 'int4', 64, [72, 64], torch.float32)
embedding = aten.embedding.default(dequantize_groupwise_default_2, tok)
mean = aten.mean.dim(mem, [1], True)
add = aten.add.Tensor(embedding, mean)
linear = aten.linear.default(add, dequantize_groupwise_default, m_fc1_bias)
gelu = aten.gelu.default(linear)
linear_1 = aten.linear.default(gelu, dequantize_groupwise_default_1, m_fc2_bias)
add_1 = aten.add.Tensor(add, linear_1)
linear_2 = aten.linear.default(add_1, dequantize_groupwise_default_2)""")
        _, _, ld, _ = _lowered()
        self.assertExpectedInline(_graph_lines(ld), """\
m_fc1_myqasr_packed = get_attr m_fc1_myqasr_packed
m_fc1_myqasr_scale_t = get_attr m_fc1_myqasr_scale_t
m_fc1_myqasr_zero_t = get_attr m_fc1_myqasr_zero_t
m_fc1_bias = get_attr m.fc1.bias
m_fc2_myqasr_packed = get_attr m_fc2_myqasr_packed
m_fc2_myqasr_scale_t = get_attr m_fc2_myqasr_scale_t
m_fc2_myqasr_zero_t = get_attr m_fc2_myqasr_zero_t
m_fc2_bias = get_attr m.fc2.bias
m_embed_myqasr_packed = get_attr m_embed_myqasr_packed
m_embed_myqasr_scale_t = get_attr m_embed_myqasr_scale_t
m_embed_myqasr_zero_t = get_attr m_embed_myqasr_zero_t
embedding_packed_default = myqasr.embedding_packed.default(tok, m_embed_myqasr_packed, m_embed_myqasr_scale_t, m_embed_myqasr_zero_t, 'int4', 64, 72, 64, torch.float32)
mean = aten.mean.dim(mem, [1], True)
add = aten.add.Tensor(embedding_packed_default, mean)
linear_affine_default = myqasr.linear_affine.default(add, m_fc1_myqasr_packed, m_fc1_myqasr_scale_t, m_fc1_myqasr_zero_t, 4, 64, 128, 64, m_fc1_bias)
gelu = aten.gelu.default(linear_affine_default)
linear_affine_default_1 = myqasr.linear_affine.default(gelu, m_fc2_myqasr_packed, m_fc2_myqasr_scale_t, m_fc2_myqasr_zero_t, 4, 64, 64, 128, m_fc2_bias)
add_1 = aten.add.Tensor(add, linear_affine_default_1)
linear_affine_default_2 = myqasr.linear_affine.default(add_1, m_embed_myqasr_packed, m_embed_myqasr_scale_t, m_embed_myqasr_zero_t, 4, 64, 72, 64, None)""")

    def test_encoder_conv_im2col(self):
        _, le, _, _ = _lowered()
        self.assertExpectedInline(_graph_lines(le), """\
m_conv_myqasr_packed = get_attr m_conv_myqasr_packed
m_conv_myqasr_scale_t = get_attr m_conv_myqasr_scale_t
m_conv_myqasr_zero_t = get_attr m_conv_myqasr_zero_t
m_conv_bias = get_attr m.conv.bias
m_conv2_myqasr_packed = get_attr m_conv2_myqasr_packed
m_conv2_myqasr_scale_t = get_attr m_conv2_myqasr_scale_t
m_conv2_myqasr_zero_t = get_attr m_conv2_myqasr_zero_t
m_conv2_bias = get_attr m.conv2.bias
m_enc_fc_myqasr_packed = get_attr m_enc_fc_myqasr_packed
m_enc_fc_myqasr_scale_t = get_attr m_enc_fc_myqasr_scale_t
m_enc_fc_myqasr_zero_t = get_attr m_enc_fc_myqasr_zero_t
m_enc_fc_bias = get_attr m.enc_fc.bias
constant_pad_nd_default = aten.constant_pad_nd.default(feats, [1, 1], 0.0)
unfold_default = aten.unfold.default(constant_pad_nd_default, 2, 3, 1)
permute_default = aten.permute.default(unfold_default, [0, 2, 1, 3])
flatten_using_ints = aten.flatten.using_ints(permute_default, 2, 3)
linear_affine_default = myqasr.linear_affine.default(flatten_using_ints, m_conv_myqasr_packed, m_conv_myqasr_scale_t, m_conv_myqasr_zero_t, 4, 64, 64, 24, m_conv_bias)
transpose_int = aten.transpose.int(linear_affine_default, 1, 2)
gelu = aten.gelu.default(transpose_int)
constant_pad_nd_default_1 = aten.constant_pad_nd.default(gelu, [1, 1], 0.0)
unfold_default_1 = aten.unfold.default(constant_pad_nd_default_1, 2, 3, 2)
permute_default_1 = aten.permute.default(unfold_default_1, [0, 2, 1, 3])
flatten_using_ints_1 = aten.flatten.using_ints(permute_default_1, 2, 3)
linear_affine_default_1 = myqasr.linear_affine.default(flatten_using_ints_1, m_conv2_myqasr_packed, m_conv2_myqasr_scale_t, m_conv2_myqasr_zero_t, 4, 64, 64, 192, m_conv2_bias)
transpose_int_1 = aten.transpose.int(linear_affine_default_1, 1, 2)
gelu_1 = aten.gelu.default(transpose_int_1)
transpose = aten.transpose.int(gelu_1, 1, 2)
linear_affine_default_2 = myqasr.linear_affine.default(transpose, m_enc_fc_myqasr_packed, m_enc_fc_myqasr_scale_t, m_enc_fc_myqasr_zero_t, 4, 64, 64, 64, m_enc_fc_bias)""")

    def test_bf16_cpu_kernels_graph(self):
        _, _, ld, _ = _lowered(compute_dtype=torch.bfloat16)
        self.assertExpectedInline(_graph_lines(ld), """\
m_fc1_bias = get_attr m.fc1.bias
m_fc2_bias = get_attr m.fc2.bias
m_embed_myqasr_cpu_packed = get_attr m_embed_myqasr_cpu_packed
m_embed_myqasr_cpu_scales_zeros = get_attr m_embed_myqasr_cpu_scales_zeros
embedding_int4pack_default = myqasr.embedding_int4pack.default(tok, m_embed_myqasr_cpu_packed, m_embed_myqasr_cpu_scales_zeros, 64, 72, 64, torch.float32)
mean = aten.mean.dim(mem, [1], True)
add = aten.add.Tensor(embedding_int4pack_default, mean)
m_fc1_myqasr_cpu_packed = get_attr m_fc1_myqasr_cpu_packed
m_fc1_myqasr_cpu_scales_zeros = get_attr m_fc1_myqasr_cpu_scales_zeros
linear_int4pack_default = myqasr.linear_int4pack.default(add, m_fc1_myqasr_cpu_packed, m_fc1_myqasr_cpu_scales_zeros, 64, 128, 64, m_fc1_bias)
gelu = aten.gelu.default(linear_int4pack_default)
m_fc2_myqasr_cpu_packed = get_attr m_fc2_myqasr_cpu_packed
m_fc2_myqasr_cpu_scales_zeros = get_attr m_fc2_myqasr_cpu_scales_zeros
linear_int4pack_default_1 = myqasr.linear_int4pack.default(gelu, m_fc2_myqasr_cpu_packed, m_fc2_myqasr_cpu_scales_zeros, 64, 64, 128, m_fc2_bias)
add_1 = aten.add.Tensor(add, linear_int4pack_default_1)
m_embed_myqasr_cpu_packed_1 = get_attr m_embed_myqasr_cpu_packed
m_embed_myqasr_cpu_scales_zeros_1 = get_attr m_embed_myqasr_cpu_scales_zeros
linear_int4pack_default_2 = myqasr.linear_int4pack.default(add_1, m_embed_myqasr_cpu_packed_1, m_embed_myqasr_cpu_scales_zeros_1, 64, 72, 64, None)""")


def _buffers(gm):
    return dict(gm.named_buffers())


@pytest.mark.parametrize("fmt", ["int4", "int8", "int3"])
def test_lowered_outputs_equal_converted(fmt):
    _, ce, cd, (feats, tok) = _converted(fmt)
    _, le, ld, _ = _lowered(fmt)
    with torch.no_grad():
        mem = ce(feats)
        # im2col + matmul sums in another order than the conv kernel: equal to float32 rounding
        torch.testing.assert_close(le(feats), mem, rtol=1e-5, atol=1e-5)
        # same dequantized weight, same F.linear: bit-identical
        assert torch.equal(ld(tok, mem), cd(tok, mem))


def test_no_float_copy_and_bytes_equal_scheme():
    scheme, le, ld, _ = _lowered()
    for gm in (le, ld):
        assert not any("dequantize_groupwise" in str(n.target) for n in gm.graph.nodes)
        assert not any(k.endswith(("_codes", "_scale", "_zero")) for k in _buffers(gm))
        assert {p for p, _ in gm.named_parameters()} <= {"m.conv.bias", "m.conv2.bias", "m.enc_fc.bias", "m.fc1.bias", "m.fc2.bias"}
    scheme_q = sum(s.nbytes for s in scheme.layers.values())
    assert quantized_weight_bytes(le) + quantized_weight_bytes(ld) == scheme_q == sum(weight_nbytes("int4", n, k, 64) for n, k in SHAPES)
    # everything the two modules hold: packed weights + fp32 biases = the scheme's whole size
    assert module_bytes(le) + module_bytes(ld) == scheme.size_bytes


def test_tied_weight_is_held_once_and_feeds_lookup_and_projection():
    _, _, ld, _ = _lowered()
    assert sorted(k for k in _buffers(ld) if k.startswith("m_embed")) == [
        "m_embed_myqasr_packed", "m_embed_myqasr_scale_t", "m_embed_myqasr_zero_t"]
    readers = {str(n.target) for n in ld.graph.nodes if n.op == "call_function"
               and any(isinstance(a, torch.fx.Node) and a.target == "m_embed_myqasr_packed" for a in n.args)}
    assert readers == {"myqasr.embedding_packed.default", "myqasr.linear_affine.default"}
    layers = {layer.prefix: layer for layer in ld.meta["myqasr_layers"]}
    assert layers["m_embed_myqasr"].uses == ("embedding", "linear")


@pytest.mark.parametrize("fmt", ["int2", "int4", "int7", "int1", "nf4"])
def test_packed_embedding_matches_dense_lookup(fmt):
    torch.manual_seed(3)
    qw = quantize_weight(torch.randn(50, 40), fmt, 32)  # K=40 pads to 64: padding is dropped
    ids = torch.tensor([[0, 49, 7], [7, 7, 1]])
    out = quantized_embedding(ids, qw, torch.float32)
    assert out.shape == (2, 3, 40)
    assert torch.equal(out, F.embedding(ids, qw.dequantize()))
    n, k = qw.shape
    args = (ids, qw.packed, qw.scale_t, qw.zero_t, fmt, 32, n, k, torch.bfloat16)
    torch.library.opcheck(torch.ops.myqasr.embedding_packed.default, args)


def test_packed_embedding_errors_are_clear():
    qw = quantize_weight(torch.randn(16, 32), "int4", 32)
    with pytest.raises(TypeError, match="int64 or int32"):
        quantized_embedding(torch.zeros(2), qw)
    with pytest.raises(ValueError, match="packed must be uint8"):
        torch.ops.myqasr.embedding_packed(torch.zeros(2, dtype=torch.long), qw.packed[:, :8], qw.scale_t, qw.zero_t,
                                          "int4", 32, 16, 32, torch.float32)


@pytest.mark.parametrize("fmt", ["int4", "int8", "int3"])
def test_cpu_resident_layout_close_held_once_and_sized(fmt):
    scheme, ce, cd, (feats, tok) = _converted(fmt)
    _, le, ld, _ = _lowered(fmt, compute_dtype=torch.bfloat16)
    with torch.no_grad():
        ref = cd(tok, ce(feats))
        out = ld(tok, le(feats))
    assert out.dtype == torch.float32
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 2e-2  # bfloat16 rounding: close, not identical
    for gm in (le, ld):
        # the portable bit planes are gone: each weight is held once, in aten's layout
        assert not any(k.endswith(("_myqasr_packed", "_scale_t", "_zero_t")) for k in _buffers(gm))
        ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "myqasr" in str(n.target)}
        assert ops <= {"myqasr.linear_int4pack.default", "myqasr.embedding_int4pack.default"}
    readers = {str(n.target) for n in ld.graph.nodes if n.op == "call_function"
               and any(isinstance(a, torch.fx.Node) and a.target == "m_embed_myqasr_cpu_packed" for a in n.args)}
    assert readers == {"myqasr.embedding_int4pack.default", "myqasr.linear_int4pack.default"}
    # int4 / int8 cost their portable bytes at N rounded up to 16 rows (VOCAB 72 -> 80); int3 is held in 4 bits
    resident_fmt = {"int3": "int4"}.get(fmt, fmt)
    expected = sum(weight_nbytes(resident_fmt, -(-n // 16) * 16, k, 64) for n, k in SHAPES)
    assert quantized_weight_bytes(le) + quantized_weight_bytes(ld) == expected
    assert use_cpu_kernels(ld, compute_dtype=torch.bfloat16) is ld  # idempotent
    with pytest.raises(ValueError, match="already computes in"):
        use_cpu_kernels(ld, compute_dtype=torch.float16)
    with pytest.raises(ValueError, match="bfloat16 or torch.float16"):
        use_cpu_kernels(copy.deepcopy(ld), compute_dtype=torch.float32)


@pytest.mark.parametrize("fmt", ["int8", "int5", "int4", "int2", "int1"])
@pytest.mark.parametrize("n", [48, 72, 51])  # full blocks of 32, a last block of 16, rows padded to 16
def test_int4pack_lookup_matches_dense_rows(fmt, n):
    from torch_myqasr.ops import cpu

    torch.manual_seed(n)
    qw = quantize_weight(torch.randn(n, 40), fmt, 32)
    packed, sz = cpu.build_int4pack(qw, torch.bfloat16)
    ids = torch.tensor([[0, n - 1, 17], [16, 31, 32]])
    out = torch.ops.myqasr.embedding_int4pack(ids, packed, sz, 32, n, 40, torch.float32)
    ref = F.embedding(ids, qw.dequantize())
    assert out.shape == (2, 3, 40)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-2  # bfloat16 scales and zeros
    torch.library.opcheck(torch.ops.myqasr.embedding_int4pack.default, (ids, packed, sz, 32, n, 40, torch.float32))
    x = torch.randn(3, 40)
    y = torch.ops.myqasr.linear_int4pack(x, packed, sz, 32, n, 40, None)
    assert y.dtype == torch.float32 and y.shape == (3, n)
    ref_y = F.linear(x.double(), qw.dequantize(torch.float64))
    assert float((y - ref_y).abs().max() / ref_y.abs().max()) < 1.6e-2
    torch.library.opcheck(torch.ops.myqasr.linear_int4pack.default, (x, packed, sz, 32, n, 40, None))


def test_int4pack_layout_probe_holds_on_this_torch():
    from torch_myqasr.ops import cpu

    assert cpu.check_int4pack_layout()  # if aten changes its layout, the readers must learn the new one


def test_unknown_int4pack_layout_keeps_the_portable_ops(monkeypatch):
    from torch_myqasr.ops import cpu

    monkeypatch.setattr(cpu, "check_int4pack_layout", lambda: False)
    _, _, ld, (feats, tok) = _lowered()
    before = _graph_lines(ld)
    with pytest.warns(UserWarning, match="stays on the portable myqasr ops"):
        assert use_cpu_kernels(ld) is ld
    assert _graph_lines(ld) == before and "myqasr_compute_dtype" not in ld.meta


def test_int4pack_ops_refuse_bad_operands():
    from torch_myqasr.ops import cpu

    packed, sz = cpu.build_int4pack(quantize_weight(torch.randn(32, 64), "int4", 32), torch.bfloat16)
    with pytest.raises(ValueError, match="packed must be uint8"):
        torch.ops.myqasr.linear_int4pack(torch.randn(2, 64), packed[0], sz, 32, 32, 64)
    with pytest.raises(ValueError, match="expects k=64"):
        torch.ops.myqasr.linear_int4pack(torch.randn(2, 60), packed, sz, 32, 32, 64)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        torch.ops.myqasr.linear_int4pack(torch.randn(2, 64), packed, sz, 48, 32, 64)


def _weird_graph(use):
    """A dequantized weight feeding an op the pass cannot lower (mul), or a dilated conv."""
    root = nn.Module()
    root.register_buffer("w_myqasr_codes", torch.full((8, 64), 3, dtype=torch.uint8))
    root.register_buffer("w_myqasr_scale", torch.ones(8, 1, dtype=torch.float16))
    root.register_buffer("w_myqasr_zero", torch.zeros(8, 1, dtype=torch.float16))
    g = torch.fx.Graph()
    x = g.placeholder("x")
    codes, scale, zero = (g.get_attr(f"w_myqasr_{n}") for n in ("codes", "scale", "zero"))
    shape = [8, 8, 3] if use == "conv" else [8, 64]
    w = g.call_function(torch.ops.myqasr.dequantize_groupwise.default, (codes, scale, zero, "int4", 64, shape, torch.float32))
    if use == "conv":
        out = g.call_function(torch.ops.aten.conv1d.default, (x, w, None, [1], [2], [2], 1))
    else:
        out = g.call_function(torch.ops.aten.mul.Tensor, (x, w))
    g.output(out)
    return torch.fx.GraphModule(root, g)


@pytest.mark.parametrize("use,match", [("mul", "only aten.linear"), ("conv", "only dilation 1")])
def test_unsupported_patterns_are_clear_errors(use, match):
    with pytest.raises(LoweringError, match=match):
        lower_quantized(_weird_graph(use))
    with pytest.raises(TypeError, match="GraphModule"):
        lower_quantized(nn.Linear(2, 2))


def test_torch_compile_matches_uncompiled_lowered():
    _, le, ld, (feats, tok) = _lowered()
    torch._dynamo.reset()
    with torch.no_grad():
        eager = ld(tok, le(feats))
        compiled = torch.compile(ld)(tok, torch.compile(le)(feats))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_real_tiny_en_same_tokens_converted_lowered_compiled():
    """Real tiny.en on a corpus clip: converted (q/dq), lowered and compiled lowered agree token for token.

    Few tokens: the fp32 lowered CPU path dequantizes packed weights on every call (slow, see
    docs/lowering.md); equality of the first tokens through the real model is what this adds to the
    toy-model tests."""
    from torch_myqasr.audio import load_dataset_audio, open_dataset
    from torch_myqasr.corpus import corpus_manifest
    from torch_myqasr.export import decoding_options, export_whisper, greedy_decode
    from torch_myqasr.models import load_whisper

    bundle = load_whisper("tiny.en")
    calib = [a for _, a in load_dataset_audio(open_dataset(corpus_manifest("calib")).filter(speakers=["slt"]))][:2]
    test = [a for _, a in load_dataset_audio(open_dataset(corpus_manifest("test")).filter(speakers=["librivox"]))][:1]
    cache = 64
    ew = export_whisper(bundle.model, max_cache_len=cache)
    q = MyQASRQuantizer(budget_mb=20, strategy="myqasr", model_id="tiny.en", progress=False, clip_grid=(1.0, 0.9))
    pe, pd = prepare_pt2e(ew.encoder.module(), q), prepare_pt2e(ew.decoder_step.module(), q)
    opts = decoding_options(bundle.model, max_new_tokens=40)
    fe = bundle.feature_extractor
    greedy_decode(pe, pd, fe(calib, sampling_rate=16000, return_tensors="pt").input_features, opts, max_cache_len=cache)
    opts = decoding_options(bundle.model, max_new_tokens=6)
    ce, cd = convert_pt2e(pe), convert_pt2e(pd)
    feats = fe(test, sampling_rate=16000, return_tensors="pt").input_features
    ref = greedy_decode(ce, cd, feats, opts, max_cache_len=cache)
    le, ld = lower_quantized(copy.deepcopy(ce)), lower_quantized(copy.deepcopy(cd))
    scheme_q = sum(s.nbytes for s in q.scheme.layers.values() if s.format.startswith("int"))
    assert abs(quantized_weight_bytes(le) + quantized_weight_bytes(ld) - scheme_q) <= 0.02 * scheme_q
    assert greedy_decode(le, ld, feats, opts, max_cache_len=cache) == ref
    assert greedy_decode(torch.compile(le), torch.compile(ld), feats, opts, max_cache_len=cache) == ref
    assert all(len(r) == 6 for r in ref)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int1"])
def test_int4pack_linear_takes_both_paths_and_agrees(fmt):
    from torch_myqasr.ops import cpu, int4pack

    torch.manual_seed(1)
    qw = quantize_weight(torch.randn(72, 90), fmt, 32)  # N not a multiple of 32 (a tail block), K padded to 96
    packed, sz = cpu.build_int4pack(qw, torch.bfloat16)
    assert torch.equal(cpu.int4pack_dequantize(packed, sz, 32, 72, 90), cpu.int4pack_rows(packed, sz, torch.arange(72), 32, 90))
    torch.library.opcheck(torch.ops.myqasr.int4pack_dequantize.default, (packed, sz, 32, 72, 90))
    ref_w = qw.dequantize(torch.float64)
    for rows in (3, int4pack.KERNEL_MAX_ROWS + 5):  # the int4 kernel, then the dequantized weight
        x = torch.randn(rows, 90)
        y = torch.ops.myqasr.linear_int4pack(x, packed, sz, 32, 72, 90, None)
        ref = F.linear(x.double(), ref_w)
        assert y.shape == (rows, 72) and float((y - ref).abs().max() / ref.abs().max()) < 1.6e-2
