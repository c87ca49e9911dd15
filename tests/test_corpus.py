"""The shipped speech corpus: manifests, audio files and the coverage the experiments rely on.

These tests read only the committed files (no synthesiser needed). `scripts/build_corpus.py
--check` is the test that the files match a fresh build; it needs the Debian packages.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from torch_myqasr.corpus import SPLITS, corpus_dir, corpus_manifest

FIELDS = ("id", "audio", "text", "speaker", "gender", "language", "source")
SOURCES = {"festival-hts", "festival-diphone", "espeak-ng", "librivox"}
# What the brief promises downstream users (personalisation per speaker, gender, language).
REQUIRED_SPEAKERS = {
    "slt": ("female", "en", "festival-hts"),
    "kal": ("male", "en", "festival-diphone"),
    "ked": ("male", "en", "festival-diphone"),
    "espeak-es": (None, "es", "espeak-ng"),
    "espeak-fr": (None, "fr", "espeak-ng"),
    "espeak-de": (None, "de", "espeak-ng"),
    "librivox": (None, "en", "librivox"),
}
MAX_TOTAL_BYTES = 8 * 2**20


def load_rows(split: str) -> list[dict]:
    """Parse one manifest; every line must be a JSON object."""
    lines = corpus_manifest(split).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    return {split: load_rows(split) for split in SPLITS}


@pytest.fixture(scope="module")
def all_rows(rows) -> list[dict]:
    return [r for split in SPLITS for r in rows[split]]


def test_corpus_manifest_paths_and_bad_split():
    assert corpus_manifest() == corpus_dir() / "test.jsonl"
    assert corpus_manifest("calib") == corpus_dir() / "calib.jsonl"
    with pytest.raises(ValueError, match="calib"):
        corpus_manifest("train")


def test_manifest_rows_have_the_contract_fields(all_rows):
    assert len(all_rows) > 50
    for r in all_rows:
        assert tuple(r) == FIELDS, f"{r.get('id')}: fields {tuple(r)} != {FIELDS}"
        assert all(isinstance(r[k], str) and r[k] for k in FIELDS), r
        assert r["gender"] in {"female", "male"}, r
        assert r["language"] in {"en", "es", "fr", "de"}, r
        assert r["source"] in SOURCES, r
        assert r["audio"] == f"audio/{r['speaker']}/{r['id']}.flac", r
    ids = [r["id"] for r in all_rows]
    assert len(ids) == len(set(ids)), "clip ids must be unique across both splits"


def test_audio_files_are_16khz_mono_nonsilent_and_1_to_20_seconds(all_rows):
    for r in all_rows:
        path = corpus_manifest().parent / r["audio"]
        assert path.is_file(), f"{r['id']}: {path} is missing"
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.format) == (16000, 1, "FLAC"), f"{path}: {info}"
        audio, _ = sf.read(str(path), dtype="float32")
        seconds = len(audio) / 16000
        assert 1.0 <= seconds <= 20.0, f"{path}: {seconds:.2f} s"
        rms = float(np.sqrt(np.mean(audio**2)))
        # Speech sits around 0.05-0.2 RMS here; 0.01 (-40 dBFS) would be near-silence.
        assert rms > 0.01, f"{path}: RMS {rms:.4f} is near silence"


def test_audio_matches_checksums(all_rows):
    sums = {}
    for line in (corpus_dir() / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        sums[name] = digest
    assert set(sums) == {r["audio"] for r in all_rows}, "SHA256SUMS and the manifests list different files"
    on_disk = {p.relative_to(corpus_dir()).as_posix() for p in corpus_dir().glob("audio/**/*") if p.is_file()}
    assert on_disk == set(sums), f"audio files not in any manifest: {sorted(on_disk - set(sums))}"
    for name, digest in sums.items():
        assert hashlib.sha256((corpus_dir() / name).read_bytes()).hexdigest() == digest, name


def test_every_speaker_has_calib_and_test_clips_with_one_identity(all_rows, rows):
    per_split = {split: {r["speaker"] for r in rows[split]} for split in SPLITS}
    assert per_split["calib"] == per_split["test"]
    identity = defaultdict(set)
    for r in all_rows:
        identity[r["speaker"]].add((r["gender"], r["language"], r["source"]))
    for speaker, ids in identity.items():
        assert len(ids) == 1, f"speaker {speaker} has conflicting gender/language/source {ids}"
    for split in SPLITS:
        counts = defaultdict(int)
        for r in rows[split]:
            counts[r["speaker"]] += 1
        assert min(counts.values()) >= 2, f"{split}: too few clips for some speaker: {dict(counts)}"


def test_no_sentence_in_both_splits(rows):
    calib = {r["text"] for r in rows["calib"]}
    test = {r["text"] for r in rows["test"]}
    assert not calib & test, f"sentences in both splits: {sorted(calib & test)}"


def test_no_digits_in_texts(all_rows):
    for r in all_rows:
        assert not re.search(r"\d", r["text"]), f"{r['id']}: digits in {r['text']!r}"


def test_coverage_of_speakers_genders_languages(all_rows):
    identity = {r["speaker"]: (r["gender"], r["language"], r["source"]) for r in all_rows}
    for speaker, (gender, language, source) in REQUIRED_SPEAKERS.items():
        assert speaker in identity, f"speaker {speaker} is missing"
        got = identity[speaker]
        assert got[1:] == (language, source), f"{speaker}: {got}"
        if gender is not None:
            assert got[0] == gender, f"{speaker}: {got}"
    hard = {s: g for s, (g, lang, src) in identity.items() if src == "espeak-ng" and lang == "en"}
    assert 2 <= len(hard) <= 3, f"the espeak English hard set has {len(hard)} voices"
    assert set(hard.values()) == {"female", "male"}, "the hard set must have both genders"
    assert {g for g, lang, _ in identity.values() if lang == "en"} == {"female", "male"}
    assert {lang for _, lang, _ in identity.values()} == {"en", "es", "fr", "de"}


def test_librivox_is_real_speech_with_transcripts(rows):
    libri = {split: [r for r in rows[split] if r["speaker"] == "librivox"] for split in SPLITS}
    assert len(libri["calib"]) + len(libri["test"]) == 5
    assert len(libri["test"]) >= 3
    assert all(len(r["text"].split()) >= 5 for split in SPLITS for r in libri[split])
    assert (corpus_dir() / "LICENSE-pocketsphinx-testdata").read_text().count("Carnegie Mellon University") >= 1


def test_corpus_is_small():
    total = sum(p.stat().st_size for p in corpus_dir().rglob("*") if p.is_file())
    assert total < MAX_TOTAL_BYTES, f"corpus is {total / 2**20:.2f} MiB; keep it under 8 MiB"


def _build_script():
    """Import scripts/build_corpus.py (not a package) to test its checks against the shipped data."""
    import importlib.util
    import sys

    if "build_corpus" in sys.modules:
        return sys.modules["build_corpus"]
    path = Path(__file__).resolve().parent.parent / "scripts" / "build_corpus.py"
    spec = importlib.util.spec_from_file_location("build_corpus", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_corpus"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_build_script_rejects_numbers():
    build = _build_script()
    with pytest.raises(build.CorpusBuildError, match="number words"):
        build.check_text("Four hours of steady work faced us.", "en", where="test")
    with pytest.raises(build.CorpusBuildError, match="digit"):
        build.check_text("El tren sale a las 5.", "es", where="test")
    build.check_text("Help the woman get back to her feet.", "en", where="test")


def test_manifests_match_the_build_definition(rows):
    """The committed corpus is what scripts/build_corpus.py + scripts/sentences/ describe (rebuild if not)."""
    build = _build_script()
    for split in SPLITS:
        got = defaultdict(list)
        for r in rows[split]:
            got[r["speaker"]].append(r["text"])
        assert list(got) == [s.id for s in build.SPEAKERS], "speakers differ; run scripts/build_corpus.py"
        for s in build.SPEAKERS:
            n = s.n_calib if split == "calib" else s.n_test
            assert len(got[s.id]) == n, f"{s.id} {split}"
            if s.source != "librivox":
                assert got[s.id] == build.read_sentences(s.language, split)[:n], (
                    f"{s.id} {split}: texts differ from scripts/sentences; run scripts/build_corpus.py"
                )
