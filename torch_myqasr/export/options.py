"""What greedy decoding needs to know about the prompt, the end token and token suppression.

`decoding_options` reads a Whisper ``generation_config`` the way transformers' Whisper ``generate``
does for short-form, no-timestamp transcription: prompt ``[sot, notimestamps]`` for English-only
models and ``[sot, language, task, notimestamps]`` for multilingual ones, ``suppress_tokens``
masked at every step and ``begin_suppress_tokens`` at the first generated step.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_NEW_TOKENS = 128
"""Default cap on generated tokens: ~30 s of fast speech is < 100 tokens, and Whisper can loop forever."""

TASKS = ("transcribe", "translate")


@dataclass(frozen=True)
class DecodingOptions:
    """Prompt, stop token, suppression and length cap for `greedy_decode`.

    Attributes:
        prompt_ids: tokens fed before generation starts (e.g. ``[sot, notimestamps]``).
        eos_token_id: end of text; finished rows keep emitting it (it is never returned).
        suppress_tokens: ids whose logits are set to -inf at every step.
        begin_suppress_tokens: ids also set to -inf at the first generated step only.
        max_new_tokens: hard cap on generated tokens per row (eos included).
    """

    prompt_ids: tuple[int, ...]
    eos_token_id: int
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    def __post_init__(self) -> None:
        # Accept lists from callers but store tuples so the options stay hashable and immutable.
        for name in ("prompt_ids", "suppress_tokens", "begin_suppress_tokens"):
            object.__setattr__(self, name, tuple(int(t) for t in getattr(self, name)))
        if not self.prompt_ids:
            raise ValueError(
                "DecodingOptions.prompt_ids is empty; Whisper needs at least the start token <|startoftranscript|>"
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"DecodingOptions.max_new_tokens must be >= 1, got {self.max_new_tokens}")


def _language_token(language: str, lang_to_id: dict[str, int]) -> int:
    """Token id of ``language`` given as a code ("de"), a name ("german") or a token ("<|de|>")."""
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    key = language.strip().lower()
    if key in TO_LANGUAGE_CODE:
        key = TO_LANGUAGE_CODE[key]
    token = key if key.startswith("<|") else f"<|{key}|>"
    if token not in lang_to_id:
        codes = sorted(t.strip("<|>") for t in lang_to_id)
        raise ValueError(
            f"unknown language {language!r} for this model; pass one of the codes {', '.join(codes)} "
            "(or the language's English name, e.g. 'german')"
        )
    return int(lang_to_id[token])


def decoding_options(
    model,
    language: str | None = None,
    task: str = "transcribe",
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> DecodingOptions:
    """Build `DecodingOptions` from a Whisper model's ``generation_config``.

    Args:
        model: a transformers ``WhisperForConditionalGeneration`` (or anything with a Whisper
            ``generation_config``).
        language: for multilingual models, required: a code ("en"), an English name ("english")
            or a token ("<|en|>"); language detection is not implemented. English-only models accept
            only None / "en" / "english".
        task: "transcribe" or "translate" (multilingual models only).
        max_new_tokens: hard cap on generated tokens per utterance.
    Returns:
        the options; ``prompt_ids`` ends with ``<|notimestamps|>`` when the config defines it.
    """
    gen = getattr(model, "generation_config", None)
    if gen is None or getattr(gen, "decoder_start_token_id", None) is None:
        raise ValueError(
            "model has no generation_config with decoder_start_token_id; load the model with its Whisper "
            "generation_config.json (torch_myqasr.models.load_whisper does) or set model.generation_config"
        )
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; Whisper's tasks are {TASKS}")
    if getattr(gen, "eos_token_id", None) is None:
        raise ValueError("generation_config.eos_token_id is not set; Whisper needs <|endoftext|> to stop")

    prompt = [int(gen.decoder_start_token_id)]
    multilingual = bool(getattr(gen, "is_multilingual", False))
    if multilingual:
        lang_to_id = getattr(gen, "lang_to_id", None)
        task_to_id = getattr(gen, "task_to_id", None)
        if not lang_to_id or not task_to_id:
            raise ValueError("generation_config says is_multilingual but lacks lang_to_id / task_to_id; update the config")
        if language is None:
            raise ValueError(
                "this model is multilingual: pass language= (e.g. 'en'); automatic language detection is not implemented"
            )
        prompt += [_language_token(language, lang_to_id), int(task_to_id[task])]
    else:
        if language is not None and language.strip().lower() not in ("en", "english", "<|en|>"):
            raise ValueError(
                f"this model is English-only; it cannot transcribe language {language!r} (use a multilingual model)"
            )
        if task != "transcribe":
            raise ValueError(f"this model is English-only; task {task!r} needs a multilingual model")

    no_timestamps = getattr(gen, "no_timestamps_token_id", None)
    if no_timestamps is not None:
        prompt.append(int(no_timestamps))

    eos = gen.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    return DecodingOptions(
        prompt_ids=tuple(prompt),
        eos_token_id=int(eos),
        suppress_tokens=tuple(getattr(gen, "suppress_tokens", None) or ()),
        begin_suppress_tokens=tuple(getattr(gen, "begin_suppress_tokens", None) or ()),
        max_new_tokens=max_new_tokens,
    )


__all__ = ["DEFAULT_MAX_NEW_TOKENS", "DecodingOptions", "decoding_options"]
