"""Batched greedy decoding driven by an encoder callable and a decoder-step callable.

The callables only need the signatures of `WhisperEncoderExport` and `WhisperDecoderStep`: the
eager wrappers, ``ExportedProgram.module()``, a PT2E-converted GraphModule or a ``torch.compile``d
module all work. Per step the loop costs one decoder call, two in-place slice writes into the cache
and one host sync (the "all rows finished?" check); everything else stays on the device.
"""

from __future__ import annotations

from typing import Callable

import torch

from torch_myqasr.export.options import DecodingOptions

EncoderFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""input_features [B, n_mels, 3000] -> (hidden, cross_k, cross_v); see `WhisperEncoderExport`."""

DecoderStepFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""(input_ids, position, self_k, self_v, cross_k, cross_v) -> (logits, new_k, new_v); see `WhisperDecoderStep`."""


def _token_mask(ids: tuple[int, ...], vocab: int, device: torch.device, what: str) -> torch.Tensor | None:
    """Bool [vocab] mask with True at ``ids`` (None when ``ids`` is empty)."""
    if not ids:
        return None
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(
            f"{what} {bad[:5]} are outside the model's vocabulary of {vocab} tokens; fix DecodingOptions.{what}"
        )
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    mask[list(ids)] = True
    return mask


def required_cache_len(options: DecodingOptions) -> int:
    """Cache rows (decoder positions) `greedy_decode` uses: the prompt plus ``max_new_tokens - 1``.

    The last generated token is never fed back, so it needs no cache row.
    """
    return len(options.prompt_ids) + options.max_new_tokens - 1


@torch.no_grad()
def greedy_decode(
    encoder: EncoderFn,
    decoder_step: DecoderStepFn,
    input_features: torch.Tensor,
    options: DecodingOptions,
    *,
    max_cache_len: int | None = None,
) -> list[list[int]]:
    """Greedy token ids per row, without the prompt and without eos.

    Follows transformers' Whisper ``generate`` (greedy, no timestamps): ``suppress_tokens`` are
    masked at every step, ``begin_suppress_tokens`` at the first generated step; a row stops at
    eos (it keeps emitting eos, masked from the result, until every row is done) or after
    ``options.max_new_tokens`` tokens.

    Args:
        encoder: callable like `WhisperEncoderExport`.
        decoder_step: callable like `WhisperDecoderStep`.
        input_features: ``[B, n_mels, 3000]`` log-mel features on the model's device and dtype.
        options: prompt, eos, suppression and cap (see `decoding_options`).
        max_cache_len: rows of the self-attention cache to allocate. Exported decoder programs fix
            this (pass ``ExportedWhisper.max_cache_len``, or use ``ExportedWhisper.greedy_decode``);
            default: just enough for ``options`` (`required_cache_len`), fine for eager wrappers.
    Returns:
        ``B`` lists of generated token ids.
    """
    needed = required_cache_len(options)
    cache_len = needed if max_cache_len is None else max_cache_len
    if cache_len < needed:
        raise ValueError(
            f"a prompt of {len(options.prompt_ids)} tokens plus max_new_tokens={options.max_new_tokens} needs "
            f"{needed} cache rows but the cache has {cache_len}; lower max_new_tokens or export with a larger max_cache_len"
        )

    _, cross_k, cross_v = encoder(input_features)
    layers, batch, heads, _, head_dim = cross_k.shape
    device = cross_k.device
    self_k = cross_k.new_zeros(layers, batch, heads, cache_len, head_dim)
    self_v = torch.zeros_like(self_k)
    # Positions as views into one device tensor: no host-to-device copy per step.
    positions = torch.arange(cache_len, device=device)

    eos = options.eos_token_id
    generated = torch.full((batch, options.max_new_tokens), eos, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    input_ids = torch.tensor(options.prompt_ids, dtype=torch.long, device=device).expand(batch, -1).contiguous()
    suppress = begin_suppress = None
    position = 0
    for step in range(options.max_new_tokens):
        try:
            logits, new_k, new_v = decoder_step(input_ids, positions[position], self_k, self_v, cross_k, cross_v)
        except Exception as err:
            if step == 0:  # shape guards of exported programs fail here; say what usually causes it
                raise RuntimeError(
                    f"decoder_step failed on its first call (batch {batch}, {input_ids.shape[1]} prompt tokens, "
                    f"cache of {cache_len} rows); for an exported program pass max_cache_len=ExportedWhisper.max_cache_len "
                    "and a batch size it was exported for"
                ) from err
            raise
        tokens = input_ids.shape[1]
        self_k[:, :, :, position : position + tokens] = new_k
        self_v[:, :, :, position : position + tokens] = new_v
        position += tokens

        scores = logits[:, -1, :]
        if step == 0:
            vocab = scores.shape[-1]
            suppress = _token_mask(options.suppress_tokens, vocab, device, "suppress_tokens")
            begin_suppress = _token_mask(options.begin_suppress_tokens, vocab, device, "begin_suppress_tokens")
            if begin_suppress is not None:
                scores = scores.masked_fill(begin_suppress, float("-inf"))
        if suppress is not None:
            scores = scores.masked_fill(suppress, float("-inf"))
        next_ids = torch.where(finished, eos, scores.argmax(dim=-1))
        generated[:, step] = next_ids
        finished |= next_ids == eos
        if step + 1 == options.max_new_tokens or bool(finished.all()):  # the one host sync per step
            break
        input_ids = next_ids[:, None]

    results = []
    for row in generated.tolist():
        results.append(row[: row.index(eos)] if eos in row else row)
    return results
