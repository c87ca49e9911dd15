"""Text normalisation before WER: Whisper's own normalisers, so our numbers compare with published ones.

English uses Whisper's `EnglishTextNormalizer` (spelling standardisation, "mr" -> "mister",
number words -> digits, contractions expanded, punctuation and fillers removed); every other
language uses Whisper's `BasicTextNormalizer` (lower case, punctuation and bracketed text removed).
Both come from the ``whisper-normalizer`` package, a copy of the code in openai/whisper.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

_ENGLISH = {"en", "eng", "english"}


@lru_cache(maxsize=None)
def _english() -> Callable[[str], str]:
    # Built once: it loads a spelling table of ~1,700 British -> American entries.
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


@lru_cache(maxsize=None)
def _basic() -> Callable[[str], str]:
    from whisper_normalizer.basic import BasicTextNormalizer

    return BasicTextNormalizer()


def is_english(language: str | None) -> bool:
    """True for None (the default language) and for English codes: "en", "en-US", "en_GB", "english"."""
    if language is None:
        return True
    primary = language.strip().lower().replace("_", "-").split("-")[0]
    return primary in _ENGLISH


def normalize_text(text: str, language: str | None = None) -> str:
    """Normalise a transcript (reference or hypothesis) for WER scoring.

    Args:
        text: the transcript.
        language: language code ("en", "fr", ...); None means English.

    Returns:
        Space-separated lower-case words, whitespace collapsed, no leading/trailing space; may be
        "" (e.g. a transcript holding only fillers such as "uh").

    Raises:
        TypeError: ``text`` is not a string (e.g. None for an unlabelled utterance).
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_text expects a string, got {type(text).__name__}; unlabelled utterances have no reference to score")
    normalizer = _english() if is_english(language) else _basic()
    # The basic normaliser leaves runs of spaces where punctuation was; collapse them so the word
    # count does not depend on punctuation.
    return " ".join(normalizer(text).split())
