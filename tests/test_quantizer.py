"""MyQASRQuantizer on a tiny two-program model (an "encoder" and a "decoder step" sharing one
budget): annotations, observers, the converted graph, budgets, determinism, scheme round trip."""

import functools
import warnings

import expecttest
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from torch_myqasr.allocation import BudgetError, Scheme
from torch_myqasr.formats import MIB, float_nbytes, weight_nbytes
from torch_myqasr.quantizer import LayerWeightObserver, MyQASRQuantizer
from torch_myqasr.quantizer.observers import LayerInputObserver, LayerOutputObserver

VOCAB, D, HID, MELS = 50, 32, 96, 8
LAYERS = ["m.conv", "m.enc_fc", "m.embed", "m.fc1", "m.fc2"]


class Tiny(nn.Module):
    """Conv1d + linears, and a token embedding tied to the output projection (like Whisper)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(MELS, D, 3, padding=1)
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
        return self.m.enc_fc(F.gelu(self.m.conv(feats)).transpose(1, 2))


class Dec(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, tok, mem):
        h = self.m.embed(tok) + mem.mean(1, keepdim=True)
        h = h + self.m.fc2(F.gelu(self.m.fc1(h)))
        return self.m.proj_out(h)


@functools.lru_cache(maxsize=1)
def _programs():
    torch.manual_seed(0)
    m = Tiny().eval()
    with torch.no_grad():
        m.fc1.weight[3, 5] = 1.5  # an outlier so low-bit clipping has something to do
    enc, dec = Enc(m), Dec(m)
    feats, tok = torch.randn(2, MELS, 10), torch.randint(0, VOCAB, (2, 4))
    ep_enc = torch.export.export(enc, (feats,))
    ep_dec = torch.export.export(dec, (tok, enc(feats)))
    return enc, dec, ep_enc, ep_dec


def _calib(n=3):
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(2, MELS, 10, generator=g), torch.randint(0, VOCAB, (2, 4), generator=g)) for _ in range(n)]


def _prepare(q):
    _, _, ep_enc, ep_dec = _programs()
    return prepare_pt2e(ep_enc.module(), q), prepare_pt2e(ep_dec.module(), q)


def _quantize(q, calibrate=True):
    pe, pd = _prepare(q)
    if calibrate:
        for feats, tok in _calib():
            pd(tok, pe(feats))
    return convert_pt2e(pe), convert_pt2e(pd)


def _run(ce, cd, feats, tok):
    return cd(tok, ce(feats))


def _test_input():
    g = torch.Generator().manual_seed(7)
    return torch.randn(2, MELS, 10, generator=g), torch.randint(0, VOCAB, (2, 4), generator=g)


def _float_out():
    enc, dec, _, _ = _programs()
    feats, tok = _test_input()
    with torch.no_grad():
        return dec(tok, enc(feats))


def _rel_err(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def _sizes(fmt):
    """Whole-model bytes with every layer in ``fmt`` (fixed = the biases, fp32)."""
    shapes = [(D, MELS * 3), (D, D), (VOCAB, D), (HID, D), (D, HID)]
    fixed = float_nbytes(D + D + HID + D)
    return fixed + sum(weight_nbytes(fmt, n, k, 64) for n, k in shapes)


def _observers(gm, cls):
    return [m for m in gm.modules() if isinstance(m, cls)]


def test_annotations_and_tied_weight_has_one_observer():
    q = MyQASRQuantizer(budget_mb=1.0, progress=False)
    pe, pd = _prepare(q)
    assert q.layer_names == LAYERS
    assert sorted(o.layer for o in _observers(pe, LayerWeightObserver)) == ["m.conv", "m.enc_fc"]
    assert sorted(o.layer for o in _observers(pd, LayerWeightObserver)) == ["m.embed", "m.fc1", "m.fc2"]
    # one observer node on the tied weight, feeding both the lookup and the output projection
    (tied,) = [n for n in pd.graph.nodes if n.op == "call_module"
               and isinstance(getattr(pd, n.target), LayerWeightObserver) and getattr(pd, n.target).layer == "m.embed"]
    assert sorted(str(u.target) for u in tied.users) == ["aten.embedding.default", "aten.linear.default"]
    # the tied layer's score comes from the logits (its matmul use), not from the lookup
    outs = [o.layer for o in _observers(pd, LayerOutputObserver)]
    assert outs.count("m.embed") == 1
    kinds = sorted((o.layer, o.kind) for o in _observers(pd, LayerInputObserver) if o.layer == "m.embed")
    assert kinds == [("m.embed", "embedding"), ("m.embed", "linear")]


def test_observer_statistics_against_numpy():
    enc, dec, _, _ = _programs()
    q = MyQASRQuantizer(budget_mb=1.0, progress=False)
    pe, pd = _prepare(q)
    seen_out, seen_in = [], []

    def hook(mod, inputs, out):
        seen_in.append(inputs[0])
        seen_out.append(out)

    hooks = [dec.m.fc1.register_forward_hook(hook)]
    with torch.no_grad():
        for feats, tok in _calib():
            pd(tok, pe(feats))
            dec(tok, enc(feats))
    for h in hooks:
        h.remove()
    a = np.abs(torch.cat([o.flatten() for o in seen_out]).double().numpy())
    st = q.statistics("m.fc1")
    assert st.count == a.size == 3 * 2 * 4 * HID
    np.testing.assert_allclose([st.median_abs, st.max_abs, st.mean_abs, st.std_abs],
                               [np.median(a), a.max(), a.mean(), a.std()], rtol=1e-5)
    rows = torch.cat([i.reshape(-1, D) for i in seen_in])
    torch.testing.assert_close(st.rows.sample(), rows)  # 24 rows < reservoir: all kept, in order
    conv = q.statistics("m.conv")
    assert conv.rows.sample().shape == (3 * 2 * 10, MELS * 3)  # unfolded patches [B*L, I*k]


class TestConvertedGraph(expecttest.TestCase):
    def test_converted_decoder_graph(self):
        q = MyQASRQuantizer(budget_mb=_sizes("int4") / MIB, strategy="uniform", progress=False)
        _, cd = _quantize(q)
        lines = []
        for n in cd.graph.nodes:
            if n.op in ("placeholder", "output") or n.name == "_guards_fn":
                continue
            args = ", ".join(a.name if isinstance(a, torch.fx.Node) else repr(a) for a in n.args)
            target = n.target if isinstance(n.target, str) else str(n.target).replace("torch.ops.", "")
            lines.append(f"{n.name} = {n.op} {target}({args})" if n.op == "call_function" else f"{n.name} = {n.op} {target}")
        self.assertExpectedInline("\n".join(lines), """\
m_fc1_myqasr_codes = get_attr m_fc1_myqasr_codes
m_fc1_myqasr_scale = get_attr m_fc1_myqasr_scale
m_fc1_myqasr_zero = get_attr m_fc1_myqasr_zero
dequantize_groupwise_default = call_function myqasr.dequantize_groupwise.default(m_fc1_myqasr_codes, m_fc1_myqasr_scale, m_fc1_myqasr_zero, 'int4', 64, [96, 32], torch.float32)
m_fc1_bias = get_attr m.fc1.bias
m_fc2_myqasr_codes = get_attr m_fc2_myqasr_codes
m_fc2_myqasr_scale = get_attr m_fc2_myqasr_scale
m_fc2_myqasr_zero = get_attr m_fc2_myqasr_zero
dequantize_groupwise_default_1 = call_function myqasr.dequantize_groupwise.default(m_fc2_myqasr_codes, m_fc2_myqasr_scale, m_fc2_myqasr_zero, 'int4', 64, [32, 96], torch.float32)
m_fc2_bias = get_attr m.fc2.bias
m_embed_myqasr_codes = get_attr m_embed_myqasr_codes
m_embed_myqasr_scale = get_attr m_embed_myqasr_scale
m_embed_myqasr_zero = get_attr m_embed_myqasr_zero
dequantize_groupwise_default_2 = call_function myqasr.dequantize_groupwise.default(m_embed_myqasr_codes, m_embed_myqasr_scale, m_embed_myqasr_zero, 'int4', 64, [50, 32], torch.float32)
embedding = call_function aten.embedding.default(dequantize_groupwise_default_2, tok)
mean = call_function aten.mean.dim(mem, [1], True)
add = call_function aten.add.Tensor(embedding, mean)
linear = call_function aten.linear.default(add, dequantize_groupwise_default, m_fc1_bias)
gelu = call_function aten.gelu.default(linear)
linear_1 = call_function aten.linear.default(gelu, dequantize_groupwise_default_1, m_fc2_bias)
add_1 = call_function aten.add.Tensor(add, linear_1)
linear_2 = call_function aten.linear.default(add_1, dequantize_groupwise_default_2)""")


def test_converted_encoder_has_conv_codes_and_no_float_weights():
    q = MyQASRQuantizer(budget_mb=_sizes("int4") / MIB, strategy="uniform", progress=False)
    ce, cd = _quantize(q)
    assert {n for n, _ in ce.named_parameters()} == {"m.conv.bias", "m.enc_fc.bias"}
    codes = dict(ce.named_buffers())["m_conv_myqasr_codes"]
    assert codes.dtype == torch.uint8 and codes.shape == (D, 64)  # [O, I*k] = [32, 24] padded to 64
    # one quantized copy of the tied weight in the decoder program
    assert sum(1 for n, _ in cd.named_buffers() if n.startswith("m_embed")) == 3


def test_output_close_at_8_bits_and_further_at_2():
    ref = _float_out()
    feats, tok = _test_input()
    errs = {}
    for fmt in ("int8", "int2"):
        q = MyQASRQuantizer(budget_mb=_sizes(fmt) / MIB, formats=(fmt,), progress=False)
        ce, cd = _quantize(q)
        errs[fmt] = _rel_err(_run(ce, cd, feats, tok), ref)
        assert {s.format for s in q.scheme.layers.values()} == {fmt}
    assert errs["int8"] < 0.01
    assert errs["int2"] > 5 * errs["int8"] and errs["int2"] < 1.0


@pytest.mark.parametrize("strategy", ["myqasr", "optimal", "uniform"])
def test_budget_between_int3_and_int4_is_honoured(strategy):
    budget = (_sizes("int3") + _sizes("int4")) / 2 / MIB
    q = MyQASRQuantizer(budget_mb=budget, strategy=strategy, progress=False)
    _quantize(q)
    sc = q.scheme
    assert sc.size_mb <= budget and sc.size_bytes == sc.fixed_bytes + sum(s.nbytes for s in sc.layers.values())
    assert sc.fixed_bytes == float_nbytes(D + D + HID + D)  # biases in fp32; the tied weight once
    assert list(sc.layers) == LAYERS
    fmts = {s.format for s in sc.layers.values()}
    assert fmts == {"int3"} if strategy == "uniform" else len(fmts) >= 2
    assert set(sc.calibration["clip_ratios"]) == set(LAYERS)


def test_infeasible_budget_raises_budget_error():
    q = MyQASRQuantizer(budget_mb=0.5 * _sizes("int2") / MIB, progress=False)
    pe, pd = _prepare(q)
    for feats, tok in _calib():
        pd(tok, pe(feats))
    with pytest.raises(BudgetError, match="smallest reachable size"):
        convert_pt2e(pe)


def test_budget_above_full_precision_keeps_float():
    q = MyQASRQuantizer(budget_mb=1.0, progress=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ce, cd = _quantize(q)
    assert any("nothing needs quantizing" in str(x.message) for x in w)
    assert {s.format for s in q.scheme.layers.values()} == {"fp32"}
    feats, tok = _test_input()
    torch.testing.assert_close(_run(ce, cd, feats, tok), _float_out())


def _codes(*gms):
    return {n: b.clone() for gm in gms for n, b in gm.named_buffers() if "_myqasr_" in n}


@pytest.mark.parametrize("score", ["median", "kl"])
def test_same_clips_same_scheme_and_codes(score):
    budget = (_sizes("int3") + _sizes("int4")) / 2 / MIB
    runs = []
    for _ in range(2):
        q = MyQASRQuantizer(budget_mb=budget, score=score, progress=False)
        ce, cd = _quantize(q)
        runs.append((q.scheme.to_json(), _codes(ce, cd)))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1].keys() == runs[1][1].keys() and all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_scheme_json_round_trip_reproduces_outputs_without_calibration():
    budget = (_sizes("int2") + _sizes("int3")) / 2 / MIB
    q = MyQASRQuantizer(budget_mb=budget, strategy="optimal", model_id="tiny-test", progress=False)
    ce, cd = _quantize(q)
    loaded = Scheme.from_json(q.scheme.to_json())
    q2 = MyQASRQuantizer(scheme=loaded, progress=False)
    ce2, cd2 = _quantize(q2, calibrate=False)  # clip ratios come from the scheme
    feats, tok = _test_input()
    assert torch.equal(_run(ce, cd, feats, tok), _run(ce2, cd2, feats, tok))
    a, b = _codes(ce, cd), _codes(ce2, cd2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert q2.scheme.to_json() == q.scheme.to_json()
    # the stored codes follow the scheme's format for each layer
    for name, s in loaded.layers.items():
        safe = name.replace(".", "_")
        gm = ce2 if name in ("m.conv", "m.enc_fc") else cd2
        assert int(dict(gm.named_buffers())[f"{safe}_myqasr_codes"].max()) <= 2**s.bits - 1


def test_keep_full_precision_by_type_and_name_with_precedence():
    kept = D * MELS * 3 + D * D + VOCAB * D + HID * D
    budget = (float_nbytes(kept + D + D + HID + D) + weight_nbytes("int4", D, HID, 64)) / MIB
    q = MyQASRQuantizer(budget_mb=budget, strategy="uniform", progress=False,
                        keep_full_precision=(nn.Linear, "!m.fc2", "m.conv"))
    ce, cd = _quantize(q)
    # type rule keeps enc_fc and fc1 (and the tied weight, used by proj_out, a Linear); the name
    # rule "!m.fc2" beats the type rule; "m.conv" is kept by name.
    assert q.kept_layers == ["m.conv", "m.embed", "m.enc_fc", "m.fc1"]
    assert list(q.scheme.layers) == ["m.fc2"] and q.scheme.layers["m.fc2"].format == "int4"
    assert q.scheme.fixed_bytes == float_nbytes(kept + D + D + HID + D)
    params = dict(cd.named_parameters())
    assert "m.fc1.weight" in params and "m.fc2.weight" not in params
    assert "m.proj_out.weight" in params  # the tied weight, kept, under the alias the graph reads


def test_graph_prepared_after_the_decision_is_refused():
    q = MyQASRQuantizer(budget_mb=_sizes("int4") / MIB, strategy="uniform", progress=False)
    _quantize(q)
    with pytest.raises(RuntimeError, match="before converting any"):
        prepare_pt2e(_programs()[3].module(), q)


def test_uncalibrated_graph_is_a_clear_error():
    q = MyQASRQuantizer(budget_mb=_sizes("int4") / MIB, progress=False)
    pe, pd = _prepare(q)
    for feats, _ in _calib():
        pe(feats)  # the decoder step never sees the clips
    with pytest.raises(RuntimeError, match="saw no calibration data"):
        convert_pt2e(pe)
    with pytest.raises(RuntimeError, match="decided at the first convert_pt2e"):
        q.scheme


def test_optional_8bit_activations():
    q = MyQASRQuantizer(budget_mb=_sizes("int8") / MIB, formats=("int8",), act_bits=8, progress=False)
    ce, cd = _quantize(q)
    targets = [n.target for n in cd.graph.nodes if n.op == "call_function"]
    # fc1, fc2 and proj_out inputs get q/dq; the embedding's token ids do not
    assert targets.count(torch.ops.quantized_decomposed.quantize_per_tensor.default) == 3
    feats, tok = _test_input()
    assert _rel_err(_run(ce, cd, feats, tok), _float_out()) < 0.05


def test_constructor_errors_are_clear():
    with pytest.raises(ValueError, match="budget_mb"):
        MyQASRQuantizer()
    with pytest.raises(ValueError, match="act_bits"):
        MyQASRQuantizer(budget_mb=1, act_bits=4)
    with pytest.raises(ValueError, match="unknown sensitivity score"):
        MyQASRQuantizer(budget_mb=1, score="entropy")


def test_converted_program_reexports_with_the_dequantize_op():
    q = MyQASRQuantizer(budget_mb=_sizes("int4") / MIB, strategy="uniform", progress=False)
    ce, cd = _quantize(q)
    feats, tok = _test_input()
    mem = ce(feats)
    ep = torch.export.export(cd, (tok, mem))
    ops = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.myqasr.dequantize_groupwise.default) == 3  # fc1, fc2, tied embedding once
    torch.testing.assert_close(ep.module()(tok, mem), cd(tok, mem))


def test_optimal_weighs_distortions_by_their_effect_on_the_logits(monkeypatch):
    import torch_myqasr.quantizer.quantizer as qmod
    from torch_myqasr.sensitivity import logits_fisher_scale

    seen = {}

    def spy(infos, *args, **kwargs):
        seen[kwargs.get("_tag", len(seen))] = {i.name: dict(i.distortion) for i in infos}
        return real(infos, *args, **kwargs)

    real = qmod.allocate_bits
    monkeypatch.setattr(qmod, "allocate_bits", spy)
    budget = (_sizes("int3") + _sizes("int4")) / 2 / MIB
    qs = {}
    for weighting in (False, True):
        qs[weighting] = MyQASRQuantizer(budget_mb=budget, strategy="optimal", score="cosine", progress=False,
                                        output_weighting=weighting)
        _quantize(qs[weighting])
    plain, nats = seen[0], seen[1]
    meta = qs[True].scheme.calibration["distortion"]
    assert "distortion" not in qs[False].scheme.calibration
    # proj_out (tied to m.embed) returns the graph output: it is the logits layer.
    assert meta["output_layers"] == ["m.embed"] and meta["branches"] == {"0": 0, "1": 0}
    x = qs[True].statistics("m.embed").rows.sample()
    fisher = logits_fisher_scale(_programs()[0].m.embed.weight, x)
    assert meta["fisher_scale"] == pytest.approx(fisher) and fisher > 0
    # Inner layers: cosine distance times the Fisher scale (no norm in these toy graphs: 1 branch).
    for name in ("m.conv", "m.enc_fc", "m.fc1", "m.fc2"):
        for fmt, d in plain[name].items():
            assert nats[name][fmt] == pytest.approx(d * fisher, rel=1e-9, abs=1e-15)
    # The logits layer is measured by KL, a different number than its cosine distance.
    assert nats["m.embed"] != pytest.approx(plain["m.embed"], rel=1e-3)
    assert qs[True].scheme.size_mb <= budget
