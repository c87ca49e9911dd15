"""Export-friendly Whisper wrappers: an encoder that also projects the cross-attention K/V once per
utterance, and a decoder step with a static self-attention KV cache.

Parameter names equal the Hugging Face model's
-------------------------------------------------
Both wrappers register the *same* ``nn.Module`` objects as ``WhisperForConditionalGeneration``
under the *same* dotted paths (``model.encoder.layers.0.fc1``, ``model.decoder.layers.3.self_attn.q_proj``,
``proj_out``...), so a per-layer scheme keyed by HF module names applies to the exported graphs
(``nn_module_stack`` and parameter targets) without renaming. Each wrapper holds only the modules its
graph uses (``_mirror``): ``torch.export`` keeps *every* registered parameter as a graph input even
when unused, so a wrapper holding the whole ``hf.model`` would carry the decoder's weights in the
encoder program and the encoder's in the decoder-step program (twice the artifact size). The
modules are shared, not copied: quantizing or editing the HF model changes the wrappers too.

Why the KV cache is explicit tensors, and why the step returns only the new rows
----------------------------------------------------------------------------------
The cache is passed in as plain tensors and the graph never mutates anything:

* PT2E (``prepare_pt2e`` / ``convert_pt2e``) and the lowering passes see a purely functional ATen
  graph; no buffer mutations or ``copy_`` epilogues that a pass could reorder or drop.
* ``torch.compile`` gets no input mutation either, and the batch can stay dynamic (a cache held in
  module buffers would freeze the batch size and make the module stateful).
* The step returns only the K/V rows of the new tokens (``[layers, B, heads, T, head_dim]``); the
  generation loop writes them into its cache in place (a slice assignment of T rows). Returning a
  whole "updated cache" would force an out-of-place copy of all ``max_cache_len`` rows of every layer
  on every step. Attention reads the cache without concatenating it to the new rows: the scores
  against the cache and against the new tokens are computed separately, masked (cache rows at or
  after ``position`` are not valid yet; new tokens are causal among themselves) and normalised by one
  softmax over both, which is exactly attention over the concatenation.

Checked: ``prepare_pt2e`` / ``convert_pt2e`` on the decoder-step program (tests/test_export.py) and
``torch.compile`` of ``ExportedProgram.module()`` on CPU give the eager tokens. The tied
``proj_out.weight`` / ``embed_tokens.weight`` is one graph input feeding both ``aten.embedding`` and
the ``proj_out`` linear: quantizing the linear leaves the float tensor in place for the embedding.

Shapes (``Ld`` decoder layers, ``H`` heads, ``D = d_model / H``, ``S = 1500`` encoder frames,
``L = max_cache_len``, ``T`` new tokens in this call, ``V`` vocabulary):

* encoder: ``input_features [B, n_mels, 3000] -> (hidden [B, S, d_model], cross_k [Ld, B, H, S, D], cross_v)``
* decoder step: ``(input_ids [B, T] int64, position [] int64, self_k [Ld, B, H, L, D], self_v,
  cross_k, cross_v) -> (logits [B, T, V], new_k [Ld, B, H, T, D], new_v)``
"""

from __future__ import annotations

import torch
from torch import nn


def _check_whisper(model: nn.Module) -> None:
    """Raise a clear error unless ``model`` looks like a ``WhisperForConditionalGeneration``."""
    if not (hasattr(model, "model") and hasattr(model, "proj_out") and hasattr(model.model, "decoder")):
        hint = " (pass bundle.model, not the bundle)" if hasattr(model, "model") and hasattr(model, "tokenizer") else ""
        raise TypeError(
            f"expected a transformers WhisperForConditionalGeneration (with .model.encoder, .model.decoder and "
            f".proj_out), got {type(model).__name__}{hint}"
        )


def _mirror(root: nn.Module, paths: list[str]) -> nn.Module:
    """A tree of plain container modules holding ``root``'s submodules at ``paths``, under the same names.

    ``_mirror(hf, ["model.encoder"]).model.encoder is hf.model.encoder``; intermediate levels
    (``model``, ``model.decoder.layers``...) are empty ``nn.Module`` containers, so only the listed
    modules' parameters are registered. Containers named by digits (list indices) are ``nn.ModuleDict``
    so forward code can index them with ``[str(i)]``.
    """
    mirror = nn.Module()
    for path in paths:
        source: nn.Module = root
        target: nn.Module = mirror
        parts = path.split(".")
        for depth, name in enumerate(parts):
            source = getattr(source, name) if not name.isdigit() else source[int(name)]
            if depth == len(parts) - 1:
                target.add_module(name, source)
                break
            child = target._modules.get(name)
            if child is None:
                next_is_index = parts[depth + 1].isdigit()
                child = nn.ModuleDict() if next_is_index else nn.Module()
                target.add_module(name, child)
            target = child
    return mirror


class WhisperEncoderExport(nn.Module):
    """Whisper encoder plus the cross-attention K/V of every decoder layer, computed once per utterance.

    Submodules: ``model.encoder`` and ``model.decoder.layers.{i}.encoder_attn.{k_proj,v_proj}`` of the
    HF model (the same objects, same names).
    """

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        _check_whisper(hf_model)
        config = hf_model.config
        self.num_layers: int = config.decoder_layers
        self.num_heads: int = config.decoder_attention_heads
        self.head_dim: int = config.d_model // config.decoder_attention_heads
        paths = ["model.encoder"]
        for i in range(self.num_layers):
            paths += [f"model.decoder.layers.{i}.encoder_attn.k_proj", f"model.decoder.layers.{i}.encoder_attn.v_proj"]
        self.model = _mirror(hf_model, paths).model

    def forward(self, input_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode log-mel features.

        Args:
            input_features: ``[B, n_mels, 3000]`` log-mel spectrogram (Whisper's 30 s window, 10 ms hop).
        Returns:
            ``hidden [B, 1500, d_model]`` (encoder output after its final layer norm),
            ``cross_k`` and ``cross_v`` ``[decoder_layers, B, heads, 1500, head_dim]``: the decoder's
            cross-attention keys and values (``k_proj`` has no bias, as in HF).
        """
        hidden = self.model.encoder(input_features).last_hidden_state
        batch, frames, _ = hidden.shape
        keys, values = [], []
        for i in range(self.num_layers):
            attn = self.model.decoder.layers[str(i)].encoder_attn
            keys.append(attn.k_proj(hidden).view(batch, frames, self.num_heads, self.head_dim).transpose(1, 2))
            values.append(attn.v_proj(hidden).view(batch, frames, self.num_heads, self.head_dim).transpose(1, 2))
        return hidden, torch.stack(keys), torch.stack(values)


class WhisperDecoderStep(nn.Module):
    """One decoder call over ``T >= 1`` new tokens with a static self-attention cache of ``L`` rows.

    Submodules (same objects and names as the HF model): ``model.decoder.embed_tokens``,
    ``model.decoder.embed_positions``, ``model.decoder.layer_norm``, ``proj_out`` (tied to the token
    embedding) and, per layer, ``self_attn``, ``self_attn_layer_norm``, ``encoder_attn.{q_proj,out_proj}``,
    ``encoder_attn_layer_norm``, ``fc1``, ``fc2``, ``final_layer_norm``, ``activation_fn``.
    Any ``L`` works in eager mode; the exported program fixes it (see `export_whisper`).
    """

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        _check_whisper(hf_model)
        config = hf_model.config
        self.num_layers: int = config.decoder_layers
        self.num_heads: int = config.decoder_attention_heads
        self.head_dim: int = config.d_model // config.decoder_attention_heads
        self.scaling: float = self.head_dim**-0.5
        paths = ["model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.layer_norm"]
        per_layer = [
            "self_attn", "self_attn_layer_norm", "encoder_attn.q_proj", "encoder_attn.out_proj",
            "encoder_attn_layer_norm", "fc1", "fc2", "final_layer_norm", "activation_fn",
        ]  # fmt: skip
        for i in range(self.num_layers):
            paths += [f"model.decoder.layers.{i}.{name}" for name in per_layer]
        mirror = _mirror(hf_model, paths + ["proj_out"])
        self.model = mirror.model
        self.proj_out = mirror.proj_out

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, d_model] -> [B, H, T, D]."""
        batch, tokens, _ = x.shape
        return x.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, T, D] -> [B, T, d_model]."""
        batch, _, tokens, _ = x.shape
        return x.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)

    def forward(
        self,
        input_ids: torch.Tensor,
        position: torch.Tensor,
        self_k: torch.Tensor,
        self_v: torch.Tensor,
        cross_k: torch.Tensor,
        cross_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits for ``T`` new tokens and their self-attention K/V rows.

        Args:
            input_ids: ``[B, T]`` int64 token ids placed at positions ``position .. position+T-1``.
            position: 0-d int64 tensor, the cache row (= decoder position) of ``input_ids[:, 0]``;
                cache rows ``< position`` must hold the K/V of the earlier tokens.
            self_k, self_v: ``[layers, B, H, L, D]`` self-attention cache; only rows ``< position`` are read.
            cross_k, cross_v: ``[layers, B, H, 1500, D]`` from `WhisperEncoderExport`.
        Returns:
            ``logits [B, T, vocab]`` and ``new_k``, ``new_v [layers, B, H, T, D]``: the rows the
            caller must write at ``position .. position+T-1`` of ``self_k`` / ``self_v``.
        """
        decoder = self.model.decoder
        tokens = input_ids.shape[1]
        cache_len = self_k.shape[3]
        offsets = torch.arange(tokens, device=input_ids.device)
        hidden = decoder.embed_tokens(input_ids) + decoder.embed_positions.weight[position + offsets]

        # Masks shared by every layer: cache rows before `position` are valid; new tokens are causal.
        cache_valid = torch.arange(cache_len, device=input_ids.device) < position  # [L]
        causal = offsets[:, None] >= offsets[None, :]  # [T, T]

        new_keys, new_values = [], []
        for i in range(self.num_layers):
            layer = decoder.layers[str(i)]
            attn = layer.self_attn
            residual = hidden
            x = layer.self_attn_layer_norm(hidden)
            # HF scales q before the product (and attends with scaling=1.0); same order, same rounding.
            q = self._heads(attn.q_proj(x) * self.scaling)
            k = self._heads(attn.k_proj(x))
            v = self._heads(attn.v_proj(x))
            new_keys.append(k)
            new_values.append(v)
            scores_cache = torch.matmul(q, self_k[i].transpose(-1, -2)).masked_fill(~cache_valid, float("-inf"))
            scores_new = torch.matmul(q, k.transpose(-1, -2)).masked_fill(~causal, float("-inf"))
            probs = torch.softmax(torch.cat([scores_cache, scores_new], dim=-1), dim=-1)
            out = torch.matmul(probs[..., :cache_len], self_v[i]) + torch.matmul(probs[..., cache_len:], v)
            hidden = residual + attn.out_proj(self._merge(out))

            cross = layer.encoder_attn
            residual = hidden
            x = layer.encoder_attn_layer_norm(hidden)
            q = self._heads(cross.q_proj(x) * self.scaling)
            probs = torch.softmax(torch.matmul(q, cross_k[i].transpose(-1, -2)), dim=-1)
            hidden = residual + cross.out_proj(self._merge(torch.matmul(probs, cross_v[i])))

            residual = hidden
            x = layer.final_layer_norm(hidden)
            hidden = residual + layer.fc2(layer.activation_fn(layer.fc1(x)))

        logits = self.proj_out(decoder.layer_norm(hidden))
        return logits, torch.stack(new_keys), torch.stack(new_values)
