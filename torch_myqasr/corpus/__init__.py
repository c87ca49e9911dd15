"""The speech corpus shipped with torch_myqasr: where its files are.

Layout (built by ``scripts/build_corpus.py``; README.md in this folder lists the speakers):
``calib.jsonl`` and ``test.jsonl`` hold one clip a line, ``{"id", "audio", "text", "speaker",
"gender", "language", "source"}``, where ``audio`` is a path relative to the manifest's folder
pointing at a 16 kHz mono FLAC file under ``audio/<speaker>/``.
"""

from __future__ import annotations

from pathlib import Path

SPLITS = ("calib", "test")
"""Manifest names: "calib" holds the unlabelled-calibration clips, "test" the clips to score WER on."""


def corpus_dir() -> Path:
    """The folder holding the corpus manifests and audio (absolute path)."""
    return Path(__file__).resolve().parent


def corpus_manifest(split: str = "test") -> Path:
    """Path of the JSONL manifest for ``split`` ("calib" or "test").

    Raises:
        ValueError: ``split`` is not one of ``SPLITS``.
        FileNotFoundError: the manifest is missing (rebuild with ``python scripts/build_corpus.py``).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; use one of {SPLITS}")
    path = corpus_dir() / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"corpus manifest {path} is missing; rebuild it with `python scripts/build_corpus.py`"
        )
    return path
