"""Batched greedy transcription and per-speaker WER evaluation of a Whisper model.

Decoding is capped per batch at a number of new tokens proportional to the audio length: Whisper
loops forever on robotic speech, and an uncapped loop would run to the 448-token context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

SAMPLE_RATE = 16_000
MAX_SECONDS = 30.0  # Whisper's window; longer clips would be silently cut by the featuriser
TOKENS_PER_SECOND_CAP = 8  # fast read speech is ~4 tokens/s; twice that is never a real transcript
MIN_NEW_TOKENS_CAP = 16

DecodeFn = Callable[[torch.Tensor, int, "str | None"], list[list[int]]]
"""(input_features [B, n_mels, 3000], max_new_tokens, language) -> generated token ids per row."""


def max_new_tokens_for(seconds: float) -> int:
    """Cap on generated tokens for a clip of ``seconds`` seconds (see TOKENS_PER_SECOND_CAP)."""
    return int(MIN_NEW_TOKENS_CAP + TOKENS_PER_SECOND_CAP * seconds)


def check_language(bundle, language: str | None) -> None:
    """Refuse a non-English language for an English-only model, naming the fix."""
    if not bundle.is_multilingual and language not in (None, "en", "english"):
        raise ValueError(
            f"model {bundle.model_id} is English-only; it cannot transcribe language {language!r}: "
            "use a multilingual model such as --model base"
        )


def hf_generate_decoder(bundle) -> DecodeFn:
    """A `DecodeFn` that runs transformers' own greedy ``generate`` on ``bundle.model``."""
    model = bundle.model
    if model is None:
        raise ValueError(f"{bundle.model_id} is loaded without weights (a deployed artifact's front end); pass decode=")
    special = set(bundle.tokenizer.all_special_ids)

    @torch.inference_mode()
    def decode(features: torch.Tensor, max_new_tokens: int, language: str | None) -> list[list[int]]:
        kwargs: dict = {"do_sample": False, "num_beams": 1, "return_timestamps": False}
        if bundle.is_multilingual:
            kwargs.update(language=language or "en", task="transcribe")
        out = model.generate(features, max_new_tokens=max_new_tokens, **kwargs)
        seqs = out if isinstance(out, torch.Tensor) else out["sequences"]
        return [[t for t in row.tolist() if t not in special] for row in seqs]

    return decode


def featurize(bundle, audios: Sequence[np.ndarray]) -> torch.Tensor:
    """Log-mel features [B, n_mels, 3000] for 16 kHz mono float32 clips of at most 30 s."""
    for i, a in enumerate(audios):
        if len(a) > MAX_SECONDS * SAMPLE_RATE:
            raise ValueError(
                f"clip {i} is {len(a) / SAMPLE_RATE:.1f} s long; Whisper transcribes at most {MAX_SECONDS:.0f} s "
                "at a time: split the audio into shorter clips"
            )
    feats = bundle.feature_extractor(
        list(audios), sampling_rate=SAMPLE_RATE, return_tensors="pt"
    ).input_features
    # a front-end-only bundle (a deployed artifact) feeds float32 programs
    return feats if bundle.model is None else feats.to(next(bundle.model.parameters()).dtype)


def transcribe(
    bundle,
    audios: Sequence[np.ndarray],
    *,
    language: str | None = None,
    batch_size: int = 8,
    decode: DecodeFn | None = None,
    progress: bool = True,
) -> list[str]:
    """Greedy transcripts of 16 kHz mono clips, in order.

    ``decode`` chooses how tokens are produced (default: transformers' generate on the float
    model; the quantized pipeline passes its exported/compiled decoder loop instead).
    """
    check_language(bundle, language)
    decode = decode or hf_generate_decoder(bundle)
    order = sorted(range(len(audios)), key=lambda i: len(audios[i]))  # similar lengths share a cap
    texts: list[str] = [""] * len(audios)
    bar = tqdm(total=len(audios), desc="transcribing", unit="clip", disable=not progress)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = [audios[i] for i in idx]
        cap = max_new_tokens_for(max(len(a) for a in batch) / SAMPLE_RATE)
        for i, ids in zip(idx, decode(featurize(bundle, batch), cap, language)):
            texts[i] = bundle.tokenizer.decode(ids, skip_special_tokens=True).strip()
        bar.update(len(idx))
    bar.close()
    return texts


@dataclass
class Evaluation:
    """Transcripts and WER of one model on one dataset.

    ``records`` has one dict per utterance (utterance, reference, hypothesis, raw_hypothesis);
    ``wer`` is the aggregate from `aggregate_wer` (overall / by_speaker / by_gender / by_language).
    """

    records: list[dict]
    wer: dict


def evaluate(
    bundle,
    dataset,
    *,
    language: str | None = None,
    batch_size: int = 8,
    decode: DecodeFn | None = None,
    progress: bool = True,
    on_error: str = "raise",
) -> Evaluation:
    """Transcribe every utterance of ``dataset`` and compute WER overall and per speaker/gender/language.

    Utterances without a transcript are an error (evaluation needs references); use `transcribe`
    for unlabelled audio. References and hypotheses are normalised with Whisper's English
    normaliser for English and the basic normaliser otherwise.
    """
    from torch_myqasr.audio import load_dataset_audio
    from torch_myqasr.evaluation.normalize import normalize_text
    from torch_myqasr.evaluation.wer import aggregate_wer

    missing = [u.id for u in dataset if u.text is None]
    if missing:
        raise ValueError(
            f"{len(missing)} utterances have no transcript (e.g. {missing[:3]}); WER needs references: "
            "use a LibriSpeech tree or a JSONL manifest with a 'text' field, or `myqasr transcribe` for unlabelled audio"
        )
    pairs = list(load_dataset_audio(dataset, on_error=on_error))
    # A multilingual model is told each utterance's language, so transcribe one language at a time.
    langs = [language or u.language or "en" for u, _ in pairs]
    hyps: list[str] = [""] * len(pairs)
    for lang in sorted(set(langs)):
        idx = [i for i, l in enumerate(langs) if l == lang]
        texts = transcribe(
            bundle,
            [pairs[i][1] for i in idx],
            language=lang if bundle.is_multilingual else None,
            batch_size=batch_size,
            decode=decode,
            progress=progress,
        )
        for i, t in zip(idx, texts):
            hyps[i] = t
    records = []
    for (u, _), h, lang in zip(pairs, hyps, langs):
        records.append(
            {
                "utterance": u,
                "reference": normalize_text(u.text, lang),
                "hypothesis": normalize_text(h, lang),
                "raw_hypothesis": h,
            }
        )
    return Evaluation(records, aggregate_wer(records))
