"""Normalisation, corpus-level WER and its aggregation, report dict and table, against hand counts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from torch_myqasr.evaluation import (
    WerResult,
    aggregate_wer,
    compute_wer,
    format_wer_table,
    is_english,
    normalize_text,
    wer_report_dict,
)
from torch_myqasr.evaluation import normalize as normalize_module
from torch_myqasr.audio import Utterance

# ---- normalisation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        # Whisper's English normaliser: titles spelled out, "'s" read as "is", digits kept,
        # punctuation dropped, lower case.
        ("Mr. Smith's 2 cats!", "mister smith is 2 cats"),
        # Number words become digits and currency is joined: why references avoid number words.
        ('Dr. Jones said: "It\'s twenty-five dollars."', "doctor jones said it is $25"),
        # British spellings become American; whitespace collapses.
        ("The  COLOUR of   the Harbour", "the color of the harbor"),
        # Bracketed annotations and hesitations vanish.
        ("[noise] uh, hello (laughs) world", "hello world"),
        ("Um. Hmm!", ""),
    ],
)
def test_english_normalisation_matches_whisper(text, expected):
    assert normalize_text(text, "en") == expected
    assert normalize_text(text) == expected  # None means English


def test_other_languages_use_the_basic_normaliser():
    assert normalize_text("Bonjour, le Monde! Ça va?", "fr") == "bonjour le monde ça va"
    # The English normaliser would turn "Mr." into "mister" and "colour" into "color"; the basic one does not.
    assert normalize_text("Mr. Colour", "de") == "mr colour"
    assert normalize_text("Привет,  мир!", "ru") == "привет мир"


def test_language_codes():
    assert is_english(None) and is_english("en") and is_english("en-US") and is_english("EN_gb") and is_english("English")
    assert not is_english("fr") and not is_english("ene")


def test_normalisers_are_built_once():
    assert normalize_module._english() is normalize_module._english()
    assert normalize_module._basic() is normalize_module._basic()


def test_normalize_rejects_none():
    with pytest.raises(TypeError, match="no reference"):
        normalize_text(None)  # type: ignore[arg-type]


# ---- compute_wer ------------------------------------------------------------------------------


def test_compute_wer_counts():
    r = compute_wer(["the cat sat on the mat", "good morning"], ["the cat sat on mat", "good evening to you"])
    # utt 1: one deletion; utt 2: "morning"->"evening" plus two insertions. 8 reference words.
    assert (r.substitutions, r.deletions, r.insertions, r.n_words, r.n_utts) == (1, 1, 2, 8, 2)
    assert r.wer == pytest.approx(4 / 8)
    assert r.errors == 4


def test_compute_wer_empty_reference_counts_insertions():
    r = compute_wer(["", "a b"], ["x y z", "a b"])
    assert (r.insertions, r.n_words, r.n_utts) == (3, 2, 2)
    assert r.wer == pytest.approx(3 / 2)
    only_empty = compute_wer([""], ["x"])
    assert only_empty.wer == math.inf and only_empty.n_words == 0
    assert compute_wer([""], [""]).wer == 0.0
    assert compute_wer([], []) == WerResult(0.0, 0, 0, 0, 0, 0)


def test_compute_wer_length_mismatch():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        compute_wer(["a", "b"], ["a"])


# ---- aggregate_wer ----------------------------------------------------------------------------


def _rec(uid, speaker, gender, language, ref, hyp):
    return {
        "utterance": Utterance(uid, Path(f"{uid}.wav"), ref, speaker, gender, language),
        "reference": ref,
        "hypothesis": hyp,
    }


RECORDS = [
    # speaker A (female, en): 8 words, 1 deletion + 1 insertion -> 2/8 = 0.25
    _rec("a1", "A", "female", "en", "the cat sat on the mat", "the cat sat on mat"),
    _rec("a2", "A", "female", "en", "hello world", "hello there world"),
    # speaker B (male, en): 2 words, 1 substitution + an insertion-only utterance of 3 words -> 4/2
    _rec("b1", "B", "male", "en", "good morning", "good evening"),
    _rec("b2", "B", "male", "en", "", "uh oh no"),
    # speaker C (gender unknown, fr): 3 words, no errors
    _rec("c1", "C", None, "fr", "bonjour le monde", "bonjour le monde"),
]


def test_aggregate_wer_hand_computed():
    agg = aggregate_wer(RECORDS)
    overall = agg["overall"]
    assert (overall.n_utts, overall.n_words, overall.substitutions, overall.deletions, overall.insertions) == (5, 13, 1, 1, 4)
    # Corpus-level: 6 errors / 13 words. The mean of per-utterance WERs would be infinite here.
    assert overall.wer == pytest.approx(6 / 13)

    spk = agg["by_speaker"]
    assert list(spk) == ["A", "B", "C"]
    assert spk["A"] == WerResult(0.25, 2, 8, 0, 1, 1)
    assert spk["B"] == WerResult(2.0, 2, 2, 1, 0, 3)
    assert spk["C"] == WerResult(0.0, 1, 3, 0, 0, 0)

    assert agg["by_gender"]["female"].wer == pytest.approx(0.25)
    assert agg["by_gender"]["male"].wer == pytest.approx(2.0)
    assert agg["by_gender"]["unknown"].n_utts == 1
    assert agg["by_language"]["en"] == WerResult(0.6, 4, 10, 1, 1, 4)
    assert agg["by_language"]["fr"].wer == 0.0


def test_aggregate_wer_speaker_with_only_insertions():
    agg = aggregate_wer(RECORDS + [_rec("d1", "D", None, None, "", "hmm yes")])
    assert agg["by_speaker"]["D"].wer == math.inf and agg["by_speaker"]["D"].insertions == 2
    assert agg["by_language"]["unknown"].n_utts == 1
    assert agg["overall"].wer == pytest.approx(8 / 13)


def test_aggregate_wer_missing_key():
    with pytest.raises(ValueError, match="record 0 has no 'hypothesis'"):
        aggregate_wer([{"utterance": RECORDS[0]["utterance"], "reference": "x"}])


# ---- report and table -------------------------------------------------------------------------


def test_wer_report_dict_is_strict_json():
    agg = aggregate_wer(RECORDS + [_rec("d1", "D", None, None, "", "hmm yes")])
    report = json.loads(json.dumps(wer_report_dict(agg, model="whisper-tiny.en"), allow_nan=False))
    assert report["model"] == "whisper-tiny.en"
    assert report["overall"]["wer"] == pytest.approx(8 / 13)
    assert report["overall"]["n_utts"] == 6
    assert report["by_speaker"]["A"] == {
        "wer": 0.25, "n_utts": 2, "n_words": 8, "substitutions": 0, "deletions": 1, "insertions": 1
    }
    assert report["by_speaker"]["D"]["wer"] is None and report["by_speaker"]["D"]["insertions"] == 2
    assert set(report["by_gender"]) == {"female", "male", "unknown"}
    assert set(report["by_language"]) == {"en", "fr", "unknown"}


def test_format_wer_table():
    table = format_wer_table(aggregate_wer(RECORDS))
    lines = table.splitlines()
    assert lines[0].split() == ["group", "utts", "words", "WER", "%", "sub", "del", "ins"]
    rows = {" ".join(line.split()[:2]): line.split()[2:] for line in lines[2:]}
    assert rows["overall 5"] == ["13", "46.15", "1", "1", "4"]
    assert rows["speaker A"] == ["2", "8", "25.00", "0", "1", "1"]
    assert rows["speaker B"] == ["2", "2", "200.00", "1", "0", "3"]
    assert rows["gender female"][2] == "25.00" and rows["language fr"][2] == "0.00"
    # Aligned: every row is as wide as the header (numbers right-aligned to the same edge).
    assert len({len(line) for line in lines}) == 1


def test_format_wer_table_hides_all_unknown_sections_and_shows_inf():
    recs = [_rec("x", "solo", None, None, "", "hello")]
    table = format_wer_table(aggregate_wer(recs))
    assert "gender" not in table and "language" not in table
    assert "speaker solo" in table and "inf" in table
