"""The ``myqasr`` command line: evaluate and transcribe (quantize joins with the quantizer).

Every command wraps the same library calls a Python user makes. Errors a user can fix (missing
files, bad audio, unknown models) print one ``error:`` line naming the problem and the fix, and
exit with status 2 (set MYQASR_DEBUG=1 for the traceback); anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from torch_myqasr.atomic import atomic_write_text


def _user_errors() -> tuple[type[BaseException], ...]:
    from torch_myqasr.artifact import ArtifactError
    from torch_myqasr.audio import AudioError, DatasetError
    from torch_myqasr.models import CorruptModelError, ModelLoadError

    return (AudioError, DatasetError, ModelLoadError, CorruptModelError, ArtifactError, FileNotFoundError, ValueError)


def _default_data() -> Path:
    from torch_myqasr.corpus import corpus_manifest

    return corpus_manifest("test")


def _load_recognizer(args: argparse.Namespace):
    """(bundle, decode) for a model name/folder, or for a folder written by ``myqasr quantize``.

    A folder with an artifact runs the artifact as deployed (CPU layout, bfloat16 matmuls; ``--exact``:
    the portable float32 numerics; ``--compile``: through torch.compile). A folder with only a scheme
    replays it on the base model (converted PT2E programs).
    """
    import torch

    from torch_myqasr.models import load_whisper
    from torch_myqasr.pipeline import artifact_dir, is_quantized_dir, load_deployed, load_quantized

    if artifact_dir(args.model) is not None:
        deployed = load_deployed(args.model, compute_dtype=None if args.exact else torch.bfloat16, compile=args.compile,
                                 aot_inductor=args.aot_inductor)
        return deployed.bundle, deployed.decoder()
    if is_quantized_dir(args.model):
        qw = load_quantized(args.model)
        return qw.bundle, qw.decoder()
    return load_whisper(args.model), None


def parse_budget(text: str) -> float:
    """A budget such as "20MB", "20MiB" or "20" in MiB (2**20 bytes: MB is read as MiB, as in the scheme)."""
    t = text.strip().lower().replace(" ", "")
    for suffix in ("mib", "mb", "m"):
        if t.endswith(suffix):
            t = t[: -len(suffix)]
            break
    try:
        value = float(t)
    except ValueError:
        raise ValueError(f"cannot read budget {text!r}: give MiB like 20MB, 20MiB or 20") from None
    if value <= 0:
        raise ValueError(f"budget must be positive, got {text!r}")
    return value


def _formats_arg(text: str) -> tuple[str, ...]:
    """"8,4" -> ("int8", "int4"): candidate integer formats, most bits first."""
    try:
        bits = {int(b) for b in text.split(",") if b.strip()}
    except ValueError:
        raise ValueError(f"cannot read --bits {text!r}: give integer bit-widths like 8,4") from None
    return tuple(f"int{b}" for b in sorted(bits, reverse=True))


def cmd_eval(args: argparse.Namespace) -> int:
    """Transcribe a labelled dataset and print WER overall and per speaker / gender / language."""
    from torch_myqasr.audio import open_dataset
    from torch_myqasr.evaluation.transcribe import evaluate
    from torch_myqasr.evaluation.wer import format_wer_table, wer_report_dict

    data = Path(args.data) if args.data else _default_data()
    dataset = open_dataset(data)
    if args.speaker:
        dataset = dataset.filter(speakers=args.speaker)
    bundle, decode = _load_recognizer(args)
    if not bundle.is_multilingual:
        non_english = sorted({u.language for u in dataset if u.language not in (None, "en")})
        if non_english and not args.speaker:
            print(f"note: {bundle.model_id} is English-only; skipping {', '.join(non_english)} utterances", file=sys.stderr)
            dataset = dataset.filter(languages=["en", None])
    result = evaluate(
        bundle, dataset, language=args.language, batch_size=args.batch_size, decode=decode, progress=not args.quiet
    )
    print(f"model {bundle.model_id} on {data} ({len(result.records)} utterances)")
    print(format_wer_table(result.wer))
    if args.json:
        report = wer_report_dict(result.wer, model=args.model)
        report["data"] = str(data)
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def cmd_transcribe(args: argparse.Namespace) -> int:
    """Print the transcript of each audio file."""
    from torch_myqasr.audio import load_audio
    from torch_myqasr.evaluation.transcribe import transcribe

    audios = [load_audio(f) for f in args.files]
    bundle, decode = _load_recognizer(args)
    texts = transcribe(bundle, audios, language=args.language, batch_size=args.batch_size, decode=decode, progress=False)
    for f, t in zip(args.files, texts):
        print(f"{f}\t{t}" if len(args.files) > 1 else t)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """Calibrate on unlabelled clips, pick per-layer bits under the budget, quantize, save scheme and artifact."""
    from torch_myqasr.allocation import format_scheme_summary, plot_scheme
    from torch_myqasr.audio import load_dataset_audio, open_dataset
    from torch_myqasr.models import load_whisper
    from torch_myqasr.pipeline import quantize_whisper, save_lowered_artifact, save_quantized

    budget = parse_budget(args.budget)
    formats = _formats_arg(args.bits)
    dataset = open_dataset(args.calib)
    if args.speaker:
        dataset = dataset.filter(speakers=args.speaker)
    clips = [audio for _, audio in load_dataset_audio(dataset)]  # transcripts, if any, are never read
    bundle = load_whisper(args.model)
    qw = quantize_whisper(
        bundle,
        clips,
        budget_mb=budget,
        strategy=args.strategy,
        formats=formats,
        group_size=args.group_size,
        score=args.score,
        language=args.language,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    path = save_quantized(qw, args.out)
    plot_scheme(qw.scheme, Path(args.out) / "scheme.png")
    print(format_scheme_summary(qw.scheme))
    if not args.no_artifact:
        print(f"wrote the lowered, deployable artifact {save_lowered_artifact(qw, args.out, aot_inductor=args.aot_inductor)}")
    print(f"calibrated on {len(clips)} clips ({qw.scheme.calibration['seconds']:.1f} s) of {dataset.name}")
    print(f"wrote {path} and {Path(args.out) / 'scheme.png'}")
    return 0


def cmd_personalize(args: argparse.Namespace) -> int:
    """The main job: personalise to one bundled speaker, compare fp32 / uniform / personalised."""
    from torch_myqasr.pipeline.job import run_job

    budget = parse_budget(args.budget) if args.budget else None
    formats = _formats_arg(args.bits)
    run_job(args.model, speaker=args.speaker, test_speakers=args.test_speakers, budget_mb=budget,
            strategy=args.strategy, formats=formats, compile=not args.no_compile, out_dir=args.out, progress=not args.quiet)
    print((Path(args.out) / "report.md").read_text())
    print(f"wrote {args.out}/report.md, report.json, report.png and the artifacts in {args.out}/uniform and {args.out}/personalised")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``myqasr`` command."""
    p = argparse.ArgumentParser(prog="myqasr", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def model_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", default="tiny.en", help="tiny.en (default), base, or a model folder")
        sp.add_argument("--language", default=None, help="language code for multilingual models (default: per utterance, else en)")
        sp.add_argument("--batch-size", type=int, default=8)

    def deploy_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--exact", action="store_true",
                        help="artifact folders: portable float32 numerics (the converted model's; slow on CPU) instead of bf16 CPU kernels")
        sp.add_argument("--compile", action="store_true", help="artifact folders: run through torch.compile (warm-up of tens of seconds)")
        sp.add_argument("--aot-inductor", action="store_true",
                        help="artifact folders: run the AOTInductor packages written by quantize --aot-inductor (no warm-up)")

    e = sub.add_parser("eval", help="word error rate on a labelled dataset")
    model_arg(e)
    e.add_argument("--data", default=None, help="LibriSpeech tree, JSONL manifest or folder (default: the bundled corpus test split)")
    e.add_argument("--speaker", action="append", help="evaluate only this speaker (repeatable)")
    e.add_argument("--json", default=None, help="also write the WER report to this JSON file")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    deploy_args(e)
    e.set_defaults(func=cmd_eval)

    q = sub.add_parser("quantize", help="personalised mixed-precision quantization under a memory budget")
    q.add_argument("--model", default="tiny.en", help="tiny.en (default), base, or a model folder")
    q.add_argument("--calib", required=True, help="the user's clips: audio folder, JSONL manifest or LibriSpeech tree (transcripts are ignored)")
    q.add_argument("--speaker", action="append", help="calibrate on this speaker of --calib only (repeatable)")
    q.add_argument("--budget", required=True, help="memory for all weights in MiB, e.g. 20MB (MB is read as MiB = 2**20 bytes)")
    q.add_argument("--strategy", default="myqasr", choices=["myqasr", "optimal", "uniform"])
    q.add_argument("--bits", default="8,6,5,4,3,2", help="candidate integer bit-widths (default 8,6,5,4,3,2)")
    q.add_argument("--group-size", type=int, default=64, help="weights per scale along the input dimension")
    q.add_argument("--score", default="median", help="sensitivity score: median (paper), max, mean, std, cosine, kl")
    q.add_argument("--language", default=None, help="language of the clips for multilingual models (default en)")
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--out", required=True, help="folder for scheme.json (and the quantized model)")
    q.add_argument("--no-artifact", action="store_true", help="write only the scheme, not the lowered deployable OUT/artifact (docs/artifact.md)")
    q.add_argument("--aot-inductor", action="store_true",
                   help="also compile AOTInductor packages of the CPU layout into the artifact (minutes; this CPU architecture only)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_quantize)

    from torch_myqasr.pipeline.job import DEFAULT_JOB_FORMATS, DEFAULT_JOB_SPEAKER, DEFAULT_JOB_TEST_SPEAKERS

    j = sub.add_parser("personalize", help="the main job on the bundled corpus: personalise, quantize, compare")
    j.add_argument("--model", default="tiny.en", help="tiny.en (default), base, or a model folder")
    j.add_argument("--speaker", default=DEFAULT_JOB_SPEAKER, help="bundled speaker whose unlabelled clips calibrate")
    j.add_argument("--test-speakers", nargs="+", default=list(DEFAULT_JOB_TEST_SPEAKERS))
    j.add_argument("--budget", default=None, help="MiB (default: halfway between uniform int4 and int8)")
    j.add_argument("--strategy", default="myqasr", choices=["myqasr", "optimal", "uniform"])
    j.add_argument("--bits", default=",".join(f[3:] for f in DEFAULT_JOB_FORMATS),
                   help="candidate bit-widths (default 8,4: the CPU layout holds these at their scheme size)")
    j.add_argument("--no-compile", action="store_true", help="run the deployed models eagerly (skips torch.compile's warm-up)")
    j.add_argument("--out", default="myqasr-out", help="folder for report.md/.json/.png and the scheme")
    j.add_argument("--quiet", action="store_true", help="no progress bars")
    j.set_defaults(func=cmd_personalize)

    t = sub.add_parser("transcribe", help="print transcripts of audio files")
    model_arg(t)
    t.add_argument("files", nargs="+", help="audio files (any format soundfile reads; resampled to 16 kHz mono)")
    deploy_args(t)
    t.set_defaults(func=cmd_transcribe)
    return p


def _quiet_library_chatter() -> None:
    """Keep the terminal for our own progress bars and tables: transformers' deprecation notes about
    its own Whisper generate, and torch's pytree notes when transformers imports torchao later, are
    not the user's business."""
    import logging

    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``myqasr`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    _quiet_library_chatter()
    try:
        return args.func(args)
    except _user_errors() as err:
        if os.environ.get("MYQASR_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
