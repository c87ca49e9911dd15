"""``torch.export`` of the Whisper wrappers: `export_whisper` -> `ExportedWhisper`.

Both programs are plain ATen graphs (non-strict export, no decompositions run), ready for
``prepare_pt2e`` / ``convert_pt2e``, the lowering pass and ``torch.compile``.

Dynamic shapes: the batch is dynamic in both programs unless ``batch_size`` is given (then it is
fixed); the number of tokens per decoder call ``T`` is dynamic (1 .. max_cache_len) so the whole
prompt goes in one call. The mel length (3000 frames), the cache length ``max_cache_len`` and all
model dimensions are static: a fixed cache keeps ``torch.compile`` from recompiling when the cap on
new tokens changes between batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from torch_myqasr.export.greedy import greedy_decode
from torch_myqasr.export.modules import WhisperDecoderStep, WhisperEncoderExport, _check_whisper
from torch_myqasr.export.options import DecodingOptions

# Dynamic batch sizes are traced with this example: torch.export specialises a dimension traced at
# size 1, so a dynamic batch must be traced at >= 2.
_EXAMPLE_DYNAMIC_BATCH = 2
_EXAMPLE_TOKENS = 2  # same reason for the token axis


@dataclass
class ExportedWhisper:
    """The exported encoder and decoder step plus what the generation loop needs.

    Attributes:
        encoder: program of `WhisperEncoderExport` (``input_features -> hidden, cross_k, cross_v``).
        decoder_step: program of `WhisperDecoderStep`.
        config: the model's ``WhisperConfig``.
        generation_config: the model's generation config (for `decoding_options`).
        max_cache_len: self-attention cache rows the decoder program requires (static).
        batch_size: the fixed batch size, or None when the batch is dynamic.
        num_frames: mel frames per input (3000 = 30 s).
        cache_shape: ``(layers, heads, head_dim)`` of both caches, batch and length left out.
    """

    encoder: ExportedProgram
    decoder_step: ExportedProgram
    config: Any
    generation_config: Any
    max_cache_len: int
    batch_size: int | None
    num_frames: int
    cache_shape: tuple[int, int, int]

    def modules(self) -> tuple[nn.Module, nn.Module]:
        """Fresh callable ``(encoder, decoder_step)`` GraphModules (``ExportedProgram.module()``)."""
        return self.encoder.module(), self.decoder_step.module()

    def greedy_decode(
        self,
        input_features: torch.Tensor,
        options: DecodingOptions,
        modules: tuple[nn.Module, nn.Module] | None = None,
    ) -> list[list[int]]:
        """`greedy_decode` with this export's cache length.

        Args:
            input_features: ``[B, n_mels, 3000]`` log-mel features.
            options: see `decoding_options`.
            modules: ``(encoder, decoder_step)`` callables to run instead of the exported programs
                (e.g. PT2E-converted or compiled versions); default `modules`.
        Returns:
            generated token ids per row, without prompt and eos.
        """
        if self.batch_size is not None and input_features.shape[0] != self.batch_size:
            raise ValueError(
                f"these programs were exported for a fixed batch of {self.batch_size} but got {input_features.shape[0]} "
                "rows; split the input or export with batch_size=None (dynamic batch)"
            )
        encoder, decoder_step = modules if modules is not None else self.modules()
        return greedy_decode(encoder, decoder_step, input_features, options, max_cache_len=self.max_cache_len)


def export_whisper(
    model: nn.Module,
    *,
    max_cache_len: int | None = None,
    batch_size: int | None = None,
) -> ExportedWhisper:
    """Export a ``WhisperForConditionalGeneration`` as an encoder program and a decoder-step program.

    Args:
        model: the HF model (eval mode is set; weights are shared with the programs' modules).
        max_cache_len: decoder positions the cache holds (prompt + generated tokens - 1); default and
            maximum ``config.max_target_positions`` (448 for Whisper).
        batch_size: fix the batch to this size; None (default) exports a dynamic batch (1 .. 1024).
    Returns:
        the `ExportedWhisper`.
    """
    _check_whisper(model)
    config = model.config
    limit = int(config.max_target_positions)
    max_cache_len = limit if max_cache_len is None else int(max_cache_len)
    if not 1 <= max_cache_len <= limit:
        raise ValueError(
            f"max_cache_len={max_cache_len} must be between 1 and the model's max_target_positions={limit} "
            "(Whisper has no position embeddings beyond that)"
        )
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None (dynamic), got {batch_size}")
    model.eval()

    encoder = WhisperEncoderExport(model).eval()
    decoder = WhisperDecoderStep(model).eval()
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    num_frames = int(config.max_source_positions) * 2  # conv2 has stride 2
    layers, heads, head_dim = decoder.num_layers, decoder.num_heads, decoder.head_dim
    example_batch = batch_size or _EXAMPLE_DYNAMIC_BATCH

    features = torch.zeros(example_batch, config.num_mel_bins, num_frames, dtype=dtype, device=device)
    batch_dim = None if batch_size else Dim("batch", min=1, max=1024)
    with torch.no_grad():
        encoder_program = torch.export.export(
            encoder, (features,), dynamic_shapes=({0: batch_dim},) if batch_dim else None, strict=False
        )
        _, cross_k, cross_v = encoder(features)

    tokens = min(_EXAMPLE_TOKENS, max_cache_len)
    input_ids = torch.zeros(example_batch, tokens, dtype=torch.long, device=device)
    position = torch.tensor(0, dtype=torch.long, device=device)
    self_k = torch.zeros(layers, example_batch, heads, max_cache_len, head_dim, dtype=dtype, device=device)
    token_dim = Dim("tokens", min=1, max=max_cache_len) if max_cache_len > 1 else None
    input_ids_dims: dict[int, Any] = {1: token_dim} if token_dim is not None else {}
    cache_dims: dict[int, Any] = {}
    if batch_dim is not None:
        input_ids_dims[0] = batch_dim
        cache_dims[1] = batch_dim
    dynamic = (input_ids_dims or None, None, cache_dims or None, cache_dims or None, cache_dims or None, cache_dims or None)
    with torch.no_grad():
        decoder_program = torch.export.export(
            decoder,
            (input_ids, position, self_k, self_k.clone(), cross_k, cross_v),
            dynamic_shapes=dynamic if any(d is not None for d in dynamic) else None,
            strict=False,
        )
    return ExportedWhisper(
        encoder=encoder_program,
        decoder_step=decoder_program,
        config=config,
        generation_config=getattr(model, "generation_config", None),
        max_cache_len=max_cache_len,
        batch_size=batch_size,
        num_frames=num_frames,
        cache_shape=(layers, heads, head_dim),
    )
