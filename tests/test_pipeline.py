"""Personalised quantization of real Whisper tiny.en on real clips, through the exported programs."""

from __future__ import annotations

import json

import pytest
import torch

from torch_myqasr.allocation import BudgetError
from torch_myqasr.audio import load_dataset_audio, open_dataset
from torch_myqasr.cli import main
from torch_myqasr.corpus import corpus_manifest
from torch_myqasr.evaluation.normalize import normalize_text
from torch_myqasr.evaluation.transcribe import evaluate, featurize, hf_generate_decoder, transcribe
from torch_myqasr.evaluation.wer import compute_wer
from torch_myqasr.models import load_whisper
from torch_myqasr.pipeline import exported_decoder, load_quantized, quantize_whisper, save_quantized

pytestmark = pytest.mark.slow

BUDGET_MB = 24.0  # tiny.en: uniform int4 is ~22.7 MiB, int5 ~26 MiB, fp32 ~144 MiB


def _clips(split: str, speaker: str, n: int):
    data = open_dataset(corpus_manifest(split)).filter(speakers=[speaker])
    return [(u, a) for u, a in load_dataset_audio(data)][:n]


@pytest.fixture(scope="module")
def bundle():
    return load_whisper("tiny.en")


@pytest.fixture(scope="module")
def calib():
    return [a for _, a in _clips("calib", "slt", 3)]


@pytest.fixture(scope="module")
def quantized(bundle, calib):
    return quantize_whisper(bundle, calib, budget_mb=BUDGET_MB, progress=False)


def test_full_precision_through_exported_programs_equals_transformers_generate(bundle):
    from torch_myqasr.export import export_whisper

    clips = [a for _, a in _clips("test", "librivox", 2) + _clips("test", "kal", 2)]
    exported = export_whisper(bundle.model, max_cache_len=120)
    ours = exported_decoder(bundle, exported.max_cache_len, exported.modules())
    feats = featurize(bundle, clips)
    assert ours(feats, 60, None) == hf_generate_decoder(bundle)(feats, 60, None)


def test_budget_is_honoured_and_speech_is_still_recognised(bundle, quantized):
    s = quantized.scheme
    assert s.size_mb <= BUDGET_MB and s.budget_mb == BUDGET_MB
    assert s.calibration["n_clips"] == 3 and s.calibration["seconds"] > 3
    assert "model.decoder.embed_tokens" in s.layers  # the tied embedding is a candidate like any linear
    assert {l.format for l in s.layers.values()} <= {"int8", "int6", "int5", "int4", "int3", "int2"}
    test = open_dataset(corpus_manifest("test")).filter(speakers=["slt", "librivox"])
    res = evaluate(bundle, test, decode=quantized.decoder(), progress=False)
    assert res.wer["overall"].wer < 0.2  # fp32 tiny.en: ~4%; uniform int3 collapses


def test_same_clips_and_budget_give_the_same_scheme(bundle, calib, quantized):
    again = quantize_whisper(bundle, calib, budget_mb=BUDGET_MB, progress=False)
    assert again.scheme.to_json() == quantized.scheme.to_json()


def test_saved_scheme_reloads_to_identical_outputs(bundle, quantized, tmp_path):
    save_quantized(quantized, tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "scheme.json").read_text())
    assert {"budget_mb", "size_mb", "strategy", "layers"} <= set(saved)
    assert all({"bits", "group_size"} <= set(l) for l in saved["layers"].values())
    reloaded = load_quantized(tmp_path / "q")
    clips = [a for _, a in _clips("test", "slt", 2)]
    feats = featurize(bundle, clips)
    with torch.inference_mode():
        a = quantized.encoder(feats)
        b = reloaded.encoder(feats)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert transcribe(bundle, clips, decode=quantized.decoder(), progress=False) == transcribe(
        bundle, clips, decode=reloaded.decoder(), progress=False
    )


def test_budget_below_the_minimum_names_the_minimum(bundle, calib):
    with pytest.raises(BudgetError, match=r"smallest reachable size [0-9.]+ MiB"):
        quantize_whisper(bundle, calib[:1], budget_mb=5.0, progress=False)


def test_cli_quantize_then_eval_and_transcribe_the_folder(tmp_path, capsys):
    out = tmp_path / "user"
    code = main(["quantize", "--model", "tiny.en", "--calib", str(corpus_manifest("calib")), "--speaker", "kal",
                 "--budget", "30MB", "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0 and "MiB budget" in printed and "int" in printed
    assert (out / "artifact" / "manifest.json").is_file()
    assert (out / "scheme.json").is_file() and (out / "scheme.png").is_file()
    assert json.loads((out / "scheme.json").read_text())["size_mb"] <= 30.0
    code = main(["eval", "--model", str(out), "--speaker", "kal", "--quiet", "--json", str(tmp_path / "r.json")])
    assert code == 0
    assert json.loads((tmp_path / "r.json").read_text())["by_speaker"]["kal"]["n_utts"] == 8


@pytest.mark.parametrize(
    "budget, message", [("3MB", "smallest reachable size"), ("twenty", "cannot read budget"), ("-4MB", "positive")]
)
def test_cli_quantize_bad_budgets(tmp_path, capsys, budget, message):
    code = main(["quantize", "--calib", str(corpus_manifest("calib")), "--speaker", "slt", f"--budget={budget}",
                 "--out", str(tmp_path / "x"), "--quiet"])
    assert code == 2 and message in capsys.readouterr().err


def test_artifact_reloads_in_a_fresh_process_with_the_same_first_tokens(bundle, quantized, tmp_path):
    import subprocess
    import sys

    from torch_myqasr.pipeline import save_lowered_artifact

    clip = [a for _, a in _clips("test", "librivox", 1)]
    feats = featurize(bundle, clip)
    torch.save(feats, tmp_path / "feats.pt")
    expected = quantized.decoder()(feats, 4, None)
    folder = save_lowered_artifact(quantized, tmp_path / "out")
    script = (
        "import sys, torch, torch_myqasr\n"
        "from torch_myqasr.artifact import load_artifact\n"
        "art = load_artifact(sys.argv[1])\n"
        "opts = art.decoding_options(max_new_tokens=4)\n"
        "print(art.greedy_decode(torch.load(sys.argv[2]), opts))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path / "feats.pt")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == str(expected)


def test_main_job_reports_fp32_uniform_and_personalised(tmp_path, capsys):
    import subprocess
    import sys

    job = tmp_path / "job"
    code = main(["personalize", "--test-speakers", "librivox", "--budget", "24MB", "--out", str(job), "--quiet", "--no-compile"])
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads((job / "report.json").read_text())
    assert [r["name"].split()[0] for r in report["rows"]] == ["fp32", "uniform", "personalised"]
    # the scheme and the deployed model as held in memory (CPU layout) both fit the budget
    assert all(r["size_mib"] <= 24.0 and r["memory_mib"] <= 24.0 for r in report["rows"][1:])
    assert report["rows"][0]["wer"]["by_speaker"]["librivox"]["n_utts"] == 3
    assert (job / "report.png").is_file() and (job / "personalised" / "scheme.json").is_file()
    assert "| personalised" in printed
    # a fresh process loading the personalised artifact transcribes with the WER the job reported
    subprocess.run([sys.executable, "-m", "torch_myqasr.cli", "eval", "--model", str(job / "personalised"),
                    "--speaker", "librivox", "--quiet", "--json", str(tmp_path / "fresh.json")], check=True)
    fresh = json.loads((tmp_path / "fresh.json").read_text())["by_speaker"]["librivox"]
    assert fresh == report["rows"][2]["wer"]["by_speaker"]["librivox"]
