"""Personalise Whisper for one user and one budget: export, calibrate on unlabelled clips, quantize.

This is the PT2E flow of the architecture in one function::

    export_whisper -> prepare_pt2e(encoder, q), prepare_pt2e(decoder_step, q)   # one MyQASRQuantizer
      -> greedy decoding of the user's clips through both (label-free calibration)
      -> convert_pt2e of both (the scheme is decided at the first convert)

Only audio is read during calibration, never a transcript: the decoder sees the tokens the model
itself produces, as it will in deployment.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from torch_myqasr.allocation import DEFAULT_FORMATS, Scheme
from torch_myqasr.evaluation.transcribe import (
    MAX_SECONDS,
    SAMPLE_RATE,
    DecodeFn,
    check_language,
    featurize,
    max_new_tokens_for,
)
from torch_myqasr.export import ExportedWhisper, decoding_options, export_whisper, greedy_decode

# Static decoder cache: the English prompt (<|sot|><|notimestamps|>) or the multilingual one (4
# tokens) plus the longest capped transcript of a 30 s clip. A fixed length keeps torch.compile from
# recompiling when the cap changes between batches.
MAX_PROMPT_TOKENS = 4
MAX_CACHE_LEN = MAX_PROMPT_TOKENS + max_new_tokens_for(MAX_SECONDS)

KEEP_FULL_PRECISION_DEFAULT = ("*embed_positions",)
"""Positional tables are lookups of a few rows per step: quantizing them saves little and costs accuracy."""


@dataclass
class QuantizedWhisper:
    """A personalised Whisper: the converted PT2E programs plus the scheme that made them.

    Attributes:
        bundle: the full-precision model, tokenizer and feature extractor it came from.
        exported: the exported (unquantized) programs and their shapes.
        encoder, decoder_step: the converted GraphModules (dequantize -> linear patterns).
        scheme: the per-layer choice, budget and calibration summary.
    """

    bundle: object
    exported: ExportedWhisper
    encoder: torch.nn.Module
    decoder_step: torch.nn.Module
    scheme: Scheme
    extra: dict = field(default_factory=dict)

    def decoder(self) -> DecodeFn:
        """A `DecodeFn` (see evaluation.transcribe) that decodes greedily through the quantized programs."""
        return exported_decoder(self.bundle, self.exported.max_cache_len, (self.encoder, self.decoder_step))


def exported_decoder(bundle, max_cache_len: int, modules: tuple) -> DecodeFn:
    """A `DecodeFn` running `greedy_decode` through ``modules`` = (encoder, decoder_step) callables
    exported with a ``max_cache_len``-row self-attention cache."""
    encoder, decoder_step = modules

    def decode(features: torch.Tensor, max_new_tokens: int, language: str | None) -> list[list[int]]:
        options = decoding_options(
            bundle,  # anything with a generation_config: a front-end-only bundle too
            language=(language or "en") if bundle.is_multilingual else None,
            max_new_tokens=min(max_new_tokens, max_cache_len - MAX_PROMPT_TOKENS + 1),
        )
        return greedy_decode(encoder, decoder_step, features, options, max_cache_len=max_cache_len)

    return decode


def calibration_summary(audios: Sequence[np.ndarray]) -> dict:
    """Number of clips, seconds of audio and a sha256 of the samples (float32, in order)."""
    h = hashlib.sha256()
    for a in audios:
        h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
    return {
        "n_clips": len(audios),
        "seconds": round(float(sum(len(a) for a in audios)) / SAMPLE_RATE, 3),
        "audio_sha256": h.hexdigest(),
    }


def quantize_whisper(
    bundle,
    calib_audios: Sequence[np.ndarray] | None = None,
    *,
    budget_mb: float | None = None,
    scheme: Scheme | None = None,
    strategy: str = "myqasr",
    formats: Iterable[str] = DEFAULT_FORMATS,
    group_size: int = 64,
    score: str = "median",
    order: str | None = None,
    keep_full_precision: Iterable = KEEP_FULL_PRECISION_DEFAULT,
    language: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> QuantizedWhisper:
    """Quantize ``bundle.model`` to ``budget_mb`` MiB from unlabelled 16 kHz clips, or replay ``scheme``.

    With ``budget_mb``: the clips are decoded greedily through the prepared programs (label-free
    calibration) and the scheme is decided by ``strategy`` from the ``score`` statistics. With
    ``scheme``: the saved per-layer formats and clip ratios are applied and no clips are needed.
    ``language`` is the clips' language for multilingual models (default English).
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from torch_myqasr.quantizer import MyQASRQuantizer

    if scheme is None and not calib_audios:
        raise ValueError(
            "calibration needs at least one clip of the user's audio (unlabelled is fine); "
            "pass calib_audios, or scheme= to replay a saved scheme"
        )
    check_language(bundle, language)
    if scheme is not None:
        q = MyQASRQuantizer(scheme=scheme, keep_full_precision=tuple(keep_full_precision), progress=progress)
    else:
        q = MyQASRQuantizer(
            budget_mb,
            strategy=strategy,
            formats=tuple(formats),
            group_size=group_size,
            score=score,
            order=order,
            keep_full_precision=tuple(keep_full_precision),
            model_id=bundle.model_id,
            progress=progress,
            calibration=calibration_summary(calib_audios),
        )
    exported = export_whisper(bundle.model, max_cache_len=MAX_CACHE_LEN)
    encoder = prepare_pt2e(exported.encoder.module(), q)
    decoder_step = prepare_pt2e(exported.decoder_step.module(), q)
    if scheme is None:
        decode = exported_decoder(bundle, exported.max_cache_len, (encoder, decoder_step))
        order_idx = sorted(range(len(calib_audios)), key=lambda i: len(calib_audios[i]))
        bar = tqdm(total=len(order_idx), desc="calibrating (label-free)", unit="clip", disable=not progress)
        with torch.inference_mode():
            for start in range(0, len(order_idx), batch_size):
                batch = [calib_audios[i] for i in order_idx[start : start + batch_size]]
                cap = max_new_tokens_for(max(len(a) for a in batch) / SAMPLE_RATE)
                decode(featurize(bundle, batch), cap, language)
                bar.update(len(batch))
        bar.close()
    encoder = convert_pt2e(encoder)
    decoder_step = convert_pt2e(decoder_step)
    return QuantizedWhisper(bundle, exported, encoder, decoder_step, q.scheme)


def layer_inventory(bundle, clip: np.ndarray, *, group_size: int = 64) -> Scheme:
    """A scheme that lists every layer the quantizer would allocate (shapes, fixed bytes), all in fp32.

    It is the budget accounting of `quantize_whisper` for ``bundle.model`` without choosing any bits:
    feed it to `torch_myqasr.allocation.uniform_size_mb` / `budget_for_bits` to place budgets. One
    clip is decoded because the quantizer only learns the layers by calibrating.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deliberately above fp32: "nothing needs quantizing"
        probe = quantize_whisper(bundle, [clip], budget_mb=1e9, strategy="uniform", group_size=group_size, progress=False)
    return probe.scheme


SCHEME_FILE = "scheme.json"


def save_quantized(qw: QuantizedWhisper, out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/scheme.json``: with the pinned base model it reproduces ``qw`` exactly.

    The scheme names the model, the per-layer formats and the searched clip ratios, so
    `load_quantized` rebuilds bit-identical weights without the calibration clips.
    """
    from torch_myqasr.allocation import save_scheme

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return save_scheme(qw.scheme, out / SCHEME_FILE)


def is_quantized_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by `save_quantized` (or ``myqasr quantize --out``)."""
    return (Path(path) / SCHEME_FILE).is_file()


def load_quantized(path: str | os.PathLike, *, progress: bool = False) -> QuantizedWhisper:
    """Rebuild the quantized model saved in folder ``path`` (its scheme names the base model)."""
    from torch_myqasr.allocation import load_scheme
    from torch_myqasr.models import load_whisper

    scheme = load_scheme(Path(path) / SCHEME_FILE)
    if not scheme.model_id:
        raise ValueError(f"{Path(path) / SCHEME_FILE} names no model_id; re-run myqasr quantize")
    return quantize_whisper(load_whisper(scheme.model_id), scheme=scheme, progress=progress)


ARTIFACT_DIR = "artifact"


def save_lowered_artifact(
    qw: QuantizedWhisper, out_dir: str | os.PathLike, *, overwrite: bool = True, aot_inductor: bool = False
) -> Path:
    """Lower ``qw``'s converted programs to packed ``myqasr::`` ops and write ``out_dir/artifact``.

    The artifact (docs/artifact.md) loads in a fresh process with only ``import torch_myqasr``
    (`torch_myqasr.artifact.load_artifact`). The converted modules are copied before lowering, so
    ``qw`` still decodes afterwards. ``aot_inductor`` adds AOTInductor packages of the CPU layout
    (minutes of compilation; `torch_myqasr.artifact.aoti`).
    """
    import copy

    from torch_myqasr.artifact import save_artifact
    from torch_myqasr.lowering import lower_quantized

    import tempfile

    from torch_myqasr.models.whisper import save_frontend

    options = decoding_options(qw.bundle, language="en" if qw.bundle.is_multilingual else None)
    info = {
        "model_id": qw.bundle.model_id,
        "max_cache_len": qw.exported.max_cache_len,
        "decoding": options,
        "sampling_rate": SAMPLE_RATE,
    }
    encoder = lower_quantized(copy.deepcopy(qw.encoder))
    decoder_step = lower_quantized(copy.deepcopy(qw.decoder_step))
    with tempfile.TemporaryDirectory() as tmp:  # tokenizer etc. travel in extra/: the artifact is self-contained
        extra = {p.name: p for p in save_frontend(qw.bundle, tmp)}
        return save_artifact(
            Path(out_dir) / ARTIFACT_DIR, encoder, decoder_step, qw.scheme, info, extra_files=extra,
            overwrite=overwrite, aot_inductor=aot_inductor,
        )
