#!/usr/bin/env python3
"""Rebuild the speech corpus in torch_myqasr/corpus/ from Debian packages, deterministically.

The corpus gives every experiment the same small set of distinct voices: three Festival voices
(one female HTS voice, two male diphone voices), a "hard" set of robotic espeak-ng English voices,
espeak-ng voices in Spanish, French and German for the multilingual model, and real read speech
from LibriVox (pocketsphinx-testdata). Each speaker has calibration clips (the unlabelled clips a
user would give myQASR) and test clips with different sentences (to measure WER).

Needs (Debian 12):
    apt-get install festival festvox-us-slt-hts festvox-kallpc16k festvox-kdlpc16k \
        espeak-ng sox pocketsphinx-testdata

Run from anywhere:
    python scripts/build_corpus.py            # writes torch_myqasr/corpus/
    python scripts/build_corpus.py --check    # rebuilds in a temp folder, fails if anything differs

Outputs (relative to torch_myqasr/corpus/): audio/<speaker>/<id>.flac (16 kHz mono 16-bit FLAC),
calib.jsonl, test.jsonl, SHA256SUMS, README.md, LICENSE-pocketsphinx-testdata. The same package
versions give byte-identical files (sox runs without dither, FLAC carries no timestamp).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

REPO = Path(__file__).resolve().parent.parent
SENTENCES_DIR = REPO / "scripts" / "sentences"
CORPUS_DIR = REPO / "torch_myqasr" / "corpus"

SAMPLE_RATE = 16000
"""Sample rate of every clip in the corpus, in Hz (what Whisper's feature extractor expects)."""

MIN_SECONDS, MAX_SECONDS = 1.0, 20.0
"""Allowed clip length in seconds; Whisper's window is 30 s, and under 1 s there is little speech."""

ESPEAK_WORDS_PER_MINUTE = 150
"""espeak-ng speaking rate (its default is 175): a little slower is easier for Whisper."""

LIBRIVOX_DIR = Path("/usr/share/pocketsphinx/test/data/librivox")
POCKETSPHINX_COPYRIGHT = Path("/usr/share/doc/pocketsphinx-testdata/copyright")
FESTIVAL_VOICE_DIRS = Path("/usr/share/festival/voices")

# Debian package that provides each external thing, for error messages that say how to fix them.
PACKAGE_OF = {
    "text2wave": "festival",
    "espeak-ng": "espeak-ng",
    "sox": "sox",
    "cmu_us_slt_arctic_hts": "festvox-us-slt-hts",
    "kal_diphone": "festvox-kallpc16k",
    "ked_diphone": "festvox-kdlpc16k",
    "librivox": "pocketsphinx-testdata",
}

# Cardinal number words in English. Whisper writes numbers as digits and its English normaliser
# rewrites number words to digits differently, so a sentence with them would score spurious errors.
ENGLISH_NUMBER_WORDS = frozenset(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty "
    "ninety hundred thousand million billion dozen".split()
)


@dataclass(frozen=True)
class Speaker:
    """One voice in the corpus.

    Attributes:
        id: short stable speaker id (folder name under audio/ and the manifests' "speaker").
        gender: "female" or "male".
        language: "en", "es", "fr" or "de".
        source: "festival-hts", "festival-diphone", "espeak-ng" or "librivox".
        voice: the Festival voice name, the espeak-ng voice (+variant), or "" for librivox.
        n_calib: calibration clips (taken from the start of the language's calib sentence list).
        n_test: test clips (from the start of the language's test sentence list).
        note: one line for the README.
    """

    id: str
    gender: str
    language: str
    source: str
    voice: str
    n_calib: int
    n_test: int
    note: str


SPEAKERS: tuple[Speaker, ...] = (
    Speaker("slt", "female", "en", "festival-hts", "cmu_us_slt_arctic_hts", 8, 8,
            "CMU ARCTIC slt, HTS statistical voice: the most natural synthetic voice here"),
    Speaker("kal", "male", "en", "festival-diphone", "kal_diphone", 8, 8,
            "CMU kal, diphone concatenation, US English"),
    Speaker("ked", "male", "en", "festival-diphone", "ked_diphone", 8, 8,
            "CSTR ked, diphone concatenation, US English"),
    # The hard set: robotic formant synthesis. Whisper often loops on it (cap new tokens), so it
    # is capped at 4 + 4 clips per voice to keep evaluation time bounded.
    Speaker("espeak-en-us-f", "female", "en", "espeak-ng", "en-us+f3", 4, 4,
            "espeak-ng US English, female variant f3 (hard set)"),
    Speaker("espeak-en-gb-m", "male", "en", "espeak-ng", "en-gb+m3", 4, 4,
            "espeak-ng British English, male variant m3 (hard set)"),
    Speaker("espeak-en-sc-f", "female", "en", "espeak-ng", "en-gb-scotland+f4", 4, 4,
            "espeak-ng Scottish English, female variant f4 (hard set)"),
    # Other languages, for the multilingual model (calibrating on a language is part of myQASR).
    Speaker("espeak-es", "male", "es", "espeak-ng", "es+m3", 3, 3, "espeak-ng Spanish, male variant m3"),
    Speaker("espeak-fr", "female", "fr", "espeak-ng", "fr+f3", 3, 3, "espeak-ng French, female variant f3"),
    Speaker("espeak-de", "male", "de", "espeak-ng", "de+m3", 3, 3, "espeak-ng German, male variant m3"),
    # Real read speech. All five utterances are one reader of Sense and Sensibility chapter 1
    # (LibriVox); the gender is judged from the median pitch, about 100 Hz in every clip.
    Speaker("librivox", "male", "en", "librivox", "", 2, 3,
            "real read speech: one LibriVox reader of Sense and Sensibility ch. 1 (pocketsphinx-testdata); "
            "gender from a pitch estimate (median F0 about 100 Hz in every clip), not from a label"),
)

# Which LibriVox utterances calibrate and which test: the two short ones calibrate, so the test
# split keeps the most words. Keys are the utterance ids in pocketsphinx's transcription file.
LIBRIVOX_SPLIT = {
    "calib": ("sense_and_sensibility_01_austen_64kb-0880", "sense_and_sensibility_01_austen_64kb-0930"),
    "test": (
        "sense_and_sensibility_01_austen_64kb-0870",
        "sense_and_sensibility_01_austen_64kb-0890",
        "sense_and_sensibility_01_austen_64kb-0920",
    ),
}

SPLITS = ("calib", "test")


class CorpusBuildError(RuntimeError):
    """A tool, package or input the build needs is missing or wrong; the message says the fix."""


def _missing_package(thing: str) -> CorpusBuildError:
    return CorpusBuildError(
        f"{thing} not found: install it with `apt-get install {PACKAGE_OF.get(thing, thing)}` "
        "(see the docstring of scripts/build_corpus.py for the full list)"
    )


def read_sentences(language: str, split: str) -> list[str]:
    """Read scripts/sentences/<language>_<split>.txt: one sentence a line, '#' lines are comments.

    Raises CorpusBuildError for digits, English number words, or a repeated sentence.
    """
    path = SENTENCES_DIR / f"{language}_{split}.txt"
    if not path.is_file():
        raise CorpusBuildError(f"sentence list {path} is missing; add one sentence per line")
    sentences = [
        line.strip()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    for s in sentences:
        check_text(s, language, where=str(path))
    if len(set(sentences)) != len(sentences):
        raise CorpusBuildError(f"{path} repeats a sentence; every sentence must be distinct")
    return sentences


def check_text(text: str, language: str, where: str) -> None:
    """Reject texts that would make WER measure number formatting rather than recognition."""
    if re.search(r"\d", text):
        raise CorpusBuildError(f"{where}: {text!r} contains a digit; spell it out or pick another sentence")
    if language == "en":
        numbers = ENGLISH_NUMBER_WORDS.intersection(re.findall(r"[a-z]+", text.lower()))
        if numbers:
            raise CorpusBuildError(
                f"{where}: {text!r} contains number words {sorted(numbers)}; Whisper writes digits "
                "for them, so pick a sentence without numbers"
            )


def read_librivox_transcripts() -> dict[str, str]:
    """Utterance id -> transcript, from pocketsphinx's `<s> words </s> (id)` transcription file."""
    path = LIBRIVOX_DIR / "transcription"
    if not path.is_file():
        raise _missing_package("librivox")
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.fullmatch(r"\s*<s>\s*(.*?)\s*</s>\s*\((\S+)\)\s*", line)
        if m:
            out[m.group(2)] = m.group(1)
    return out


def _run(cmd: list[str], stdin_text: str | None = None) -> None:
    """Run a command; on failure raise with its stderr so the cause is visible."""
    env = dict(os.environ, LC_ALL="C.UTF-8")
    proc = subprocess.run(cmd, input=stdin_text, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise CorpusBuildError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.strip()}")


def check_tools() -> None:
    """Fail early, naming the Debian package, if a program or voice the build uses is absent."""
    for tool in ("text2wave", "espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise _missing_package(tool)
    for speaker in SPEAKERS:
        if speaker.source.startswith("festival") and not any(FESTIVAL_VOICE_DIRS.glob(f"*/{speaker.voice}")):
            raise _missing_package(speaker.voice)
    if not LIBRIVOX_DIR.is_dir() or not POCKETSPHINX_COPYRIGHT.is_file():
        raise _missing_package("librivox")


def synthesize(speaker: Speaker, text: str, wav_path: Path) -> None:
    """Speak `text` with the speaker's synthesiser into a WAV file at the engine's native rate."""
    if speaker.source.startswith("festival"):
        txt = wav_path.with_suffix(".txt")
        txt.write_text(text + "\n", encoding="utf-8")
        _run(["text2wave", "-eval", f"(voice_{speaker.voice})", "-o", str(wav_path), str(txt)])
    elif speaker.source == "espeak-ng":
        # -b 1: the text is UTF-8 (accents in es/fr/de).
        _run(["espeak-ng", "-v", speaker.voice, "-s", str(ESPEAK_WORDS_PER_MINUTE), "-b", "1",
              "-w", str(wav_path), text])
    else:
        raise CorpusBuildError(f"speaker {speaker.id}: source {speaker.source!r} is not a synthesiser")
    if not wav_path.is_file() or wav_path.stat().st_size <= 44:
        raise CorpusBuildError(f"speaker {speaker.id}: the synthesiser wrote no audio for {text!r}")


def to_flac(src: Path, dst: Path, normalize: bool) -> float:
    """Convert `src` to 16 kHz mono 16-bit FLAC at `dst`; return its length in seconds.

    `normalize` scales the peak to -1 dBFS (for synthetic voices, whose levels differ a lot); real
    recordings keep their level. -D (no dither) and an empty comment make the bytes repeatable.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    effects = ["rate", "-v", str(SAMPLE_RATE)] + (["gain", "-n", "-1"] if normalize else [])
    _run(["sox", "-D", "-R", "-V1", str(src), "-b", "16", "-c", "1", "-C", "8", "--comment", "",
          str(dst), *effects])
    info = sf.info(str(dst))
    seconds = info.frames / info.samplerate
    if info.samplerate != SAMPLE_RATE or info.channels != 1:
        raise CorpusBuildError(f"{dst}: sox wrote {info.samplerate} Hz x {info.channels} channels")
    if not MIN_SECONDS <= seconds <= MAX_SECONDS:
        raise CorpusBuildError(
            f"{dst}: {seconds:.2f} s is outside {MIN_SECONDS}-{MAX_SECONDS} s; use a shorter or longer sentence"
        )
    return seconds


def build(out_dir: Path) -> None:
    """Build the whole corpus into `out_dir` (which must be empty or absent)."""
    check_tools()
    out_dir.mkdir(parents=True, exist_ok=True)
    manifests: dict[str, list[dict]] = {split: [] for split in SPLITS}
    seconds_of: dict[tuple[str, str], float] = {}
    librivox_text = read_librivox_transcripts()

    with tempfile.TemporaryDirectory(prefix="myqasr-corpus-") as tmp:
        for speaker in SPEAKERS:
            for split in SPLITS:
                n = speaker.n_calib if split == "calib" else speaker.n_test
                if speaker.source == "librivox":
                    utts = LIBRIVOX_SPLIT[split]
                    items = [(f"librivox-{u.rsplit('-', 1)[1]}", librivox_text[u], LIBRIVOX_DIR / f"{u}.wav")
                             for u in utts]
                else:
                    sentences = read_sentences(speaker.language, split)
                    if len(sentences) < n:
                        raise CorpusBuildError(
                            f"speaker {speaker.id} needs {n} {split} sentences in {speaker.language}; "
                            f"scripts/sentences/{speaker.language}_{split}.txt has {len(sentences)}"
                        )
                    items = [(f"{speaker.id}-{split}-{i + 1:02d}", s, None) for i, s in enumerate(sentences[:n])]
                if len(items) != n:
                    raise CorpusBuildError(f"speaker {speaker.id}: expected {n} {split} clips, found {len(items)}")
                for clip_id, text, source_wav in items:
                    check_text(text, speaker.language, where=f"clip {clip_id}")
                    if source_wav is None:
                        source_wav = Path(tmp) / f"{clip_id}.wav"
                        synthesize(speaker, text, source_wav)
                    elif not source_wav.is_file():
                        raise _missing_package("librivox")
                    rel = f"audio/{speaker.id}/{clip_id}.flac"
                    seconds = to_flac(source_wav, out_dir / rel, normalize=speaker.source != "librivox")
                    seconds_of[(speaker.id, split)] = seconds_of.get((speaker.id, split), 0.0) + seconds
                    manifests[split].append({
                        "id": clip_id, "audio": rel, "text": text, "speaker": speaker.id,
                        "gender": speaker.gender, "language": speaker.language, "source": speaker.source,
                    })
                    print(f"{rel}  {seconds:5.2f} s  {text}", flush=True)

    for split, rows in manifests.items():
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (out_dir / f"{split}.jsonl").write_text(lines, encoding="utf-8")
    sums = "".join(
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(out_dir).as_posix()}\n"
        for p in sorted(out_dir.glob("audio/*/*.flac"))
    )
    (out_dir / "SHA256SUMS").write_text(sums, encoding="utf-8")
    shutil.copyfile(POCKETSPHINX_COPYRIGHT, out_dir / "LICENSE-pocketsphinx-testdata")
    (out_dir / "README.md").write_text(render_readme(seconds_of), encoding="utf-8")


def _package_version(package: str) -> str:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def render_readme(seconds_of: dict[tuple[str, str], float]) -> str:
    """The corpus README: speakers table (clip counts, seconds), sources, licences, how to rebuild."""
    rows = "\n".join(
        f"| `{s.id}` | {s.gender} | {s.language} | {s.source} | {('`' + s.voice + '`') if s.voice else '-'} "
        f"| {s.n_calib} | {s.n_test} | {seconds_of[(s.id, 'calib')]:.1f} / {seconds_of[(s.id, 'test')]:.1f} "
        f"| {s.note} |"
        for s in SPEAKERS
    )
    packages = ("festival", "festvox-us-slt-hts", "festvox-kallpc16k", "festvox-kdlpc16k", "espeak-ng",
                "sox", "libflac12", "pocketsphinx-testdata")
    versions = "\n".join(f"- `{p}` {_package_version(p)}" for p in packages)
    return f"""# Speech corpus

Small, fixed speech clips for calibrating (myQASR's unlabelled user clips) and testing (WER per
speaker). Generated by `scripts/build_corpus.py`; do not edit by hand. `docs/corpus.md` says why
it looks like this.

- `calib.jsonl`, `test.jsonl`: one clip a line, `{{"id", "audio", "text", "speaker", "gender",
  "language", "source"}}`; `audio` is relative to the manifest. No sentence is in both splits.
- `audio/<speaker>/<id>.flac`: 16 kHz, mono, 16-bit FLAC. Synthetic clips are peak-normalised
  to -1 dBFS; LibriVox clips keep their recorded level.
- `SHA256SUMS`: checksums of the audio (`sha256sum -c SHA256SUMS` in this folder).
- From Python: `torch_myqasr.corpus.corpus_manifest("calib" | "test")`.

## Speakers

| speaker | gender | language | source | voice | calib clips | test clips | seconds (calib / test) | notes |
|---|---|---|---|---|---|---|---|---|
{rows}

English synthetic speakers read the same sentences (Harvard sentences, public domain;
`scripts/sentences/en_*.txt`), so WER differences between them come from the voice, not the
text. Spanish, French and German sentences were written for this project and say the same thing
in each language. No text contains digits or English number words: Whisper writes numbers as
digits, which would count as errors. The LibriVox transcripts are pocketsphinx's, verbatim
(lower case, no punctuation; compare through Whisper's normaliser). The "cards" utterances of
pocketsphinx-testdata were left out: they are card names made of number words.

## Sources and licences

- Festival voices (synthetic audio generated here): `cmu_us_slt_arctic_hts` (Carnegie Mellon
  University, EST-2003 licence: free use and redistribution), `kal_diphone` (Alan W Black and
  Kevin Lenzo) and `ked_diphone` (CSTR, University of Edinburgh), both under the festvox licence
  (free use and redistribution with notice). See `/usr/share/doc/festvox-*/copyright`.
- espeak-ng (GPL-3.0 program; the audio it outputs is ours, generated from our sentences).
- LibriVox recordings are public domain; the clips, their transcripts and their packaging come
  from Debian `pocketsphinx-testdata` (CMU, BSD-2-Clause): see `LICENSE-pocketsphinx-testdata`.
- English sentences: Harvard sentences (IEEE, 1969), public domain.

## Rebuild

```
apt-get install festival festvox-us-slt-hts festvox-kallpc16k festvox-kdlpc16k espeak-ng sox pocketsphinx-testdata
python scripts/build_corpus.py          # rewrite this folder
python scripts/build_corpus.py --check  # rebuild elsewhere; fail if any file differs
```

The same package versions give byte-identical files. Built with (Debian 12):

{versions}
"""


GENERATED = ("audio", "calib.jsonl", "test.jsonl", "SHA256SUMS", "README.md", "LICENSE-pocketsphinx-testdata")
"""What the build writes in torch_myqasr/corpus/; everything else there (__init__.py) is left alone."""


def install(staged: Path, corpus_dir: Path) -> None:
    """Replace the generated files of `corpus_dir` with those in `staged`."""
    for name in GENERATED:
        target = corpus_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        shutil.move(str(staged / name), str(target))


def differences(a: Path, b: Path) -> list[str]:
    """Relative paths of generated files that differ between two corpus folders (or exist in one)."""

    def files(root: Path) -> dict[str, bytes]:
        out = {}
        for name in GENERATED:
            p = root / name
            paths = sorted(p.rglob("*")) if p.is_dir() else [p] if p.exists() else []
            out.update({q.relative_to(root).as_posix(): q.read_bytes() for q in paths if q.is_file()})
        return out

    fa, fb = files(a), files(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CORPUS_DIR, help="corpus folder (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="rebuild in a temporary folder and fail if it differs from --out")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="myqasr-corpus-stage-", dir=args.out.parent) as stage:
            staged = Path(stage) / "corpus"
            build(staged)
            if args.check:
                diff = differences(args.out, staged)
                if diff:
                    print(f"corpus differs from a fresh build in {len(diff)} files, e.g. {diff[:5]}; "
                          "run scripts/build_corpus.py and commit the result", file=sys.stderr)
                    return 1
                print(f"{args.out} matches a fresh build")
            else:
                args.out.mkdir(parents=True, exist_ok=True)
                install(staged, args.out)
                total = sum(p.stat().st_size for p in (args.out / "audio").rglob("*.flac"))
                print(f"wrote {args.out} ({total / 2**20:.2f} MiB of audio)")
    except CorpusBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
