"""Time the PT2E quantizer on real Whisper: prepare, calibration (observer overhead) and convert.

    python benchmarks/bench_quantizer.py                       # tiny.en, 3 strategies, 20 MiB
    python benchmarks/bench_quantizer.py --model base --budget 40
    python benchmarks/bench_quantizer.py --wer                 # also greedy WER on the test clips

Setup (what the WER-versus-budget sweeps do): `export_whisper(model, max_cache_len=120)`, both
programs prepared with ONE `MyQASRQuantizer`, calibration = `greedy_decode` of the first 4 "slt"
calibration clips (60 new tokens at most), then `convert_pt2e` of the encoder (the decision over
both programs happens here) and of the decoder step.

Both wall and process CPU seconds are reported: on a shared machine the wall time of a step
depends on what else runs (each parallel op can wait for a scheduler time slice), the CPU time
much less. "float calib" is the same greedy decoding through the unprepared programs, so
"observer overhead" = calib - float calib is what the observers cost.

Writes benchmarks/results/quantizer_time_<machine>.md (one section per model, replaced on rerun).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import torch  # noqa: E402
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # noqa: E402

from benchmarks.machine import machine_line, machine_slug  # noqa: E402
from torch_myqasr.atomic import atomic_write_text  # noqa: E402
from torch_myqasr.audio import load_dataset_audio, open_dataset  # noqa: E402
from torch_myqasr.corpus import corpus_manifest  # noqa: E402
from torch_myqasr.export import decoding_options, export_whisper, greedy_decode  # noqa: E402
from torch_myqasr.models import load_whisper  # noqa: E402
from torch_myqasr.quantizer import MyQASRQuantizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MAX_CACHE_LEN = 120
MAX_NEW_TOKENS = 60


class Timer:
    """Wall and process-CPU seconds of a block (``with Timer() as t: ...; t.wall, t.cpu``)."""

    def __enter__(self) -> "Timer":
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._w
        self.cpu = time.process_time() - self._c


def _load(model: str, n_clips: int):
    bundle = load_whisper(model)
    calib = open_dataset(corpus_manifest("calib")).filter(speakers=["slt"])
    clips = [a for _, a in load_dataset_audio(calib)][:n_clips]
    feats = bundle.feature_extractor(clips, sampling_rate=16000, return_tensors="pt").input_features
    return bundle, feats


def _wer(bundle, enc, dec, opts) -> float:
    from torch_myqasr.evaluation.normalize import normalize_text
    from torch_myqasr.evaluation.wer import compute_wer

    test = open_dataset(corpus_manifest("test")).filter(speakers=["slt", "librivox"])  # English speakers
    pairs = list(load_dataset_audio(test))
    feats = bundle.feature_extractor([a for _, a in pairs], sampling_rate=16000, return_tensors="pt").input_features
    ids = greedy_decode(enc, dec, feats, opts, max_cache_len=MAX_CACHE_LEN)
    hyp = [normalize_text(bundle.tokenizer.decode(i, skip_special_tokens=True)) for i in ids]
    ref = [normalize_text(u.text) for u, _ in pairs]
    return compute_wer(ref, hyp).wer


def run(model: str, budget: float, strategies: list[str], n_clips: int, wer: bool, score: str) -> list[dict]:
    """One row per strategy: seconds of each step, the scheme size and (optionally) the WER."""
    bundle, feats = _load(model, n_clips)
    opts = decoding_options(bundle.model, max_new_tokens=MAX_NEW_TOKENS)
    ew = export_whisper(bundle.model, max_cache_len=MAX_CACHE_LEN)
    with Timer() as fc:
        greedy_decode(ew.encoder.module(), ew.decoder_step.module(), feats, opts, max_cache_len=MAX_CACHE_LEN)
    rows = []
    for strategy in strategies:
        q = MyQASRQuantizer(budget_mb=budget, strategy=strategy, score=score, model_id=model, progress=False)
        with Timer() as tp:
            enc = prepare_pt2e(ew.encoder.module(), q)
            dec = prepare_pt2e(ew.decoder_step.module(), q)
        with Timer() as tc:
            greedy_decode(enc, dec, feats, opts, max_cache_len=MAX_CACHE_LEN)
        with Timer() as t1:
            enc = convert_pt2e(enc)
        with Timer() as t2:
            dec = convert_pt2e(dec)
        row = {
            "strategy": strategy, "prepare": tp, "float_calib": fc, "calib": tc, "convert_enc": t1, "convert_dec": t2,
            "size_mb": q.scheme.size_mb, "load": os.getloadavg()[0],
        }
        if wer:
            row["wer"] = _wer(bundle, enc, dec, opts)
        rows.append(row)
        print(_row_line(row), flush=True)
    return rows


def _row_line(r: dict) -> str:
    def wc(t: Timer) -> str:
        return f"{t.wall:.1f} / {t.cpu:.1f}"

    conv_wall = r["convert_enc"].wall + r["convert_dec"].wall
    conv_cpu = r["convert_enc"].cpu + r["convert_dec"].cpu
    wer = f"{100 * r['wer']:.1f}" if "wer" in r else "-"
    return (f"| {r['strategy']} | {wc(r['prepare'])} | {wc(r['float_calib'])} | {wc(r['calib'])} | "
            f"{conv_wall:.1f} / {conv_cpu:.1f} | {wc(r['convert_enc'])} | {r['size_mb']:.3f} | {wer} | {r['load']:.1f} |")


def to_markdown(model: str, budget: float, n_clips: int, score: str, rows: list[dict], argv: list[str]) -> str:
    """The section of the results file for one model."""
    lines = [
        f"## {model}, budget {budget:g} MiB, score {score}, {n_clips} calibration clips",
        "",
        f"Machine: {machine_line()}",
        f"Command: `python benchmarks/bench_quantizer.py {' '.join(argv)}`",
        "",
        "Seconds as wall / process CPU. calib = greedy decoding through the prepared programs; float calib = the",
        "same through the unprepared ones (the model's own compute); convert = both programs (the first one",
        "decides the scheme: scores, allocation, clip-ratio search). load = 1-min load average after the run.",
        "",
        "| strategy | prepare | float calib | calib | convert (both) | convert (first) | size MiB | WER % | load |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [_row_line(r) for r in rows]
    return "\n".join(lines) + "\n"


def _write(section: str, model: str) -> Path:
    """Replace (or add) this model's section in the machine's results file."""
    path = RESULTS / f"quantizer_time_{machine_slug()}.md"
    header = "# PT2E quantizer time on real Whisper (benchmarks/bench_quantizer.py)\n\n"
    old = path.read_text() if path.exists() else header
    sections = re.split(r"(?m)^(?=## )", old)
    kept = [s for s in sections[1:] if not s.startswith(f"## {model},")]
    text = header + "\n".join(s.rstrip("\n") + "\n" for s in sorted(kept + [section]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny.en", help="tiny.en or base (a pinned name or a local folder)")
    p.add_argument("--budget", type=float, default=None, help="MiB; default 20 for tiny.en, 40 for base")
    p.add_argument("--strategies", default="myqasr,uniform,optimal")
    p.add_argument("--score", default="median")
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--wer", action="store_true", help="also greedy WER on the slt + librivox test clips")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args()
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    budget = args.budget if args.budget is not None else (20.0 if args.model == "tiny.en" else 40.0)
    rows = run(args.model, budget, args.strategies.split(","), args.clips, args.wer, args.score)
    section = to_markdown(args.model, budget, args.clips, args.score, rows, sys.argv[1:])
    print(section)
    if not args.no_write:
        print("wrote", _write(section, args.model))


if __name__ == "__main__":
    main()
