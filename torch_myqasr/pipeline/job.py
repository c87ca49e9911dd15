"""The main job on the bundled defaults: personalise Whisper to one speaker and compare with the baselines.

Calibrate on one bundled speaker's unlabelled clips, allocate bits under the budget, quantize through
PT2E, lower to packed ops, write the deployable artifact, load it back as a device would (CPU layout,
bfloat16 matmuls, optionally ``torch.compile``) and report WER per test speaker for full precision,
uniform quantization at the same budget and the personalised model, with their sizes (the scheme's
and the bytes really held in memory), as a table and a plot.

Default formats are the CPU kernel's native widths, int8 and int4: on CPU a weight is held in
aten's int4 layout, where int4 and int8 cost exactly their scheme bytes while int1-3 would be held
in 4 bits and int5-7 in 8 (docs/lowering.md). The default budget sits halfway between uniform int4
and uniform int8.
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
DEFAULT_JOB_FORMATS = ("int8", "int4")
"""Candidate formats of the job: the widths the CPU deployment layout holds at their scheme size."""
DEFAULT_JOB_BITS_PER_WEIGHT = 6.0
"""Default budget: the size halfway between uniform int4 and uniform int8 (scales counted)."""


@dataclass
class JobRow:
    """One model of the comparison: its name, scheme size and in-memory size in MiB, and WER aggregate."""

    name: str
    size_mib: float
    wer: dict
    memory_mib: float | None = None


def run_job(
    model: str = "tiny.en",
    *,
    speaker: str = DEFAULT_JOB_SPEAKER,
    test_speakers: Sequence[str] = DEFAULT_JOB_TEST_SPEAKERS,
    budget_mb: float | None = None,
    strategy: str = "myqasr",
    formats: Sequence[str] = DEFAULT_JOB_FORMATS,
    compile: bool = True,
    out_dir: str | Path = "myqasr-out",
    progress: bool = True,
) -> list[JobRow]:
    """Run the personalise-and-deploy job on the bundled corpus; write table, plot, scheme and artifacts to ``out_dir``.

    ``budget_mb`` (MiB) defaults to `DEFAULT_JOB_BITS_PER_WEIGHT` bits per weight. The quantized
    models are evaluated as deployed (`deploy_quantized`: ``out_dir/uniform`` and
    ``out_dir/personalised`` hold their artifacts; ``compile`` wraps them in ``torch.compile``).
    Returns the rows (full precision, uniform, personalised) in that order.
    """
    from torch_myqasr.allocation import budget_for_bits
    from torch_myqasr.audio import load_dataset_audio, open_dataset
    from torch_myqasr.corpus import corpus_manifest
    from torch_myqasr.evaluation.transcribe import evaluate
    from torch_myqasr.models import load_whisper
    from torch_myqasr.pipeline.deploy import deploy_quantized
    from torch_myqasr.pipeline.personalize import layer_inventory, quantize_whisper, save_quantized

    out = Path(out_dir)
    bundle = load_whisper(model)
    calib = [a for _, a in load_dataset_audio(open_dataset(corpus_manifest("calib")).filter(speakers=[speaker]))]
    test = open_dataset(corpus_manifest("test")).filter(speakers=list(test_speakers))
    if budget_mb is None:
        budget_mb = budget_for_bits(layer_inventory(bundle, calib[0]), DEFAULT_JOB_BITS_PER_WEIGHT)
    fp32_mib = sum(p.numel() * 4 for p in bundle.model.parameters()) / MIB  # tied weights counted once

    rows = [JobRow("fp32", fp32_mib, evaluate(bundle, test, progress=progress).wer, fp32_mib)]
    for name, method in (("uniform", "uniform"), ("personalised", strategy)):
        qw = quantize_whisper(bundle, calib, budget_mb=budget_mb, strategy=method, formats=formats, progress=progress)
        deployed = deploy_quantized(qw, out / name, compile=compile)
        label = f"{name} {_formats(qw.scheme)}" if name == "uniform" else f"{name} ({method}, {_formats(qw.scheme)})"
        wer = evaluate(bundle, test, decode=deployed.decoder(), progress=progress).wer
        rows.append(JobRow(label, qw.scheme.size_mb, wer, deployed.resident_bytes / MIB))
        save_quantized(qw, out / name)
    table = format_job_table(rows, test_speakers, model=model, speaker=speaker, budget_mb=budget_mb)
    atomic_write_text(out / "report.md", table)
    atomic_write_text(out / "report.json", json.dumps(
        {"model": model, "calib_speaker": speaker, "budget_mib": budget_mb, "compiled": compile,
         "compute_dtype": "bfloat16",
         "rows": [{"name": r.name, "size_mib": r.size_mib, "memory_mib": r.memory_mib, "wer": _wer_dict(r.wer)}
                  for r in rows]}, indent=2) + "\n")
    plot_job(rows, test_speakers, out / "report.png", title=f"Whisper {model}, personalised to '{speaker}' at {budget_mb:.1f} MiB")
    return rows


def _formats(scheme) -> str:
    from torch_myqasr.allocation import bit_histogram

    return "+".join(bit_histogram(scheme))


def _wer_dict(agg: dict) -> dict:
    from torch_myqasr.evaluation.wer import wer_report_dict

    return wer_report_dict(agg, model="")


def format_job_table(rows: list[JobRow], speakers: Sequence[str], *, model: str, speaker: str, budget_mb: float) -> str:
    """Markdown table: one row per model, WER % per test speaker, scheme size and in-memory size in MiB."""
    lines = [
        f"Whisper {model} personalised to speaker '{speaker}' (unlabelled calibration clips), budget {budget_mb:.3f} MiB",
        "",
        "| model | size MiB | in memory MiB | " + " | ".join(f"{s} WER %" for s in speakers) + " | overall WER % |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in speakers) + " | ---: |",
    ]
    for r in rows:
        cells = [f"{100 * r.wer['by_speaker'][s].wer:.1f}" if s in r.wer["by_speaker"] else "-" for s in speakers]
        memory = "-" if r.memory_mib is None else f"{r.memory_mib:.2f}"
        lines.append(f"| {r.name} | {r.size_mib:.2f} | {memory} | " + " | ".join(cells) + f" | {100 * r.wer['overall'].wer:.1f} |")
    lines += ["", "Quantized rows are the deployed artifacts (`<out>/uniform`, `<out>/personalised`) loaded back with "
              "weights in aten's int4 CPU layout and bfloat16 matmuls; 'in memory' counts every parameter and buffer they hold."]
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
