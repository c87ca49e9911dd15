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
    from torch_myqasr.audio import AudioError, DatasetError
    from torch_myqasr.models import CorruptModelError, ModelLoadError

    return (AudioError, DatasetError, ModelLoadError, CorruptModelError, FileNotFoundError, ValueError)


def _default_data() -> Path:
    from torch_myqasr.corpus import corpus_manifest

    return corpus_manifest("test")


def cmd_eval(args: argparse.Namespace) -> int:
    """Transcribe a labelled dataset and print WER overall and per speaker / gender / language."""
    from torch_myqasr.audio import open_dataset
    from torch_myqasr.evaluation.transcribe import evaluate
    from torch_myqasr.evaluation.wer import format_wer_table, wer_report_dict
    from torch_myqasr.models import load_whisper

    data = Path(args.data) if args.data else _default_data()
    dataset = open_dataset(data)
    if args.speaker:
        dataset = dataset.filter(speakers=args.speaker)
    bundle = load_whisper(args.model)
    if not bundle.is_multilingual:
        non_english = sorted({u.language for u in dataset if u.language not in (None, "en")})
        if non_english and not args.speaker:
            print(f"note: {bundle.model_id} is English-only; skipping {', '.join(non_english)} utterances", file=sys.stderr)
            dataset = dataset.filter(languages=["en", None])
    result = evaluate(bundle, dataset, language=args.language, batch_size=args.batch_size, progress=not args.quiet)
    print(f"model {bundle.model_id} on {data} ({len(result.records)} utterances)")
    print(format_wer_table(result.wer))
    if args.json:
        report = wer_report_dict(result.wer, model=bundle.model_id)
        report["data"] = str(data)
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def cmd_transcribe(args: argparse.Namespace) -> int:
    """Print the transcript of each audio file."""
    from torch_myqasr.audio import load_audio
    from torch_myqasr.evaluation.transcribe import transcribe
    from torch_myqasr.models import load_whisper

    audios = [load_audio(f) for f in args.files]
    bundle = load_whisper(args.model)
    texts = transcribe(bundle, audios, language=args.language, batch_size=args.batch_size, progress=False)
    for f, t in zip(args.files, texts):
        print(f"{f}\t{t}" if len(args.files) > 1 else t)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``myqasr`` command."""
    p = argparse.ArgumentParser(prog="myqasr", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def model_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", default="tiny.en", help="tiny.en (default), base, or a model folder")
        sp.add_argument("--language", default=None, help="language code for multilingual models (default: per utterance, else en)")
        sp.add_argument("--batch-size", type=int, default=8)

    e = sub.add_parser("eval", help="word error rate on a labelled dataset")
    model_arg(e)
    e.add_argument("--data", default=None, help="LibriSpeech tree, JSONL manifest or folder (default: the bundled corpus test split)")
    e.add_argument("--speaker", action="append", help="evaluate only this speaker (repeatable)")
    e.add_argument("--json", default=None, help="also write the WER report to this JSON file")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)

    t = sub.add_parser("transcribe", help="print transcripts of audio files")
    model_arg(t)
    t.add_argument("files", nargs="+", help="audio files (any format soundfile reads; resampled to 16 kHz mono)")
    t.set_defaults(func=cmd_transcribe)
    return p


def _quiet_library_chatter() -> None:
    """Keep the terminal for our own progress bars and tables: transformers' deprecation notes about
    its own Whisper generate and torch's pytree registration warnings are not the user's business."""
    import logging

    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    logging.getLogger("torchao").setLevel(logging.ERROR)
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
