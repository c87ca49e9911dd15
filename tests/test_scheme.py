"""The scheme file: round trip, atomic save, validation errors, histogram, summary and plot."""

from __future__ import annotations

import json
import math

import pytest

from torch_myqasr.allocation import (
    LayerInfo,
    LayerScheme,
    Scheme,
    SchemeError,
    allocate_bits,
    bit_histogram,
    format_scheme_summary,
    load_scheme,
    model_nbytes,
    plot_scheme,
    save_scheme,
)
from torch_myqasr.formats import FORMATS, MIB

LAYERS = [
    LayerInfo("model.encoder.layers.0.self_attn.q_proj", 64, 64, 0.5),
    LayerInfo("model.encoder.layers.0.fc1", 256, 64, 2.0),
    LayerInfo("model.encoder.layers.0.fc2", 64, 256, 1.0),
    LayerInfo("model.decoder.embed_tokens", 500, 64, 3.0),
]
FIXED = 4321
CALIB = {"n_clips": 3, "seconds": 21.5, "audio_sha256": "ab" * 32, "score": "median_abs"}


def _scheme(strategy: str = "myqasr") -> Scheme:
    budget = (model_nbytes(LAYERS, "int4", fixed_bytes=FIXED) + model_nbytes(LAYERS, "int3", fixed_bytes=FIXED)) / 2 / MIB
    choices = allocate_bits(LAYERS, budget, strategy=strategy, fixed_bytes=FIXED, order="low-score-first")
    return Scheme.build(
        model_id="whisper-tiny.en",
        budget_mb=budget,
        strategy=strategy,
        group_size=64,
        layers=choices,
        fixed_bytes=FIXED,
        calibration=CALIB,
        order="low-score-first",
    )


def _write(tmp_path, data) -> str:
    p = tmp_path / "scheme.json"
    p.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return str(p)


def test_build_counts_the_size():
    s = _scheme()
    assert s.size_bytes == FIXED + sum(l.nbytes for l in s.layers.values())
    assert s.size_mb == s.size_bytes / MIB <= s.budget_mb
    assert {l.format for l in s.layers.values()} == {"int4", "int3"}  # a real mix at this budget


def test_json_round_trip_is_exact_and_has_the_contract_keys():
    s = _scheme()
    data = json.loads(s.to_json())
    for key in ("budget_mb", "size_mb", "strategy", "layers", "model_id", "calibration", "format_version", "fixed_bytes"):
        assert key in data
    assert list(data["layers"]) == [l.name for l in LAYERS]  # model order
    for entry in data["layers"].values():
        assert {"bits", "group_size", "format"} <= set(entry)
    assert data["calibration"] == CALIB
    assert Scheme.from_json(s.to_json()) == s


def test_save_and_load_round_trip(tmp_path):
    s = _scheme("uniform")
    path = save_scheme(s, tmp_path / "out" / "scheme.json")
    assert load_scheme(path) == s
    assert load_scheme(tmp_path / "out") == s  # a folder means folder/scheme.json
    # overwrite in place: the new content wins and no temporary file is left behind
    s2 = _scheme("myqasr")
    save_scheme(s2, path)
    assert load_scheme(path) == s2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scheme.json"]


def test_fp32_layers_round_trip(tmp_path):
    layers = {l.name: LayerScheme.for_layer(l, "fp32", 64) for l in LAYERS}
    s = Scheme.build(model_id="m", budget_mb=10.0, strategy="uniform", group_size=64, layers=layers)
    assert load_scheme(save_scheme(s, tmp_path / "s.json")) == s


def test_save_refuses_an_inconsistent_scheme(tmp_path):
    s = _scheme()
    s.budget_mb = s.size_mb / 2
    with pytest.raises(SchemeError, match="exceeds the budget"):
        save_scheme(s, tmp_path / "s.json")
    assert not (tmp_path / "s.json").exists()


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="myqasr quantize"):
        load_scheme(tmp_path / "nope.json")


def test_bad_json(tmp_path):
    with pytest.raises(SchemeError, match=r"not valid JSON .* line 1"):
        load_scheme(_write(tmp_path, '{"budget_mb": 1,'))
    with pytest.raises(SchemeError, match="top level must be a JSON object"):
        load_scheme(_write(tmp_path, "[1, 2]"))


def _corrupt(mutate) -> dict:
    data = json.loads(_scheme().to_json())
    mutate(data)
    return data


def _first(data) -> dict:
    return next(iter(data["layers"].values()))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: _first(d).update(format="int9"), r"unknown format 'int9'; known formats: " + ", ".join(FORMATS)),
        (lambda d: _first(d).update(bits=5), r"bits 5 does not match format"),
        (lambda d: _first(d).update(nbytes=_first(d)["nbytes"] + 1), r"nbytes \d+ does not add up"),
        (lambda d: d.update(size_mb=d["size_mb"] + 0.01), "the size does not add up"),
        (lambda d: d.update(size_bytes=d["size_bytes"] - 1), "the size does not add up"),
        (lambda d: d.update(fixed_bytes=d["fixed_bytes"] + 64), "the size does not add up"),
        (lambda d: d.update(budget_mb=d["size_mb"] * 0.9), "exceeds the budget"),
        (lambda d: d.pop("strategy"), "missing key 'strategy'"),
        (lambda d: d.update(layers=[]), "'layers' must be dict"),
        (lambda d: _first(d).pop("group_size"), "missing key 'group_size'"),
        (lambda d: d.update(format_version=99), "format_version 99 is not supported"),
        (lambda d: d["calibration"].update(n_clips="three"), "calibration 'n_clips' has the wrong type"),
    ],
)
def test_corrupt_schemes_are_rejected_with_clear_errors(tmp_path, mutate, message):
    with pytest.raises(SchemeError, match=message) as e:
        load_scheme(_write(tmp_path, _corrupt(mutate)))
    assert "scheme.json" in str(e.value)  # the error names the file


def test_minimal_contract_json_loads(tmp_path):
    # The minimal layout (no shapes, no bytes totals) still loads when the sizes agree.
    data = {
        "budget_mb": 1.0,
        "size_mb": 1000 / MIB,
        "strategy": "myqasr",
        "layers": {"a": {"format": "int4", "bits": 4, "group_size": 64, "nbytes": 1000}},
    }
    s = load_scheme(_write(tmp_path, data))
    assert s.layers["a"] == LayerScheme("int4", 4, 64, 1000) and s.group_size == 64


def test_histogram_and_summary():
    s = _scheme()
    hist = bit_histogram(s)
    assert list(hist) == ["int4", "int3"]  # most bits first
    assert sum(hist.values()) == len(LAYERS)
    text = format_scheme_summary(s)
    assert f"{s.size_bytes / MIB:.3f} MiB of {s.budget_mb:.3f} MiB budget" in text
    for fmt, count in hist.items():
        assert any(line.strip().startswith(fmt) and f"{count:4d} layers" in line for line in text.splitlines())
    assert "whisper-tiny.en" in text and "myqasr" in text


def test_plot_writes_a_png(tmp_path):
    path = plot_scheme(_scheme(), tmp_path / "plots" / "bits.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert sorted(p.name for p in path.parent.iterdir()) == ["bits.png"]


def test_uniform_sizes_and_budget_for_bits_interpolate_between_them():
    from torch_myqasr.allocation import budget_for_bits, uniform_size_mb
    from torch_myqasr.formats import MIB, weight_nbytes

    s = _scheme()
    int4 = (s.fixed_bytes + sum(weight_nbytes("int4", l.out_features, l.in_features, 64) for l in s.layers.values())) / MIB
    assert uniform_size_mb(s, "int4") == int4
    assert budget_for_bits(s, 4) == int4
    lo, hi = uniform_size_mb(s, "int3"), uniform_size_mb(s, "int4")
    halfway = budget_for_bits(s, 3.5)
    assert lo < halfway <= (lo + hi) / 2 and (lo + hi) / 2 - halfway < 0.001
