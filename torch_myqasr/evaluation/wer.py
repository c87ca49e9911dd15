"""Word error rate: counts per utterance, totals per group, a JSON report and a text table.

WER here is always corpus-level: total errors (substitutions + deletions + insertions) over total
reference words of the group, not a mean of per-utterance WERs (which would weigh a two-word
utterance like a fifty-word one). Inputs must already be normalised (`normalize_text`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import jiwer

UNKNOWN = "unknown"
"""Group name for utterances whose gender or language is not known."""


@dataclass
class WerResult:
    """Word error counts of a set of utterances.

    Attributes:
        wer: (substitutions + deletions + insertions) / n_words, a fraction (0.05 = 5 %). When
            n_words is 0 it is 0.0 without errors and ``math.inf`` with insertions.
        n_utts: number of utterances.
        n_words: number of reference words.
        substitutions, deletions, insertions: word edit counts of the alignment.
    """

    wer: float
    n_utts: int
    n_words: int
    substitutions: int
    deletions: int
    insertions: int

    @property
    def errors(self) -> int:
        """substitutions + deletions + insertions."""
        return self.substitutions + self.deletions + self.insertions

    @classmethod
    def from_counts(cls, n_utts: int, n_words: int, s: int, d: int, i: int) -> WerResult:
        """Build a result from counts, computing ``wer`` (see the class docstring for n_words = 0)."""
        errors = s + d + i
        wer = errors / n_words if n_words else (0.0 if errors == 0 else math.inf)
        return cls(wer, n_utts, n_words, s, d, i)

    def __add__(self, other: WerResult) -> WerResult:
        return WerResult.from_counts(
            self.n_utts + other.n_utts,
            self.n_words + other.n_words,
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
        )


_EMPTY = WerResult.from_counts(0, 0, 0, 0, 0)


def _utterance_wer(reference: str, hypothesis: str) -> WerResult:
    """Counts for one normalised reference / hypothesis pair."""
    if not isinstance(reference, str) or not isinstance(hypothesis, str):
        raise TypeError(
            f"reference and hypothesis must be strings, got {type(reference).__name__} and {type(hypothesis).__name__}"
        )
    if not reference.split():
        # jiwer (some versions) rejects an empty reference; against nothing, every hypothesis word
        # is an insertion.
        return WerResult.from_counts(1, 0, 0, 0, len(hypothesis.split()))
    out = jiwer.process_words(reference, hypothesis)
    n_words = out.hits + out.substitutions + out.deletions
    return WerResult.from_counts(1, n_words, out.substitutions, out.deletions, out.insertions)


def compute_wer(refs: Sequence[str], hyps: Sequence[str]) -> WerResult:
    """Corpus-level WER of normalised references against normalised hypotheses (pairs in order).

    Empty references are allowed: they add no reference words and count every hypothesis word as
    an insertion.

    Raises:
        ValueError: the two sequences differ in length.
    """
    if len(refs) != len(hyps):
        raise ValueError(f"compute_wer got {len(refs)} references but {len(hyps)} hypotheses; pass one of each per utterance")
    total = _EMPTY
    for r, h in zip(refs, hyps):
        total = total + _utterance_wer(r, h)
    return total


def aggregate_wer(records: Iterable[Mapping]) -> dict:
    """Corpus-level WER overall and per speaker, gender and language.

    Args:
        records: one mapping per utterance with ``utterance`` (an `Utterance`), ``reference`` and
            ``hypothesis`` (normalised strings); other keys are ignored.

    Returns:
        ``{"overall": WerResult, "by_speaker": {speaker: WerResult}, "by_gender": {...},
        "by_language": {...}}``; groups are sorted by name, an unknown gender / language is
        grouped as `UNKNOWN`.
    """
    overall = _EMPTY
    groups: dict[str, dict[str, WerResult]] = {"by_speaker": {}, "by_gender": {}, "by_language": {}}
    for n, rec in enumerate(records):
        try:
            utt, ref, hyp = rec["utterance"], rec["reference"], rec["hypothesis"]
        except KeyError as e:
            raise ValueError(f"WER record {n} has no {e.args[0]!r}; records need utterance, reference, hypothesis") from None
        res = _utterance_wer(ref, hyp)
        overall = overall + res
        for kind, key in (
            ("by_speaker", utt.speaker),
            ("by_gender", utt.gender or UNKNOWN),
            ("by_language", utt.language or UNKNOWN),
        ):
            groups[kind][key] = groups[kind].get(key, _EMPTY) + res
    return {"overall": overall, **{k: dict(sorted(v.items())) for k, v in groups.items()}}


def _result_dict(r: WerResult) -> dict:
    return {
        # JSON has no infinity: an undefined WER (insertions against zero reference words) is null,
        # and the counts beside it say why.
        "wer": r.wer if math.isfinite(r.wer) else None,
        "n_utts": r.n_utts,
        "n_words": r.n_words,
        "substitutions": r.substitutions,
        "deletions": r.deletions,
        "insertions": r.insertions,
    }


def wer_report_dict(agg: Mapping, model: str) -> dict:
    """A JSON-serialisable report of `aggregate_wer`'s result (strict JSON: no NaN/inf).

    Returns:
        ``{"model": model, "wer_unit": "fraction", "overall": {"wer", "n_utts", "n_words",
        "substitutions", "deletions", "insertions"}, "by_speaker": {name: {...}}, "by_gender":
        {...}, "by_language": {...}}``; ``wer`` is a fraction (0.05 = 5 %), or null when a group
        has no reference words but has insertions.
    """
    report: dict = {"model": model, "wer_unit": "fraction", "overall": _result_dict(agg["overall"])}
    for kind in ("by_speaker", "by_gender", "by_language"):
        report[kind] = {name: _result_dict(r) for name, r in agg[kind].items()}
    return report


def _pct(r: WerResult) -> str:
    return f"{100 * r.wer:.2f}" if math.isfinite(r.wer) else "inf"


def format_wer_table(agg: Mapping) -> str:
    """A plain-text table of `aggregate_wer`'s result: one row per group, columns aligned.

    Columns: group, utterances, reference words, WER in percent, substitutions, deletions,
    insertions. Gender and language sections are left out when every utterance is `UNKNOWN`
    there (they would repeat the overall row).
    """
    rows: list[tuple[str, WerResult]] = [("overall", agg["overall"])]
    for kind, title in (("by_speaker", "speaker"), ("by_gender", "gender"), ("by_language", "language")):
        if set(agg[kind]) == {UNKNOWN} and kind != "by_speaker":
            continue
        rows.extend((f"{title} {name}", r) for name, r in agg[kind].items())
    header = ("group", "utts", "words", "WER %", "sub", "del", "ins")
    body = [
        (name, str(r.n_utts), str(r.n_words), _pct(r), str(r.substitutions), str(r.deletions), str(r.insertions))
        for name, r in rows
    ]
    widths = [max(len(row[c]) for row in [header, *body]) for c in range(len(header))]

    def line(row: Sequence[str]) -> str:
        # Group names left-aligned, numbers right-aligned so digits line up.
        return "  ".join(row[0].ljust(widths[0]) if c == 0 else row[c].rjust(widths[c]) for c in range(len(row))).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in body)])
