"""The ``myqasr`` command: real runs on the bundled corpus and clear errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from torch_myqasr.cli import main
from torch_myqasr.corpus import corpus_dir, corpus_manifest


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_eval_on_real_librivox_speech_writes_the_json_report(capsys, tmp_path):
    report = tmp_path / "r.json"
    code, out, _ = _run(capsys, "eval", "--model", "tiny.en", "--speaker", "librivox", "--json", str(report), "--quiet")
    assert code == 0
    assert "librivox" in out and "WER %" in out
    r = json.loads(report.read_text())
    assert r["model"] == "tiny.en"
    assert r["overall"]["n_utts"] == 3 and set(r["by_speaker"]) == {"librivox"}
    assert 0.0 <= r["overall"]["wer"] <= 0.1  # tiny.en reads real LibriVox speech almost perfectly


@pytest.mark.slow
def test_transcribe_prints_the_text_of_real_speech(capsys):
    clip = corpus_dir() / "audio" / "slt" / "slt-test-01.flac"
    code, out, _ = _run(capsys, "transcribe", "--model", "tiny.en", str(clip))
    assert code == 0
    expected = next(json.loads(l)["text"] for l in corpus_manifest("test").read_text().splitlines() if "slt-test-01" in l)
    assert out.strip().lower().rstrip(".") == expected.lower().rstrip(".")


def test_transcribe_resamples_stereo_44k_input(capsys, tmp_path):
    audio, sr = sf.read(corpus_dir() / "audio" / "slt" / "slt-test-01.flac")
    import soxr

    hi = soxr.resample(audio, sr, 44100)
    stereo = tmp_path / "stereo44k.wav"
    sf.write(stereo, np.stack([hi, 0.5 * hi], axis=1), 44100)
    code, out, _ = _run(capsys, "transcribe", str(stereo))
    assert code == 0 and "sun rose" in out.lower()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--model", "tiny-nope", "--speaker", "slt"], "unknown model 'tiny-nope'"),
        (["transcribe", "/no/such/clip.wav"], "not found: /no/such/clip.wav"),
        (["eval", "--speaker", "nobody"], "nobody"),
    ],
)
def test_user_errors_exit_2_with_one_clear_line(capsys, argv, message):
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert err.startswith("error: ") and message in err


def test_bad_inputs_name_the_file(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(capsys, "eval", "--data", str(empty))
    assert code == 2 and str(empty) in err

    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF....not audio at all")
    code, _, err = _run(capsys, "transcribe", str(corrupt))
    assert code == 2 and "corrupt.wav" in err

    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, dtype=np.float32), 16000)
    code, _, err = _run(capsys, "transcribe", str(silent))
    assert code == 2 and "silent" in err

    tree = tmp_path / "libri" / "19" / "198"
    tree.mkdir(parents=True)
    sf.write(tree / "19-198-0001.flac", np.random.default_rng(0).standard_normal(16000) * 0.1, 16000)
    (tree / "19-198.trans.txt").write_text("19-198-0002 A TRANSCRIPT WITH NO AUDIO\n")
    code, _, err = _run(capsys, "eval", "--data", str(tmp_path / "libri"))
    assert code == 2 and "19-198-0002" in err

    half_written = tmp_path / "model" / "artifact"  # a manifest whose listed file is missing
    half_written.mkdir(parents=True)
    (half_written / "manifest.json").write_text('{"format_version": 1, "versions": {}, "files": {"encoder.pt2": {"sha256": "0", "bytes": 1}}}')
    code, _, err = _run(capsys, "transcribe", "--model", str(tmp_path / "model"), str(tree / "19-198-0001.flac"))
    assert code == 2 and err.startswith("error: ") and "written by other versions" in err


def test_console_script_is_installed_and_answers_help():
    out = subprocess.run([sys.executable, "-m", "torch_myqasr.cli", "--help"], capture_output=True, text=True, check=True)
    assert "eval" in out.stdout and "transcribe" in out.stdout
