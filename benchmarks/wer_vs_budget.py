"""WER versus memory budget for uniform, myqasr (both score orders) and optimal, and the personalisation matrix.

    python benchmarks/wer_vs_budget.py --model tiny.en                # budget sweep
    python benchmarks/wer_vs_budget.py --model base --bits-per-weight 3.5 4.5
    python benchmarks/wer_vs_budget.py --model tiny.en --matrix       # calibrate on X, test on Y

Budgets are placed by average bits per weight between the uniform sizes (e.g. 3.5 = halfway
between uniform int3 and uniform int4 at the same group size); each is converted to MiB from the
model's own layer inventory. Calibration uses one speaker's calibration clips (unlabelled); WER is
measured on the test clips. Writes benchmarks/results/wer_vs_budget_<model>_<machine>.{md,json,png}
(or personalisation_<model>_<machine>.* with --matrix).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe_machine, machine_line, machine_slug  # noqa: E402
from torch_myqasr.allocation import bit_histogram, budget_for_bits, uniform_size_mb  # noqa: E402
from torch_myqasr.atomic import atomic_open, atomic_write_text  # noqa: E402
from torch_myqasr.audio import load_dataset_audio, open_dataset  # noqa: E402
from torch_myqasr.corpus import corpus_manifest  # noqa: E402
from torch_myqasr.evaluation.transcribe import evaluate  # noqa: E402
from torch_myqasr.evaluation.wer import wer_report_dict  # noqa: E402
from torch_myqasr.models import load_whisper  # noqa: E402
from torch_myqasr.pipeline import layer_inventory, quantize_whisper  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
UNIFORM_BITS = (8, 6, 5, 4, 3, 2)
# "myqasr-low": layers with the lowest score lose bits first; "myqasr-high": the highest first.
METHODS = {
    "uniform": {"strategy": "uniform"},
    "myqasr-low": {"strategy": "myqasr", "order": "low-score-first"},
    "myqasr-high": {"strategy": "myqasr", "order": "high-score-first"},
    "optimal": {"strategy": "optimal", "score": "cosine"},
}


def uniform_sizes_mib(scheme) -> dict[int, float]:
    """Whole-model size in MiB with every allocated layer at intB, for each B in UNIFORM_BITS."""
    return {b: uniform_size_mb(scheme, f"int{b}") for b in UNIFORM_BITS}


def clips_of(split: str, speaker: str):
    return [a for _, a in load_dataset_audio(open_dataset(corpus_manifest(split)).filter(speakers=[speaker]))]


def run_one(bundle, calib, test_data, budget: float, method: str, group_size: int, language: str | None) -> dict:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw = quantize_whisper(
            bundle, calib, budget_mb=budget, group_size=group_size, language=language, progress=False, **METHODS[method]
        )
    t_quant = time.perf_counter() - t0
    res = evaluate(bundle, test_data, decode=qw.decoder(), progress=False)
    return {
        "method": method,
        "budget_mib": budget,
        "size_mib": qw.scheme.size_mb,
        "formats": bit_histogram(qw.scheme),
        "wer": wer_report_dict(res.wer, model=f"{bundle.model_id}/{method}@{budget}"),
        "quantize_seconds": t_quant,
        "_scheme": qw.scheme,
    }


def sweep(args) -> dict:
    bundle = load_whisper(args.model)
    calib = clips_of("calib", args.calib_speaker)
    test = open_dataset(corpus_manifest("test")).filter(speakers=args.test_speakers)
    inventory = layer_inventory(bundle, calib[0], group_size=args.group_size)
    sizes = uniform_sizes_mib(inventory)
    out = {"machine": describe_machine(), "model": args.model, "calib_speaker": args.calib_speaker,
           "test_speakers": args.test_speakers, "group_size": args.group_size, "uniform_mib": sizes,
           "fp32_mib": inventory.size_mb, "runs": []}
    fp = evaluate(bundle, test, progress=False)
    out["fp32_wer"] = wer_report_dict(fp.wer, model=args.model)
    for bits in args.bits_per_weight:
        budget = budget_for_bits(inventory, bits)
        for method in args.methods:
            if method == "uniform" and bits != int(bits) and not args.uniform_between:
                continue  # uniform at a between-size budget is just the lower uniform size
            r = run_one(bundle, calib, test, budget, method, args.group_size, None)
            r["bits_per_weight_target"] = bits
            r.pop("_scheme")
            print(f"{bits:>4} bpw {budget:8.3f} MiB {method:12s} size {r['size_mib']:8.3f} "
                  f"WER {100 * r['wer']['overall']['wer']:6.1f}%  {r['formats']}  ({r['quantize_seconds']:.0f} s)", flush=True)
            out["runs"].append(r)
    return out


def sweep_markdown(res: dict, cmd: str) -> str:
    speakers = res["test_speakers"]
    lines = [
        f"# WER versus budget: Whisper {res['model']}, calibrated on '{res['calib_speaker']}' (unlabelled), group size {res['group_size']}",
        "",
        f"Machine: {machine_line()}  ",
        f"Command: `{cmd}`",
        "",
        "Uniform sizes (MiB, everything counted): " + ", ".join(f"int{b} {s:.2f}" for b, s in res["uniform_mib"].items())
        + f"; fp32 {res['fp32_mib']:.2f}.",
        "",
        "| bits/weight | budget MiB | method | size MiB | " + " | ".join(f"{s} WER %" for s in speakers) + " | overall WER % | formats |",
        "| ---: | ---: | --- | ---: | " + " | ".join("---:" for _ in speakers) + " | ---: | --- |",
    ]
    fpw = res["fp32_wer"]
    lines.append(f"| 32 | {res['fp32_mib']:.2f} | fp32 | {res['fp32_mib']:.2f} | "
                 + " | ".join(f"{100 * fpw['by_speaker'][s]['wer']:.1f}" for s in speakers)
                 + f" | {100 * fpw['overall']['wer']:.1f} | fp32 |")
    for r in res["runs"]:
        w = r["wer"]
        fm = ", ".join(f"{k}:{v}" for k, v in sorted(r["formats"].items()))
        lines.append(f"| {r['bits_per_weight_target']} | {r['budget_mib']:.3f} | {r['method']} | {r['size_mib']:.3f} | "
                     + " | ".join(f"{100 * w['by_speaker'][s]['wer']:.1f}" for s in speakers)
                     + f" | {100 * w['overall']['wer']:.1f} | {fm} |")
    return "\n".join(lines) + "\n"


def sweep_plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method in dict.fromkeys(r["method"] for r in res["runs"]):
        pts = sorted((r["size_mib"], 100 * r["wer"]["overall"]["wer"]) for r in res["runs"] if r["method"] == method)
        ax.plot([p[0] for p in pts], [min(p[1], 120) for p in pts], marker="o", label=method)
    ax.axhline(100 * res["fp32_wer"]["overall"]["wer"], color="grey", ls="--", label="fp32")
    ax.set_xlabel("model size, MiB (weights, scales and full-precision parts)")
    ax.set_ylabel("WER % (capped at 120)")
    ax.set_title(f"Whisper {res['model']}: WER vs budget (calibrated on {res['calib_speaker']})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def matrix(args) -> dict:
    """Schemes calibrated on each speaker in ``--calib-speakers``, each evaluated on every test speaker."""
    bundle = load_whisper(args.model)
    test = open_dataset(corpus_manifest("test")).filter(speakers=args.test_speakers)
    inventory = layer_inventory(bundle, clips_of("calib", args.calib_speakers[0])[0], group_size=args.group_size)
    budget = budget_for_bits(inventory, args.bits_per_weight[0])
    out = {"machine": describe_machine(), "model": args.model, "budget_mib": budget,
           "bits_per_weight": args.bits_per_weight[0], "method": args.methods[0], "rows": {}}
    for spk in args.calib_speakers:
        lang = next((u.language for u in open_dataset(corpus_manifest("calib")).filter(speakers=[spk])), None)
        r = run_one(bundle, clips_of("calib", spk), test, budget, args.methods[0], args.group_size,
                    lang if bundle.is_multilingual else None)
        r.pop("_scheme")
        out["rows"][spk] = r
        print(spk, {s: round(100 * v["wer"], 1) for s, v in r["wer"]["by_speaker"].items()}, flush=True)
    return out


def matrix_markdown(res: dict, cmd: str) -> str:
    cols = list(next(iter(res["rows"].values()))["wer"]["by_speaker"])
    lines = [
        f"# Personalisation matrix: Whisper {res['model']}, {res['method']} at {res['budget_mib']:.3f} MiB "
        f"({res['bits_per_weight']} bits/weight target)",
        "",
        f"Machine: {machine_line()}  ",
        f"Command: `{cmd}`",
        "",
        "Rows: the speaker whose unlabelled calibration clips chose the scheme. Columns: WER % on each "
        "speaker's test clips. The diagonal is the personalised case.",
        "",
        "| calibrated on | " + " | ".join(cols) + " |",
        "| --- | " + " | ".join("---:" for _ in cols) + " |",
    ]
    for spk, r in res["rows"].items():
        cells = []
        for c in cols:
            v = f"{100 * r['wer']['by_speaker'][c]['wer']:.1f}"
            cells.append(f"**{v}**" if c == spk else v)
        lines.append(f"| {spk} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--bits-per-weight", type=float, nargs="+", default=[3.5, 4.0, 4.5, 5.0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--calib-speaker", default="slt")
    p.add_argument("--test-speakers", nargs="+", default=["slt", "kal", "ked", "librivox"])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--uniform-between", action="store_true", help="also run uniform at between-size budgets")
    p.add_argument("--matrix", action="store_true", help="personalisation matrix instead of the sweep")
    p.add_argument("--calib-speakers", nargs="+", default=["slt", "kal", "librivox", "espeak-en-us-f"])
    args = p.parse_args()
    cmd = "python benchmarks/wer_vs_budget.py " + " ".join(sys.argv[1:])
    slug = f"{args.model.replace('/', '_').replace('.', '-')}_{machine_slug()}"
    if args.matrix:
        res = matrix(args)
        stem = RESULTS / f"personalisation_{slug}"
        md = matrix_markdown(res, cmd)
    else:
        res = sweep(args)
        stem = RESULTS / f"wer_vs_budget_{slug}"
        md = sweep_markdown(res, cmd)
        sweep_plot(res, stem.with_suffix(".png"))
    atomic_write_text(stem.with_suffix(".json"), json.dumps(res, indent=2, default=str) + "\n")
    atomic_write_text(stem.with_suffix(".md"), md)
    print(md)


if __name__ == "__main__":
    main()
