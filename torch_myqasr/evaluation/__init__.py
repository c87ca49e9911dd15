"""Evaluation: transcript normalisation, corpus-level WER per speaker / gender / language, reports.

- `normalize_text` (`normalize.py`): Whisper's English normaliser for English, the basic one otherwise.
- `compute_wer`, `aggregate_wer`, `wer_report_dict`, `format_wer_table` (`wer.py`).
- Transcription of datasets lives in `torch_myqasr.evaluation.transcribe` (imported on demand: it
  needs torch and transformers, which the WER code does not).
"""

from torch_myqasr.evaluation.normalize import is_english, normalize_text
from torch_myqasr.evaluation.wer import (
    UNKNOWN,
    WerResult,
    aggregate_wer,
    compute_wer,
    format_wer_table,
    wer_report_dict,
)

__all__ = [
    "UNKNOWN",
    "WerResult",
    "aggregate_wer",
    "compute_wer",
    "format_wer_table",
    "is_english",
    "normalize_text",
    "wer_report_dict",
]
