"""Word error rate of the full-precision models on the bundled corpus, per speaker.

    python benchmarks/wer_full_precision.py [--models tiny.en base]

Writes benchmarks/results/wer_full_precision_<machine>.{md,json}. "librivox (all 5)" pools the
calibration and test clips of the real LibriVox reader: full precision needs no calibration, and
five real utterances are a steadier figure than three.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe_machine, machine_line, machine_slug  # noqa: E402
from torch_myqasr.atomic import atomic_write_text  # noqa: E402
from torch_myqasr.audio import open_dataset  # noqa: E402
from torch_myqasr.audio.datasets import Dataset  # noqa: E402
from torch_myqasr.corpus import corpus_manifest  # noqa: E402
from torch_myqasr.evaluation.transcribe import evaluate  # noqa: E402
from torch_myqasr.evaluation.wer import wer_report_dict  # noqa: E402
from torch_myqasr.models import load_whisper  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def run(models: list[str]) -> dict:
    """Evaluate each model on the test split (its languages) and on all LibriVox clips."""
    test = open_dataset(corpus_manifest("test"))
    calib = open_dataset(corpus_manifest("calib"))
    librivox = Dataset([u for u in [*calib, *test] if u.speaker == "librivox"], name="librivox-all")
    out = {"machine": describe_machine(), "models": {}}
    for name in models:
        bundle = load_whisper(name)
        data = test if bundle.is_multilingual else test.filter(languages=["en", None])
        t0 = time.perf_counter()
        res = evaluate(bundle, data, progress=True)
        seconds = time.perf_counter() - t0
        lv = evaluate(bundle, librivox, progress=False)
        out["models"][name] = {
            "test": wer_report_dict(res.wer, model=name),
            "librivox_all": wer_report_dict(lv.wer, model=name),
            "eval_seconds": seconds,
        }
    return out


def to_markdown(results: dict) -> str:
    """A per-speaker WER table (percent) with one column per model."""
    models = list(results["models"])
    speakers = sorted({s for m in models for s in results["models"][m]["test"]["by_speaker"]})
    lines = [
        "# Full-precision WER on the bundled corpus (test split, greedy, Whisper normaliser)",
        "",
        f"Machine: {machine_line()}",
        "Command: `python benchmarks/wer_full_precision.py --models " + " ".join(models) + "`",
        "",
        "| speaker | " + " | ".join(f"{m} WER % (utts)" for m in models) + " |",
        "| --- | " + " | ".join("---:" for _ in models) + " |",
    ]

    def cell(d: dict | None) -> str:
        return "-" if d is None or d["wer"] is None else f"{100 * d['wer']:.1f} ({d['n_utts']})"

    for s in speakers:
        lines.append(f"| {s} | " + " | ".join(cell(results["models"][m]["test"]["by_speaker"].get(s)) for m in models) + " |")
    lines.append("| **overall** | " + " | ".join(cell(results["models"][m]["test"]["overall"]) for m in models) + " |")
    lines.append("| **librivox (all 5, real speech)** | " + " | ".join(cell(results["models"][m]["librivox_all"]["overall"]) for m in models) + " |")
    lines.append("")
    lines.append("Transcription wall time for the test split: " + ", ".join(f"{m} {results['models'][m]['eval_seconds']:.0f} s" for m in models) + ".")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny.en", "base"])
    args = p.parse_args()
    results = run(args.models)
    stem = RESULTS / f"wer_full_precision_{machine_slug()}"
    atomic_write_text(stem.with_suffix(".json"), json.dumps(results, indent=2) + "\n")
    md = to_markdown(results)
    atomic_write_text(stem.with_suffix(".md"), md)
    print(md)


if __name__ == "__main__":
    main()
