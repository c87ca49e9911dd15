"""Weight quantization math, reservoir observers' statistics and sensitivity scores (tiny tensors)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torch_myqasr.quantizer.dequant_op import dequantize_groupwise_op
from torch_myqasr.quantizer.observers import LayerStatistics, ReservoirSampler, conv1d_patches
from torch_myqasr.quantizer.weight_quant import (
    as_matrix,
    dequantize_groupwise,
    quantize_groupwise,
    search_clip_ratio,
)
from torch_myqasr.sensitivity import (
    SCORES,
    check_score,
    cosine_distance,
    kl_distance,
    layer_distortions,
    logits_fisher_scale,
    output_layer_distortions,
    stat_score,
)


def _w(n=24, k=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_follow_the_formats_contract(bits):
    w = _w()
    c = quantize_groupwise(w, bits, 16, clip_ratio=1.0)
    assert c.codes.dtype == torch.uint8 and c.codes.shape == (24, 48)  # K=40 padded to 48
    assert c.scale.dtype == torch.float16 and c.zero.dtype == torch.float16
    assert c.scale.shape == c.zero.shape == (24, 3)
    assert int(c.codes.max()) <= 2**bits - 1
    assert float(c.zero.min()) >= 0 and float(c.zero.max()) <= 2**bits - 1
    # w = (q - zero) * scale, by hand, and the padding dequantizes to (almost) zero.
    g = c.codes.view(24, 3, 16).float()
    by_hand = ((g - c.zero.float()[..., None]) * c.scale.float()[..., None]).view(24, 48)
    deq = dequantize_groupwise(c.codes, c.scale, c.zero, 16)
    assert torch.equal(deq, by_hand)
    # round-to-nearest without clipping: error at most half a step per group
    step = c.scale.float().repeat_interleave(16, dim=1)
    assert bool(((deq[:, :40] - w).abs() <= step[:, :40] / 2 + 1e-6).all())
    assert bool((deq[:, 40:].abs() <= step[:, 40:] / 2 + 1e-6).all())


def test_more_bits_less_error_and_conv_shape():
    w = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(1))
    errs = []
    for bits in (2, 4, 8):
        c = quantize_groupwise(w, bits, 8)
        deq = dequantize_groupwise(c.codes, c.scale, c.zero, 8, shape=w.shape)
        assert deq.shape == w.shape and c.codes.shape == (6, 16)  # [O, I*k]=[6,12] -> padded 16
        errs.append(float((deq - w).pow(2).mean()))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-4


def test_all_zero_group_is_exact():
    w = torch.zeros(2, 16)
    w[0, :8] = 1.0
    c = quantize_groupwise(w, 4, 8, clip_ratio=1.0)
    deq = dequantize_groupwise(c.codes, c.scale, c.zero, 8)
    assert torch.equal(deq[1], torch.zeros(16)) and torch.equal(deq[0, 8:], torch.zeros(8))


def test_tiny_range_group_keeps_a_subnormal_scale_and_int8_beats_int6():
    # A group of weights below 0.01 in magnitude: its int8 step (range/255) is below float16's
    # smallest normal (6.1e-5). It must still be quantized to within a step, not zeroed, so that an
    # outlier input channel feeding it cannot make int8 worse than int6 (seen on Whisper's fc2).
    g = torch.Generator().manual_seed(5)
    w = torch.randn(4, 32, generator=g) * 0.05
    w[:, 16:] = torch.randn(4, 16, generator=g) * 0.002
    c = quantize_groupwise(w, 8, 16, clip_ratio=1.0)
    assert bool((c.scale[:, 1].float() < torch.finfo(torch.float16).tiny).all())  # subnormal kept
    deq = dequantize_groupwise(c.codes, c.scale, c.zero, 16)
    step = c.scale.float().repeat_interleave(16, dim=1)
    assert bool(((deq - w).abs() <= step / 2 + 1e-7).all())
    x = torch.randn(64, 32, generator=g)
    x[:, 16:] *= 1000.0  # outlier channels read by the tiny weights
    dist, _ = layer_distortions(w, ["int8", "int6"], 16, x_sample=x)
    assert dist["int8"] < dist["int6"] / 4


def test_clip_search_uses_layer_output_and_is_deterministic():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 64, generator=g)
    w[0, 0] = 12.0  # one outlier: low-bit RTN wastes its range on it, clipping helps
    x = torch.randn(128, 64, generator=g)
    r, d = search_clip_ratio(w, 2, 64, x_sample=x)
    assert r < 1.0
    full = dequantize_groupwise(*quantize_groupwise(w, 2, 64, clip_ratio=1.0), 64, shape=w.shape)
    assert d <= cosine_distance(F.linear(x, w), F.linear(x, full))
    assert (r, d) == search_clip_ratio(w, 2, 64, x_sample=x)
    # the searched codes are the codes of that ratio
    a, b = quantize_groupwise(w, 2, 64, x_sample=x), quantize_groupwise(w, 2, 64, clip_ratio=r)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="bits"):
        quantize_groupwise(_w(), 9, 16)
    with pytest.raises(ValueError, match="clip_ratio"):
        quantize_groupwise(_w(), 4, 16, clip_ratio=1.5)
    with pytest.raises(ValueError, match="int2..int8"):
        layer_distortions(_w(), ["nf4"], 16)


def test_dequantize_op_matches_reference_and_passes_opcheck():
    w = torch.randn(5, 3, 4)
    c = quantize_groupwise(w, 4, 8)
    out = dequantize_groupwise_op(c.codes, c.scale, c.zero, "int4", 8, [5, 3, 4], torch.float32)
    assert torch.equal(out, dequantize_groupwise(c.codes, c.scale, c.zero, 8, shape=[5, 3, 4]))
    torch.library.opcheck(dequantize_groupwise_op, (c.codes, c.scale, c.zero, "int4", 8, [5, 3, 4], torch.float32))


def test_reservoir_exact_under_capacity_uniform_and_deterministic():
    r = ReservoirSampler(100, seed=7)
    r.add(torch.arange(30.0))
    r.add(torch.arange(30.0, 60.0))
    assert torch.equal(r.sample(), torch.arange(60.0))
    big = torch.arange(20000.0)
    a, b = ReservoirSampler(500, seed=7), ReservoirSampler(500, seed=7)
    for chunk in big.split(3000):
        a.add(chunk)
        b.add(chunk)
    sa = a.sample()
    assert sa.shape == (500,) and torch.equal(sa, b.sample())
    assert len(set(sa.tolist())) == 500  # a sample without repeats
    # uniform over the whole stream: mean index near the middle, late items present
    assert abs(float(sa.mean()) - 9999.5) < 1000 and float(sa.max()) > 15000


def test_layer_statistics_against_numpy():
    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(3, 7, 11, generator=g) * 2 + 0.3 for _ in range(4)]
    st = LayerStatistics("enc.fc1")
    for y in outs:
        st.update_output(y)
    a = np.abs(torch.cat([y.flatten() for y in outs]).numpy().astype(np.float64))
    assert st.count == a.size
    np.testing.assert_allclose(st.median_abs, np.median(a), rtol=1e-6)
    np.testing.assert_allclose(st.max_abs, a.max(), rtol=1e-6)
    np.testing.assert_allclose(st.mean_abs, a.mean(), rtol=1e-9)
    np.testing.assert_allclose(st.std_abs, a.std(), rtol=1e-6)
    for name, ref in (("median", np.median(a)), ("max", a.max()), ("mean", a.mean()), ("std", a.std())):
        np.testing.assert_allclose(stat_score(st, name), ref, rtol=1e-6)


def test_median_from_reservoir_is_close_when_over_capacity():
    st = LayerStatistics("x", value_capacity=4096)
    y = torch.randn(200000, generator=torch.Generator().manual_seed(1))
    st.update_output(y)
    true = float(np.median(np.abs(y.numpy())))
    assert abs(st.median_abs - true) / true < 0.05
    assert st.values.sample().shape == (4096,)


def test_input_rows_are_bounded_and_conv_patches_match_conv():
    st = LayerStatistics("l", row_capacity=16)
    st.update_input_rows(torch.randn(50, 8))
    assert st.rows.sample().shape == (16, 8) and st.rows.seen == 50
    x = torch.randn(2, 4, 9)
    w = torch.randn(6, 4, 3)
    ref = F.conv1d(x, w, stride=2, padding=1, dilation=1)
    rows = conv1d_patches(x, 3, 2, 1, 1)
    got = F.linear(rows, as_matrix(w)).view(2, -1, 6).transpose(1, 2)
    torch.testing.assert_close(got, ref)


def test_distances_and_scores():
    y = torch.randn(10, 6)
    assert cosine_distance(y, y) < 1e-6 and abs(cosine_distance(y, -y) - 2) < 1e-5
    assert kl_distance(y, y) < 1e-6 and kl_distance(y, y + torch.randn(10, 6)) > 0
    assert SCORES == {"median", "max", "mean", "std", "cosine", "kl"}
    with pytest.raises(ValueError, match="unknown sensitivity score"):
        check_score("entropy")
    with pytest.raises(RuntimeError, match="saw no calibration data"):
        stat_score(LayerStatistics("empty"), "median")


def test_layer_distortions_fall_with_bits():
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(16, 32, generator=g), torch.randn(64, 32, generator=g)
    for metric in ("cosine", "kl"):
        dist, ratio = layer_distortions(w, ["int8", "int4", "int2"], 32, x_sample=x, metric=metric)
        assert dist["int2"] > dist["int4"] > dist["int8"] >= 0
        assert set(ratio) == {"int8", "int4", "int2"} and all(0 < r <= 1 for r in ratio.values())
    # an embedding use: distance on looked-up rows
    dist, _ = layer_distortions(w, ["int8", "int2"], 32, index_sample=torch.tensor([0, 3, 3, 7]))
    assert dist["int2"] > dist["int8"]


def test_reservoir_one_huge_batch_is_uniform_and_lazy():
    # a single batch 400x the capacity: the sample is still uniform over the whole batch, and
    # only the rows that enter the sample are ever materialised
    r = ReservoirSampler(1000, seed=3)
    asked = []

    def get(at):
        idx = torch.arange(400_000, dtype=torch.float64)[at]
        asked.append(idx.numel())
        return idx

    r.add_lazy(400_000, get)
    s = r.sample()
    assert s.shape == (1000,) and len(set(s.tolist())) == 1000 and r.seen == 400_000
    assert abs(float(s.mean()) - 199_999.5) < 12_000  # ~3.3 standard errors
    hist = torch.histc(s.float(), bins=4, min=0, max=400_000)
    assert bool((hist > 200).all())  # every quarter of the stream is represented
    assert sum(asked) < 20_000  # far fewer rows built than the 400,000 offered


def test_reservoir_inclusion_probability_is_uniform_over_batches():
    # 200 runs with different seeds: every stream position is kept with probability capacity/seen
    counts = torch.zeros(600)
    for seed in range(200):
        r = ReservoirSampler(30, seed=seed)
        for chunk in torch.arange(600.0).split([10, 50, 140, 400]):
            r.add(chunk)
        counts[r.sample().long()] += 1
    per_block = counts.view(6, 100).sum(1) / 200  # expected 5 of 30 per block of 100
    assert bool(((per_block - 5).abs() < 1.0).all()), per_block


def test_lazy_conv_patches_match_unfold():
    from torch_myqasr.quantizer.observers import conv1d_patch_rows

    x = torch.randn(2, 5, 17)
    for kernel, stride, padding, dilation in [(3, 1, 1, 1), (3, 2, 1, 1), (2, 1, 0, 2)]:
        ref = conv1d_patches(x, kernel, stride, padding, dilation)
        n, get = conv1d_patch_rows(x, kernel, stride, padding, dilation)
        assert n == ref.shape[0]
        torch.testing.assert_close(get(slice(0, n)), ref, rtol=0, atol=0)
        pos = torch.tensor([n - 1, 0, 7])
        torch.testing.assert_close(get(pos), ref[pos], rtol=0, atol=0)


@pytest.mark.parametrize("metric", ["cosine", "kl"])
def test_vectorised_search_objective_matches_direct_outputs(metric, monkeypatch):
    import torch_myqasr.quantizer.clip_search as cs

    def output_distance(y, yq, metric):  # float64 references (the package's ones compute in float32)
        if metric == "cosine":
            return float((1 - F.cosine_similarity(y, yq, dim=-1)).mean())
        lp, lq = F.log_softmax(y, -1), F.log_softmax(yq, -1)
        return float((lp.exp() * (lp - lq)).sum(-1).mean())

    g = torch.Generator().manual_seed(11)
    w, x = torch.randn(40, 72, generator=g), torch.randn(30, 72, generator=g)
    ids = torch.tensor([0, 5, 5, 39])
    cands = [(2, 1.0), (2, 0.7), (4, 0.9), (8, 1.0)]
    monkeypatch.setattr(cs, "CHUNK_ELEMENTS", 700)  # many chunks of a few rows each
    probe = cs.SearchProbe(w, 32, x_sample=x, index_sample=ids, metric=metric)
    got = probe.objectives([b for b, _ in cands], [r for _, r in cands])
    for (bits, r), d in zip(cands, got.tolist()):
        wq = dequantize_groupwise(*quantize_groupwise(w, bits, 32, clip_ratio=r), 32, shape=w.shape)
        ref = 0.5 * (output_distance(F.linear(x.double(), w.double()), F.linear(x.double(), wq.double()), metric)
                     + output_distance(w[ids].double(), wq[ids].double(), metric))
        assert abs(d - ref) <= 1e-3 * ref + 1e-9, (bits, r, d, ref)  # int8 included: no cancellation


def test_search_on_feature_subset_and_all_formats_at_once():
    import torch_myqasr.quantizer.clip_search as cs

    g = torch.Generator().manual_seed(12)
    w, x = torch.randn(600, 64, generator=g), torch.randn(48, 64, generator=g)
    w[3, 7] = 9.0  # an outlier row: clipping matters at low bits
    full = cs.SearchProbe(w, 32, x_sample=x, search_features=None)
    sub = cs.SearchProbe(w, 32, x_sample=x, search_features=128)
    assert 128 <= sub.features.numel() < 600 and full.features is None  # tops of every row + random rest
    together = full.search([2, 4, 8], DEFAULT_GRID)
    for b in (2, 4, 8):  # one pass over several formats == one search per format
        assert together[b] == full.search([b], DEFAULT_GRID)[b]
    s = sub.search([2, 4, 8], DEFAULT_GRID, exact=True)
    for b in (2, 4, 8):  # the subset picks a ratio whose true objective is within 2% of the best
        assert s[b][1] <= together[b][1] * 1.02 and s[b][1] >= together[b][1] * (1 - 1e-9)


DEFAULT_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


def test_logits_fisher_scale_predicts_the_kl_of_a_perturbed_hidden_state():
    # Closed form (Fisher trace) against Monte Carlo: isotropic noise on the logits layer's input
    # with a known cosine distance; the KL of the token distribution per unit of that distance.
    g = torch.Generator().manual_seed(11)
    w = torch.randn(300, 24, generator=g) * 0.4
    x = torch.randn(64, 24, generator=g)
    s = logits_fisher_scale(w, x)
    n = torch.randn(200, *x.shape, generator=g) * (0.02 * x.norm(dim=-1, keepdim=True) / 24**0.5)
    xp = x + n
    cos = (1 - F.cosine_similarity(x.expand_as(xp), xp, dim=-1)).mean()
    lp, lq = torch.log_softmax(x @ w.t(), -1), torch.log_softmax(xp @ w.t(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean()
    assert s > 0 and abs(float(kl / cos) / s - 1) < 0.1
    # Identical output embeddings: no direction of the hidden state moves the distribution
    # (0 up to float32 rounding of sum p|w|^2 - |sum p w|^2).
    assert logits_fisher_scale(torch.ones(50, 24), x) < 1e-3 * s


def test_output_layer_distortion_is_logits_kl_plus_scaled_lookup_distance():
    g = torch.Generator().manual_seed(12)
    w = torch.randn(120, 32, generator=g) * 0.3
    x = torch.randn(40, 32, generator=g)
    ids = torch.randint(0, 120, (30,), generator=g)
    dist, ratio = output_layer_distortions(w, ["int8", "int4", "int2"], 16, x_sample=x, index_sample=ids,
                                           lookup_scale=0.5)
    assert dist["int8"] < dist["int4"] < dist["int2"]
    for fmt, b in (("int4", 4), ("int2", 2)):
        c = quantize_groupwise(w, b, 16, clip_ratio=ratio[fmt])
        wq = dequantize_groupwise(c.codes, c.scale, c.zero, 16)[:, :32]
        direct = kl_distance(x @ w.t(), x @ wq.t()) + 0.5 * cosine_distance(w[ids], wq[ids])
        assert abs(direct - dist[fmt]) <= 1e-3 * direct + 1e-7
    # The KL term alone (no lookup use) is smaller by exactly the lookup part's contribution.
    alone, _ = output_layer_distortions(w, ["int2"], 16, x_sample=x, index_sample=None, lookup_scale=0.5)
    assert alone["int2"] < dist["int2"]


def test_kl_objective_stays_finite_when_the_likely_tokens_collapse():
    # Peaked logits whose top entries are pushed far down: E_p[expm1(e)] is about -1 and float32
    # rounding of p took it below -1 (NaN on Whisper base). Compare with the direct KL.
    from torch_myqasr.quantizer.clip_search import _KLAcc

    g = torch.Generator().manual_seed(13)
    y = torch.randn(500, 8, generator=g) * 3
    y[0] += 40.0  # one token holds nearly all the mass
    e = torch.randn(500, 8, generator=g) * 0.1
    e[0] -= 30.0
    acc = _KLAcc(y, 1)
    acc.add(0, e[None])
    got = float(acc.result()[0])
    assert np.isfinite(got) and abs(got - kl_distance(y.t(), (y + e).t())) < 1e-3 * got
