"""Dataset readers, auto-detection, filtering and load_dataset_audio's raise / skip paths."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile

from torch_myqasr.audio import (
    UNKNOWN_SPEAKER,
    AudioError,
    Dataset,
    DatasetError,
    SkippedAudioWarning,
    Utterance,
    load_dataset_audio,
    open_dataset,
    read_audio_folder,
    read_librispeech,
    read_manifest,
)

RATE = 16_000


def _clip(path: Path, freq: float = 440.0, seconds: float = 0.05) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(RATE * seconds)) / RATE
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), RATE)
    return path


def _librispeech(root: Path, chapters: dict[tuple[str, str], dict[str, str]], ext: str = ".flac") -> Path:
    """Write a LibriSpeech tree: {(speaker, chapter): {utt_suffix: text}}."""
    for (spk, chap), utts in chapters.items():
        folder = root / spk / chap
        lines = []
        for suffix, text in utts.items():
            uid = f"{spk}-{chap}-{suffix}"
            _clip(folder / f"{uid}{ext}")
            lines.append(f"{uid} {text}")
        (folder / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def libri(tmp_path) -> Path:
    return _librispeech(
        tmp_path / "libri",
        {
            ("19", "198"): {"0000": "NORTHANGER ABBEY", "0001": "THIS LITTLE WORK"},
            ("26", "495"): {"0000": "CHAPTER ONE"},
        },
    )


# ---- LibriSpeech ------------------------------------------------------------------------------


def test_read_librispeech(libri):
    ds = read_librispeech(libri)
    assert [u.id for u in ds] == ["19-198-0000", "19-198-0001", "26-495-0000"]
    assert ds.speakers() == ["19", "26"]
    assert ds[0].text == "NORTHANGER ABBEY" and ds[1].text == "THIS LITTLE WORK"
    assert ds[0].audio_path == libri / "19" / "198" / "19-198-0000.flac"
    assert all(u.language == "en" and u.gender is None for u in ds)
    assert ds.has_transcripts and ds.name == "libri" and len(ds) == 3


def test_librispeech_genders_from_speakers_txt(libri):
    (libri / "SPEAKERS.TXT").write_text(";ID |SEX| SUBSET | MINUTES | NAME\n19 | F | train | 25.19 | Kara\n26 | M | train | 25.08 | Denny\n")
    ds = read_librispeech(libri)
    assert {u.speaker: u.gender for u in ds} == {"19": "female", "26": "male"}


def test_librispeech_transcript_without_audio(libri):
    trans = libri / "19" / "198" / "19-198.trans.txt"
    trans.write_text(trans.read_text() + "19-198-0002 A LINE WITH NO AUDIO\n")
    with pytest.raises(DatasetError, match="no audio file") as info:
        read_librispeech(libri)
    assert "19-198-0002" in str(info.value) and str(trans) in str(info.value)


def test_librispeech_audio_without_transcript(libri):
    _clip(libri / "26" / "495" / "26-495-0009.flac")
    with pytest.raises(DatasetError, match="no transcript line") as info:
        read_librispeech(libri)
    assert "26-495-0009" in str(info.value) and "26-495.trans.txt" in str(info.value)


def test_librispeech_audio_in_folder_without_transcript_file(libri):
    _clip(libri / "26" / "777" / "26-777-0000.flac")
    with pytest.raises(DatasetError, match="no \\*.trans.txt") as info:
        read_librispeech(libri)
    assert "26-777-0000" in str(info.value)


def test_librispeech_duplicate_line(libri):
    trans = libri / "26" / "495" / "26-495.trans.txt"
    trans.write_text(trans.read_text() * 2)
    with pytest.raises(DatasetError, match=r"trans.txt:2: .*appears twice"):
        read_librispeech(libri)


def test_librispeech_chapter_folder_as_root(libri):
    ds = read_librispeech(libri / "19" / "198")
    assert ds.speakers() == ["19"] and len(ds) == 2


# ---- JSONL manifest ---------------------------------------------------------------------------


def _manifest(tmp_path: Path, records: list, name: str = "set.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_read_manifest(tmp_path):
    a = _clip(tmp_path / "m" / "audio" / "a.wav")
    b = _clip(tmp_path / "elsewhere" / "b.wav").resolve()  # absolute path outside the manifest's folder
    path = _manifest(
        tmp_path / "m",
        [
            {"audio": "audio/a.wav", "text": "hello there", "speaker": "slt", "gender": "female", "language": "en"},
            "",
            {"audio": str(b), "text": "bonjour", "speaker": "kal", "id": "fr-1", "language": "fr", "extra": 1},
        ],
    )
    ds = read_manifest(path)
    assert [u.id for u in ds] == ["a", "fr-1"]
    assert ds[0] == Utterance("a", tmp_path / "m" / "audio" / "a.wav", "hello there", "slt", "female", "en")
    assert ds[1].audio_path == b and ds[1].gender is None and ds[1].language == "fr"
    assert ds.name == "set" and a.exists()


def test_manifest_bad_json_line_names_file_and_line(tmp_path):
    _clip(tmp_path / "a.wav")
    path = _manifest(tmp_path, [{"audio": "a.wav", "text": "x", "speaker": "s"}, '{"audio": "a.wav", "text": '])
    with pytest.raises(DatasetError, match=f"{path}:2: not valid JSON"):
        read_manifest(path)


@pytest.mark.parametrize(
    "record, match",
    [
        ({"audio": "a.wav", "speaker": "s"}, "missing field\\(s\\) text"),
        ({"audio": "a.wav", "text": "x"}, "missing field\\(s\\) speaker"),
        ({"audio": "a.wav", "text": 3, "speaker": "s"}, "'text' must be a string"),
        ({"audio": "gone.wav", "text": "x", "speaker": "s"}, "gone.wav not found"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_manifest_bad_records(tmp_path, record, match):
    _clip(tmp_path / "a.wav")
    path = _manifest(tmp_path, [record])
    with pytest.raises(DatasetError, match=f"{path}:1: .*{match}"):
        read_manifest(path)


def test_manifest_duplicate_id_and_empty(tmp_path):
    _clip(tmp_path / "a.wav")
    rec = {"audio": "a.wav", "text": "x", "speaker": "s"}
    with pytest.raises(DatasetError, match=":2: utterance id 'a' already used on line 1"):
        read_manifest(_manifest(tmp_path, [rec, rec]))
    with pytest.raises(DatasetError, match="no utterances"):
        read_manifest(_manifest(tmp_path, ["", "  "], name="empty.jsonl"))


def test_manifest_null_text_is_unlabelled(tmp_path):
    _clip(tmp_path / "a.wav")
    ds = read_manifest(_manifest(tmp_path, [{"audio": "a.wav", "text": None, "speaker": "s"}]))
    assert ds[0].text is None and not ds.has_transcripts


# ---- audio folder -----------------------------------------------------------------------------


def test_read_audio_folder(tmp_path):
    root = tmp_path / "clips"
    _clip(root / "top.wav")
    _clip(root / "alice" / "one.flac")
    _clip(root / "alice" / "deep" / "two.wav")
    _clip(root / "bob" / "one.wav")
    (root / "bob" / "notes.txt").write_text("not audio")
    _clip(root / ".hidden" / "x.wav")
    ds = read_audio_folder(root)
    assert [(u.id, u.speaker) for u in ds] == [
        ("alice/deep/two", "deep"),
        ("alice/one", "alice"),
        ("bob/one", "bob"),
        ("top", UNKNOWN_SPEAKER),
    ]
    assert all(u.text is None for u in ds) and not ds.has_transcripts


def test_audio_folder_errors(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="no audio files under .*looked for .*\\.wav"):
        read_audio_folder(tmp_path)
    _clip(tmp_path / "a.wav")
    _clip(tmp_path / "a.flac")
    with pytest.raises(DatasetError, match="share utterance id 'a'"):
        read_audio_folder(tmp_path)


# ---- auto-detection ---------------------------------------------------------------------------


def test_open_dataset_detects_layouts(tmp_path, libri):
    _clip(tmp_path / "m" / "a.wav")
    manifest = _manifest(tmp_path / "m", [{"audio": "a.wav", "text": "x", "speaker": "s"}])
    _clip(tmp_path / "folder" / "spk" / "c.wav")

    assert open_dataset(manifest)[0].id == "a"
    assert open_dataset(libri).has_transcripts and len(open_dataset(libri)) == 3
    folder = open_dataset(tmp_path / "folder")
    assert folder[0].speaker == "spk" and folder[0].text is None


def test_open_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no audio files under"):
        open_dataset(tmp_path / "empty")
    (tmp_path / "list.csv").write_text("a,b")
    with pytest.raises(DatasetError, match="not a .jsonl manifest"):
        open_dataset(tmp_path / "list.csv")


# ---- Dataset ----------------------------------------------------------------------------------


def _utts() -> list[Utterance]:
    return [
        Utterance("1", Path("1.wav"), "a", "slt", "female", "en"),
        Utterance("2", Path("2.wav"), "b", "kal", "male", "en"),
        Utterance("3", Path("3.wav"), "c", "slt", "female", "fr"),
        Utterance("4", Path("4.wav"), "d", "kal", "male", None),
    ]


def test_dataset_filter():
    ds = Dataset(_utts(), "toy")
    assert [u.id for u in ds.filter(speakers="slt")] == ["1", "3"]
    assert [u.id for u in ds.filter(speakers=["slt", "kal"], languages=["en"])] == ["1", "2"]
    assert [u.id for u in ds.filter(languages=["en", None])] == ["1", "2", "4"]
    assert [u.id for u in ds.filter(speakers="kal", languages="en")] == ["2"]
    assert ds.languages() == [None, "en", "fr"]
    with pytest.raises(DatasetError, match="speaker\\(s\\) bob not in dataset 'toy'; its speakers are: kal, slt"):
        ds.filter(speakers="bob")
    with pytest.raises(DatasetError, match="no utterances .* match speakers \\['kal'\\] and languages \\['fr'\\]"):
        ds.filter(speakers="kal", languages="fr")


def test_dataset_sequence_behaviour():
    ds = Dataset(_utts(), "toy")
    assert isinstance(ds[1:3], Dataset) and [u.id for u in ds[1:3]] == ["2", "3"]
    assert ds[-1].id == "4" and "4 utterances" in repr(ds)
    with pytest.raises(DatasetError, match="duplicate utterance ids: 1"):
        Dataset(_utts() + _utts()[:1], "dup")


# ---- load_dataset_audio -----------------------------------------------------------------------


def test_load_dataset_audio_yields_in_order(libri):
    ds = read_librispeech(libri)
    pairs = list(load_dataset_audio(ds))
    assert [u.id for u, _ in pairs] == [u.id for u in ds]
    assert all(a.dtype == np.float32 and len(a) == int(0.05 * RATE) for _, a in pairs)


def _with_bad_clips(libri: Path) -> Dataset:
    ds = read_librispeech(libri)
    ds[0].audio_path.write_bytes(b"garbage, not flac")
    soundfile.write(ds[2].audio_path, np.zeros(800, np.float32), RATE)  # silent
    return ds


def test_load_dataset_audio_raise_names_utterance(libri):
    ds = _with_bad_clips(libri)
    with pytest.raises(AudioError, match="utterance '19-198-0000': cannot decode"):
        list(load_dataset_audio(ds))


def test_load_dataset_audio_skip_warns_once(libri):
    ds = _with_bad_clips(libri)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs = list(load_dataset_audio(ds, on_error="skip"))
    assert [u.id for u, _ in pairs] == ["19-198-0001"]
    skipped = [w for w in caught if issubclass(w.category, SkippedAudioWarning)]
    assert len(skipped) == 1
    msg = str(skipped[0].message)
    assert "skipped 2 of 3" in msg and "19-198-0000" in msg and "26-495-0000" in msg and "silent" in msg


def test_load_dataset_audio_no_warning_when_clean(libri):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list(load_dataset_audio(read_librispeech(libri), on_error="skip"))) == 3


def test_load_dataset_audio_bad_mode(libri):
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
        load_dataset_audio(read_librispeech(libri), on_error="ignore")
