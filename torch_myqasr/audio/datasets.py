"""Datasets of utterances: what is on disk, read into one shape the rest of the project uses.

Three layouts are read, and `open_dataset` tells them apart:

- a LibriSpeech tree (``speaker/chapter/<speaker>-<chapter>.trans.txt`` beside the audio),
- a JSONL manifest (one JSON object per line: audio path, text, speaker, ...),
- a plain folder of audio files (no transcripts: calibration clips of one user, for example).

Readers check everything they can before any audio is decoded (every transcript has its audio,
every audio file has its transcript, ids are unique), and name the file and line of the problem.
Decoding happens later, in `load_dataset_audio`, which can skip bad clips but never silently.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np

from torch_myqasr.audio.io import AUDIO_EXTENSIONS, DEFAULT_SAMPLE_RATE, AudioError, load_audio

UNKNOWN_SPEAKER = "unknown"
"""Speaker name of clips that sit directly in an audio folder's root."""

_MAX_LISTED = 10  # ids named in an error message before "and N more"


class DatasetError(ValueError):
    """A dataset that cannot be read as asked; the message names the file (and line) and the fix."""


class SkippedAudioWarning(UserWarning):
    """Emitted once by `load_dataset_audio(on_error="skip")` when some clips could not be used."""


@dataclass(frozen=True)
class Utterance:
    """One clip of a dataset.

    Attributes:
        id: unique within its dataset.
        audio_path: the audio file (absolute or relative to the working directory).
        text: the reference transcript, or None when the dataset has none.
        speaker: who speaks (folder name, manifest field, or `UNKNOWN_SPEAKER`).
        gender: as the dataset spells it ("female" / "male" for LibriSpeech), or None when unknown.
        language: language code such as "en", or None when unknown.
    """

    id: str
    audio_path: Path
    text: str | None
    speaker: str
    gender: str | None = None
    language: str | None = None


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


class Dataset(Sequence[Utterance]):
    """An ordered, immutable sequence of `Utterance` with a name.

    Args:
        utterances: the clips, in order; ids must be unique.
        name: a short name for reports (the folder or manifest name).
        source: where it was read from, for messages (optional).
    """

    def __init__(self, utterances: Iterable[Utterance], name: str, source: Path | None = None) -> None:
        self._utts: tuple[Utterance, ...] = tuple(utterances)
        self.name = name
        self.source = source
        seen: set[str] = set()
        dups = sorted({u.id for u in self._utts if u.id in seen or seen.add(u.id)})
        if dups:
            raise DatasetError(f"dataset {name!r} has duplicate utterance ids: {_listing(dups)}; ids must be unique")

    def __len__(self) -> int:
        return len(self._utts)

    @overload
    def __getitem__(self, i: int) -> Utterance: ...
    @overload
    def __getitem__(self, i: slice) -> Dataset: ...
    def __getitem__(self, i: int | slice) -> Utterance | Dataset:
        if isinstance(i, slice):
            return Dataset(self._utts[i], self.name, self.source)
        return self._utts[i]

    def __iter__(self) -> Iterator[Utterance]:
        return iter(self._utts)

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, {len(self)} utterances, {len(self.speakers())} speakers)"

    def speakers(self) -> list[str]:
        """Distinct speaker names, sorted."""
        return sorted({u.speaker for u in self._utts})

    def languages(self) -> list[str | None]:
        """Distinct language codes, sorted (None, for utterances without one, comes first)."""
        return sorted({u.language for u in self._utts}, key=lambda x: (x is not None, x or ""))

    @property
    def has_transcripts(self) -> bool:
        """True when the dataset is non-empty and every utterance has a reference text."""
        return bool(self._utts) and all(u.text is not None for u in self._utts)

    def filter(
        self,
        speakers: str | Iterable[str] | None = None,
        languages: str | Iterable[str | None] | None = None,
    ) -> Dataset:
        """The utterances of the given speakers and/or languages (None = no restriction).

        ``languages`` matches `Utterance.language` exactly: an utterance whose language is unknown
        (None) is kept only when the list itself contains None, e.g. ``languages=["en", None]``.

        Raises:
            DatasetError: a requested speaker is not in the dataset (the message lists those that
                are), or nothing is left after filtering.
        """
        utts = self._utts
        asked: list[str] = []
        if speakers is not None:
            wanted = {speakers} if isinstance(speakers, str) else set(speakers)
            unknown = sorted(wanted - set(self.speakers()))
            if unknown:
                raise DatasetError(
                    f"speaker(s) {_listing(unknown)} not in dataset {self.name!r}; "
                    f"its speakers are: {_listing(self.speakers())}"
                )
            utts = tuple(u for u in utts if u.speaker in wanted)
            asked.append(f"speakers {sorted(wanted)}")
        if languages is not None:
            langs = {languages} if isinstance(languages, str) else set(languages)
            utts = tuple(u for u in utts if u.language in langs)
            asked.append(f"languages {sorted(langs, key=str)}")
        if not utts:
            raise DatasetError(
                f"no utterances of dataset {self.name!r} match {' and '.join(asked) or 'anything (it is empty)'}; "
                f"its languages are {self.languages()}"
            )
        return Dataset(utts, self.name, self.source)


# ---------------------------------------------------------------------------------------------
# LibriSpeech


def _read_librispeech_genders(root: Path) -> dict[str, str]:
    """Speaker id -> "female"/"male" from LibriSpeech's SPEAKERS.TXT, if it is in root or its parent."""
    for cand in (root / "SPEAKERS.TXT", root.parent / "SPEAKERS.TXT"):
        if cand.is_file():
            genders = {}
            for line in cand.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.startswith(";") or "|" not in line:
                    continue
                fields = [f.strip() for f in line.split("|")]
                if len(fields) >= 2 and fields[1].upper() in ("F", "M"):
                    genders[fields[0]] = "female" if fields[1].upper() == "F" else "male"
            return genders
    return {}


def _audio_by_stem(folder: Path) -> dict[str, Path]:
    """Audio files directly in ``folder`` by stem; two files with one stem is an error."""
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS and not p.name.startswith("."):
            if p.stem in found:
                raise DatasetError(
                    f"two audio files for utterance {p.stem!r} in {folder}: {found[p.stem].name} and {p.name}; "
                    "keep one"
                )
            found[p.stem] = p
    return found


def read_librispeech(root: str | os.PathLike) -> Dataset:
    """Read a LibriSpeech-layout tree: ``<speaker>/<chapter>/<speaker>-<chapter>.trans.txt`` beside the audio.

    Each transcript line is ``<utterance id> <TEXT>``; the audio is ``<utterance id>.<ext>`` (flac,
    wav, ...) in the same folder. The speaker is the name of the folder above the chapter folder
    (or, for a transcript directly under ``root``, the utterance id up to its first "-"). Gender
    comes from a LibriSpeech ``SPEAKERS.TXT`` in ``root`` or its parent when there is one;
    language is "en".

    Raises:
        DatasetError: no transcript files; a transcript id without audio or an audio file without a
            transcript line (names the ids and the file); an audio file in a folder with no
            transcript file; duplicate ids; a malformed line.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"LibriSpeech root {root} is not a folder; pass the folder holding <speaker>/<chapter>/")
    trans_files = sorted(p for p in root.rglob("*.trans.txt") if not p.name.startswith("."))
    if not trans_files:
        raise DatasetError(f"no *.trans.txt transcript files under {root}; is it a LibriSpeech tree?")
    genders = _read_librispeech_genders(root)
    utts: list[Utterance] = []
    covered: set[Path] = set()
    for trans in trans_files:
        audio = _audio_by_stem(trans.parent)
        texts: dict[str, str] = {}
        for lineno, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            uid, _, text = line.strip().partition(" ")
            if uid in texts:
                raise DatasetError(f"{trans}:{lineno}: utterance id {uid!r} appears twice; remove one line")
            texts[uid] = text.strip()
        missing_audio = [u for u in texts if u not in audio]
        if missing_audio:
            raise DatasetError(
                f"{trans}: transcript ids with no audio file in {trans.parent}: {_listing(missing_audio)}; "
                f"add the audio (<id>.flac / .wav) or delete those lines"
            )
        # Only audio files that look like this chapter's utterances belong to this transcript; the
        # rest is reported below as audio with no transcript.
        untranscribed = [s for s in audio if s not in texts]
        if untranscribed:
            raise DatasetError(
                f"{trans}: audio files with no transcript line: {_listing(untranscribed)}; "
                f"add '<id> TEXT' lines for them or move them out of {trans.parent}"
            )
        nested = len(trans.parent.relative_to(root).parts) >= 2
        for uid, text in texts.items():
            speaker = trans.parent.parent.name if nested else uid.split("-")[0]
            utts.append(Utterance(uid, audio[uid], text, speaker, genders.get(speaker), "en"))
            covered.add(audio[uid])
    orphans = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file() and p not in covered and not p.name.startswith(".")
    )
    if orphans:
        raise DatasetError(
            f"audio files under {root} in folders with no *.trans.txt: {_listing(orphans)}; "
            "add a transcript file beside them or move them out of the tree"
        )
    return Dataset(utts, root.resolve().name, root)


# ---------------------------------------------------------------------------------------------
# JSONL manifest

_REQUIRED = ("audio", "text", "speaker")
_OPTIONAL = ("id", "gender", "language")


def read_manifest(path: str | os.PathLike) -> Dataset:
    """Read a JSONL manifest: one JSON object per line.

    Fields: ``audio`` (path, relative to the manifest's folder or absolute), ``text`` (the
    reference; null for unlabelled clips), ``speaker``; optional ``gender``, ``language`` and
    ``id`` (default: the audio file's stem). Blank lines are skipped; other fields are ignored.

    Raises:
        DatasetError: unreadable file, bad JSON, a missing or mistyped field, a missing audio file,
            a duplicate id, or no utterances; the message gives ``file:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"manifest {path} not found; pass a .jsonl file with one utterance per line")
    utts: list[Utterance] = []
    first_line: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); fix the line") from None
            if not isinstance(rec, dict):
                raise DatasetError(f"{where}: expected a JSON object {{\"audio\": ..., \"text\": ..., \"speaker\": ...}}")
            missing = [k for k in _REQUIRED if k not in rec]
            if missing:
                raise DatasetError(
                    f"{where}: missing field(s) {', '.join(missing)}; every line needs {', '.join(_REQUIRED)} "
                    "(text may be null for unlabelled clips)"
                )
            for key in ("audio", "speaker"):
                if not isinstance(rec[key], str) or not rec[key]:
                    raise DatasetError(f"{where}: field {key!r} must be a non-empty string, got {rec[key]!r}")
            for key in ("text",) + _OPTIONAL:
                if rec.get(key) is not None and not isinstance(rec[key], str):
                    raise DatasetError(f"{where}: field {key!r} must be a string or null, got {rec[key]!r}")
            audio = Path(rec["audio"])
            if not audio.is_absolute():
                audio = path.parent / audio
            if not audio.is_file():
                raise DatasetError(f"{where}: audio file {audio} not found; fix the path (relative to {path.parent})")
            uid = rec.get("id") or audio.stem
            if uid in first_line:
                raise DatasetError(
                    f"{where}: utterance id {uid!r} already used on line {first_line[uid]}; give each line a unique 'id'"
                )
            first_line[uid] = lineno
            utts.append(Utterance(uid, audio, rec["text"], rec["speaker"], rec.get("gender"), rec.get("language")))
    if not utts:
        raise DatasetError(f"manifest {path} has no utterances (looked for JSON lines with audio, text, speaker)")
    return Dataset(utts, path.stem, path)


# ---------------------------------------------------------------------------------------------
# Folder of audio


def _is_hidden(p: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(root).parts)


def read_audio_folder(root: str | os.PathLike) -> Dataset:
    """Every audio file under ``root`` (recursively, sorted), without transcripts (text None).

    The speaker is the name of the file's immediate parent folder, or `UNKNOWN_SPEAKER` for files
    directly in ``root``; the id is the path relative to ``root`` without its suffix. Hidden files
    and folders (names starting with ".") are ignored.

    Raises:
        DatasetError: ``root`` is not a folder, holds no audio, or two files share an id
            (e.g. ``a.wav`` and ``a.flac``).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"audio folder {root} not found or not a folder")
    files = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file() and not _is_hidden(p, root)
    )
    if not files:
        raise DatasetError(
            f"no audio files under {root} (looked for {', '.join(sorted(AUDIO_EXTENSIONS))}, recursively)"
        )
    utts: list[Utterance] = []
    by_id: dict[str, Path] = {}
    for p in files:
        rel = p.relative_to(root)
        uid = rel.with_suffix("").as_posix()
        if uid in by_id:
            raise DatasetError(f"{by_id[uid]} and {p} would share utterance id {uid!r}; rename or remove one")
        by_id[uid] = p
        speaker = rel.parent.name if len(rel.parts) > 1 else UNKNOWN_SPEAKER
        utts.append(Utterance(uid, p, None, speaker))
    return Dataset(utts, root.resolve().name, root)


# ---------------------------------------------------------------------------------------------
# Auto-detection and audio loading


def open_dataset(path: str | os.PathLike) -> Dataset:
    """Open a dataset, telling the layout from what is there.

    A ``.jsonl`` file is a manifest (`read_manifest`); a folder with a ``*.trans.txt`` anywhere
    under it is a LibriSpeech tree (`read_librispeech`); any other folder is a folder of audio
    (`read_audio_folder`, no transcripts).

    Raises:
        DatasetError: the path does not exist, is a file that is not ``.jsonl``, or holds no
            utterances (the message says what was looked for).
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(
            f"dataset path {path} does not exist; pass a .jsonl manifest, a LibriSpeech tree or a folder of audio"
        )
    if path.is_file():
        if path.suffix.lower() == ".jsonl":
            return read_manifest(path)
        raise DatasetError(
            f"{path} is a file but not a .jsonl manifest; pass a .jsonl manifest, a LibriSpeech tree or a folder "
            "of audio (for single clips use `myqasr transcribe`)"
        )
    if any(not p.name.startswith(".") for p in path.rglob("*.trans.txt")):
        return read_librispeech(path)
    return read_audio_folder(path)


def load_dataset_audio(
    dataset: Iterable[Utterance], sample_rate: int = DEFAULT_SAMPLE_RATE, on_error: str = "raise"
) -> Iterator[tuple[Utterance, np.ndarray]]:
    """Decode each utterance's audio, in order: yields ``(utterance, samples)``.

    Samples are float32 mono at ``sample_rate`` Hz (see `load_audio`).

    Args:
        dataset: utterances (a `Dataset` or any iterable of `Utterance`).
        sample_rate: output rate in Hz.
        on_error: "raise" stops at the first bad clip with an `AudioError` naming the utterance;
            "skip" leaves bad clips out and, when iteration ends (or the generator is closed),
            emits ONE `SkippedAudioWarning` saying how many were skipped, which, and why.

    Raises:
        ValueError: ``on_error`` is not "raise" or "skip" (raised at the call, not on iteration).
        AudioError: with on_error="raise", a clip that `load_audio` rejects.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    return _iter_audio(dataset, sample_rate, on_error == "skip")


def _iter_audio(dataset: Iterable[Utterance], sample_rate: int, skip: bool) -> Iterator[tuple[Utterance, np.ndarray]]:
    skipped: list[str] = []
    seen = 0
    try:
        for utt in dataset:
            seen += 1
            try:
                audio = load_audio(utt.audio_path, sample_rate)
            except AudioError as e:
                if not skip:
                    raise AudioError(f"utterance {utt.id!r}: {e}") from e
                skipped.append(f"{utt.id} ({e})")
                continue
            yield utt, audio
    finally:
        # In `finally` so a caller that stops early still hears about what was skipped so far.
        if skipped:
            warnings.warn(
                f"skipped {len(skipped)} of {seen} utterances whose audio could not be used: " + "; ".join(skipped),
                SkippedAudioWarning,
                stacklevel=2,
            )
