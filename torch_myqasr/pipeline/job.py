"""The main job on the bundled defaults: personalise Whisper to one speaker and compare with the baselines.

Calibrate on one bundled speaker's unlabelled clips, allocate bits under the budget, quantize, and
report WER per test speaker for full precision, uniform quantization at the same budget and the
personalised model, with their sizes, as a table and a plot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from torch_myqasr.atomic import atomic_open, atomic_write_text
from torch_myqasr.formats import MIB

DEFAULT_JOB_SPEAKER = "slt"
DEFAULT_JOB_TEST_SPEAKERS = ("slt", "kal", "ked", "librivox")
DEFAULT_JOB_BITS_PER_WEIGHT = 4.5
"""Default budget: the size halfway between uniform int4 and uniform int5 (scales counted)."""


@dataclass
class JobRow:
    """One model of the comparison: its name, size in MiB and WER aggregate."""

    name: str
    size_mib: float
    wer: dict


def run_job(
    model: str = "tiny.en",
    *,
    speaker: str = DEFAULT_JOB_SPEAKER,
    test_speakers: Sequence[str] = DEFAULT_JOB_TEST_SPEAKERS,
    budget_mb: float | None = None,
    strategy: str = "myqasr",
    out_dir: str | Path = "myqasr-out",
    progress: bool = True,
) -> list[JobRow]:
    """Run the personalise-and-quantize job on the bundled corpus; write table, plot and scheme to ``out_dir``.

    ``budget_mb`` (MiB) defaults to `DEFAULT_JOB_BITS_PER_WEIGHT` bits per weight. Returns the rows
    (full precision, uniform, personalised) in that order.
    """
    from torch_myqasr.allocation import budget_for_bits
    from torch_myqasr.audio import load_dataset_audio, open_dataset
    from torch_myqasr.corpus import corpus_manifest
    from torch_myqasr.evaluation.transcribe import evaluate
    from torch_myqasr.models import load_whisper
    from torch_myqasr.pipeline.personalize import layer_inventory, quantize_whisper, save_quantized

    out = Path(out_dir)
    bundle = load_whisper(model)
    calib = [a for _, a in load_dataset_audio(open_dataset(corpus_manifest("calib")).filter(speakers=[speaker]))]
    test = open_dataset(corpus_manifest("test")).filter(speakers=list(test_speakers))
    if budget_mb is None:
        budget_mb = budget_for_bits(layer_inventory(bundle, calib[0]), DEFAULT_JOB_BITS_PER_WEIGHT)
    fp32_mib = sum(p.numel() * 4 for p in bundle.model.parameters()) / MIB  # tied weights counted once

    rows = [JobRow("fp32", fp32_mib, evaluate(bundle, test, progress=progress).wer)]
    uniform = quantize_whisper(bundle, calib, budget_mb=budget_mb, strategy="uniform", progress=progress)
    rows.append(JobRow("uniform " + _formats(uniform.scheme), uniform.scheme.size_mb,
                       evaluate(bundle, test, decode=uniform.decoder(), progress=progress).wer))
    personal = quantize_whisper(bundle, calib, budget_mb=budget_mb, strategy=strategy, progress=progress)
    rows.append(JobRow(f"personalised ({strategy}, {_formats(personal.scheme)})", personal.scheme.size_mb,
                       evaluate(bundle, test, decode=personal.decoder(), progress=progress).wer))
    save_quantized(personal, out / "personalised")
    table = format_job_table(rows, test_speakers, model=model, speaker=speaker, budget_mb=budget_mb)
    atomic_write_text(out / "report.md", table)
    atomic_write_text(out / "report.json", json.dumps(
        {"model": model, "calib_speaker": speaker, "budget_mib": budget_mb,
         "rows": [{"name": r.name, "size_mib": r.size_mib, "wer": _wer_dict(r.wer)} for r in rows]}, indent=2) + "\n")
    plot_job(rows, test_speakers, out / "report.png", title=f"Whisper {model}, personalised to '{speaker}' at {budget_mb:.1f} MiB")
    return rows


def _formats(scheme) -> str:
    from torch_myqasr.allocation import bit_histogram

    return "+".join(bit_histogram(scheme))


def _wer_dict(agg: dict) -> dict:
    from torch_myqasr.evaluation.wer import wer_report_dict

    return wer_report_dict(agg, model="")


def format_job_table(rows: list[JobRow], speakers: Sequence[str], *, model: str, speaker: str, budget_mb: float) -> str:
    """Markdown table: one row per model, WER % per test speaker, size in MiB."""
    lines = [
        f"Whisper {model} personalised to speaker '{speaker}' (unlabelled calibration clips), budget {budget_mb:.3f} MiB",
        "",
        "| model | size MiB | " + " | ".join(f"{s} WER %" for s in speakers) + " | overall WER % |",
        "| --- | ---: | " + " | ".join("---:" for _ in speakers) + " | ---: |",
    ]
    for r in rows:
        cells = [f"{100 * r.wer['by_speaker'][s].wer:.1f}" if s in r.wer["by_speaker"] else "-" for s in speakers]
        lines.append(f"| {r.name} | {r.size_mib:.2f} | " + " | ".join(cells) + f" | {100 * r.wer['overall'].wer:.1f} |")
    return "\n".join(lines) + "\n"


def plot_job(rows: list[JobRow], speakers: Sequence[str], path: Path, *, title: str) -> None:
    """Grouped bars of WER % per speaker for each model, saved atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(rows)
    x = np.arange(len(speakers))
    for i, r in enumerate(rows):
        vals = [100 * r.wer["by_speaker"][s].wer if s in r.wer["by_speaker"] else 0 for s in speakers]
        ax.bar(x + i * width, [min(v, 100) for v in vals], width, label=f"{r.name} ({r.size_mib:.1f} MiB)")
    ax.set_xticks(x + width * (len(rows) - 1) / 2, speakers)
    ax.set_ylabel("WER % (capped at 100)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
