"""Whisper export wrappers, exported programs and the greedy loop against the eager HF model.

Everything runs on a tiny random Whisper (d_model 32, 2+2 layers, 64-token vocabulary); the mel
length stays 3000 frames because Whisper's encoder requires it.
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from torch_myqasr.export import (
    DecodingOptions,
    WhisperDecoderStep,
    WhisperEncoderExport,
    decoding_options,
    export_whisper,
    greedy_decode,
)

VOCAB = 64
EOS = 50
SOT = 51
TRANSCRIBE, TRANSLATE, NO_TIMESTAMPS = 52, 53, 54
LANGS = {"<|en|>": 55, "<|de|>": 56}
SUPPRESS = (5, 6, 60)
BEGIN_SUPPRESS = (7, EOS)
MEL_BINS = 8
CACHE_LEN = 24


def _tiny_whisper(multilingual: bool = False) -> WhisperForConditionalGeneration:
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=MEL_BINS, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=1500, max_target_positions=40,
        pad_token_id=EOS, bos_token_id=EOS, eos_token_id=EOS, decoder_start_token_id=SOT,
        init_std=0.3,  # the default 0.02 makes a random model ignore its input: every row would decode alike
    )  # fmt: skip
    model = WhisperForConditionalGeneration(config).eval()
    gen = model.generation_config
    gen.decoder_start_token_id, gen.eos_token_id, gen.pad_token_id = SOT, EOS, EOS
    gen.no_timestamps_token_id = NO_TIMESTAMPS
    gen.suppress_tokens, gen.begin_suppress_tokens = list(SUPPRESS), list(BEGIN_SUPPRESS)
    gen.is_multilingual = multilingual
    if multilingual:
        gen.lang_to_id = dict(LANGS)
        gen.task_to_id = {"transcribe": TRANSCRIBE, "translate": TRANSLATE}
    return model


@pytest.fixture(scope="module")
def model() -> WhisperForConditionalGeneration:
    return _tiny_whisper()


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, MEL_BINS, 3000)


@pytest.fixture(scope="module")
def exported(model):
    return export_whisper(model, max_cache_len=CACHE_LEN)


@pytest.fixture(scope="module")
def exported_modules(exported):
    return exported.modules()


def _reference_decode(model, features: torch.Tensor, options: DecodingOptions) -> list[list[int]]:
    """Naive greedy loop: full HF decoder forward (no cache) per step, one row at a time.

    The encoder runs once per row (HF's own ``encoder_outputs`` argument) only to keep the test fast.
    """
    results = []
    with torch.no_grad():
        for row in range(features.shape[0]):
            encoded = model.model.encoder(features[row : row + 1])
            ids = list(options.prompt_ids)
            out: list[int] = []
            for step in range(options.max_new_tokens):
                logits = model(
                    encoder_outputs=encoded, decoder_input_ids=torch.tensor([ids]), use_cache=False
                ).logits
                scores = logits[0, -1].clone()
                scores[list(options.suppress_tokens)] = float("-inf")
                if step == 0:
                    scores[list(options.begin_suppress_tokens)] = float("-inf")
                token = int(scores.argmax())
                if token == options.eos_token_id:
                    break
                out.append(token)
                ids.append(token)
            results.append(out)
    return results


def _options(model, max_new_tokens: int = 12) -> DecodingOptions:
    return decoding_options(model, max_new_tokens=max_new_tokens)


@pytest.fixture(scope="module")
def reference(model, features) -> list[list[int]]:
    """`_reference_decode` with the model's own options (12 new tokens), computed once."""
    return _reference_decode(model, features, _options(model))


# --- wrappers and exported programs against the HF model ---------------------------------------


def test_wrapper_parameter_names_are_hf_names(model):
    hf_params = dict(model.named_parameters(remove_duplicate=False))
    for wrapper in (WhisperEncoderExport(model), WhisperDecoderStep(model)):
        for name, param in wrapper.named_parameters(remove_duplicate=False):
            assert name in hf_params, name
            assert param is hf_params[name], f"{name} is a copy, not the HF parameter"
    encoder_names = {n for n, _ in WhisperEncoderExport(model).named_parameters()}
    assert "model.encoder.layers.0.fc1.weight" in encoder_names
    assert "model.decoder.layers.1.encoder_attn.k_proj.weight" in encoder_names
    assert not any(n.startswith("model.decoder.layers.0.fc1") for n in encoder_names), "encoder carries decoder weights"
    decoder_names = {n for n, _ in WhisperDecoderStep(model).named_parameters(remove_duplicate=False)}
    assert {"proj_out.weight", "model.decoder.layers.1.fc2.weight"} <= decoder_names
    assert not any(n.startswith("model.encoder.") or ".encoder_attn.k_proj" in n for n in decoder_names)


def test_exported_graph_linears_carry_hf_module_names(exported):
    names = {
        list(node.meta["nn_module_stack"].values())[-1][0]
        for node in exported.decoder_step.graph.nodes
        if node.target == torch.ops.aten.linear.default
    }
    assert "model.decoder.layers.0.fc1" in names and "proj_out" in names
    assert "model.decoder.layers.1.self_attn.q_proj" in names
    enc_names = {
        list(node.meta["nn_module_stack"].values())[-1][0]
        for node in exported.encoder.graph.nodes
        if node.target == torch.ops.aten.linear.default
    }
    assert {"model.encoder.layers.0.fc1", "model.decoder.layers.1.encoder_attn.v_proj"} <= enc_names


def _decoder_reference(model, features, ids):
    with torch.no_grad():
        return model(input_features=features, decoder_input_ids=ids).logits


@pytest.mark.parametrize("use_export", [False, True], ids=["eager", "exported"])
def test_encoder_and_decoder_step_match_hf(model, features, exported_modules, use_export):
    if use_export:
        encoder, step = exported_modules
    else:
        encoder, step = WhisperEncoderExport(model), WhisperDecoderStep(model)
    batch = features[:2]
    ids = torch.tensor([[SOT, NO_TIMESTAMPS, 3, 9, 11], [SOT, NO_TIMESTAMPS, 4, 8, 12]])
    full = _decoder_reference(model, batch, ids)
    with torch.no_grad():
        hidden, cross_k, cross_v = encoder(batch)
        torch.testing.assert_close(hidden, model.model.encoder(batch).last_hidden_state, atol=1e-5, rtol=1e-5)
        assert cross_k.shape == (2, 2, 4, 1500, 8) and cross_v.shape == cross_k.shape
        attn = model.model.decoder.layers[1].encoder_attn
        torch.testing.assert_close(cross_v[1], attn.v_proj(hidden).view(2, 1500, 4, 8).transpose(1, 2), atol=1e-5, rtol=0)

        self_k = torch.zeros(2, 2, 4, CACHE_LEN, 8)
        self_v = torch.zeros_like(self_k)
        # Stale junk in rows at or after `position` must not leak into attention.
        self_k[:, :, :, 3:] = 100.0
        position = 0
        for chunk in (ids[:, :3], ids[:, 3:4], ids[:, 4:5]):  # a 3-token prompt, then single tokens
            logits, new_k, new_v = step(chunk, torch.tensor(position), self_k, self_v, cross_k, cross_v)
            tokens = chunk.shape[1]
            torch.testing.assert_close(logits, full[:, position : position + tokens], atol=1e-5, rtol=1e-5)
            assert new_k.shape == (2, 2, 4, tokens, 8)
            self_k[:, :, :, position : position + tokens] = new_k
            self_v[:, :, :, position : position + tokens] = new_v
            position += tokens


# --- greedy decoding ----------------------------------------------------------------------------


def test_greedy_eager_wrappers_match_reference(model, features, reference):
    options, expected = _options(model), reference
    assert expected[0] != expected[1] or expected[1] != expected[2], "tiny model ignores its input; test is vacuous"
    got = greedy_decode(WhisperEncoderExport(model), WhisperDecoderStep(model), features, options)
    assert got == expected


def test_greedy_exported_matches_reference_and_hf_generate(model, features, reference, exported, exported_modules):
    options, expected = _options(model), reference
    assert exported.greedy_decode(features, options, modules=exported_modules) == expected
    fresh = _tiny_whisper()  # generate() may edit its generation_config; keep the shared fixture clean
    with torch.no_grad():
        out = fresh.generate(
            features, max_new_tokens=options.max_new_tokens, return_timestamps=False, do_sample=False, num_beams=1
        )
    hf = [[t for t in row if t != EOS] for row in out.tolist()]  # finished rows are padded with eos
    hf = [row[len(options.prompt_ids) :] if row[: len(options.prompt_ids)] == list(options.prompt_ids) else row for row in hf]
    assert hf == expected


def test_batch_rows_stop_at_their_own_eos(model, features, exported, exported_modules):
    # Choose as eos a token whose first occurrence differs between rows, so rows end at different steps.
    free = _reference_decode(model, features, _options(model, max_new_tokens=16))
    eos = next(
        t for t in free[0] if len({row.index(t) if t in row else len(row) for row in free}) > 1 and t not in BEGIN_SUPPRESS
    )
    options = dataclasses.replace(_options(model, max_new_tokens=16), eos_token_id=eos)
    expected = _reference_decode(model, features, options)
    assert len({len(row) for row in expected}) > 1, expected
    assert all(eos not in row for row in expected)
    assert exported.greedy_decode(features, options, modules=exported_modules) == expected
    # Batch results equal one-row-at-a-time results (finished rows are masked, not dropped).
    assert [exported.greedy_decode(features[i : i + 1], options, modules=exported_modules)[0] for i in range(3)] == expected


def test_max_new_tokens_caps_every_row(model, features, exported, exported_modules):
    options = dataclasses.replace(_options(model), eos_token_id=61)  # 61: never produced -> every row hits the cap
    capped = dataclasses.replace(options, max_new_tokens=5)
    got = exported.greedy_decode(features, capped, modules=exported_modules)
    assert [len(row) for row in got] == [5, 5, 5]
    assert got == [row[:5] for row in exported.greedy_decode(features, options, modules=exported_modules)]


def test_suppression_is_applied(model, features):
    encoder, step = WhisperEncoderExport(model), WhisperDecoderStep(model)
    plain = DecodingOptions(prompt_ids=(SOT, NO_TIMESTAMPS), eos_token_id=61, max_new_tokens=6)
    first = greedy_decode(encoder, step, features, plain)
    # Suppress every token the unsuppressed run produced: none may appear again.
    banned = tuple(sorted({t for row in first for t in row}))
    got = greedy_decode(encoder, step, features, dataclasses.replace(plain, suppress_tokens=banned))
    assert all(t not in banned for row in got for t in row)
    begin = greedy_decode(encoder, step, features, dataclasses.replace(plain, begin_suppress_tokens=(first[0][0],)))
    assert begin[0][0] != first[0][0]


def test_cache_too_small_is_a_clear_error(model, features, exported, exported_modules):
    options = _options(model, max_new_tokens=CACHE_LEN)
    with pytest.raises(ValueError, match="cache rows"):
        exported.greedy_decode(features[:1], options, modules=exported_modules)


def test_pt2e_weight_only_quantized_decoder_still_decodes(model, features, exported):
    from torchao.quantization.pt2e import PerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer

    weight_spec = QuantizationSpec(
        dtype=torch.int8, quant_min=-127, quant_max=127, qscheme=torch.per_channel_symmetric, ch_axis=0,
        is_dynamic=False, observer_or_fake_quant_ctr=PerChannelMinMaxObserver.with_args(eps=2**-12),
    )  # fmt: skip

    class LinearWeightQuantizer(Quantizer):
        """int8 per-channel weights of the linears whose HF module name is in ``names``."""

        def __init__(self, names: set[str]) -> None:
            super().__init__()
            self.names = names

        def annotate(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
            for node in gm.graph.nodes:
                if node.target == torch.ops.aten.linear.default:
                    if list(node.meta["nn_module_stack"].values())[-1][0] in self.names:
                        node.meta["quantization_annotation"] = QuantizationAnnotation(
                            input_qspec_map={node.args[1]: weight_spec}, _annotated=True
                        )
            return gm

        def validate(self, gm: torch.fx.GraphModule) -> None:
            pass

    kinds = ("fc1", "fc2", "self_attn.q_proj", "encoder_attn.out_proj")
    names = {f"model.decoder.layers.{i}.{kind}" for i in range(2) for kind in kinds}
    encoder, step = exported.modules()
    prepared = prepare_pt2e(step, LinearWeightQuantizer(names))
    options = _options(model)
    exported.greedy_decode(features[:1], options, modules=(encoder, prepared))  # calibration pass
    converted = convert_pt2e(prepared)
    dequants = [n for n in converted.graph.nodes if n.target == torch.ops.quantized_decomposed.dequantize_per_channel.default]
    assert len(dequants) == len(names)

    got = exported.greedy_decode(features, options, modules=(encoder, converted))
    assert [len(row) for row in got] and all(0 <= t < VOCAB for row in got for t in row)
    # int8 per-channel weights barely move the logits of this model: the tokens stay the same.
    assert got == exported.greedy_decode(features, options, modules=(encoder, step))


def test_dynamic_batch_and_fixed_batch(model, features, reference, exported, exported_modules):
    options = _options(model, max_new_tokens=4)
    expected = [row[:4] for row in reference]  # greedy is per-row deterministic: a lower cap gives a prefix
    assert exported.batch_size is None
    assert exported.greedy_decode(features[:1], options, modules=exported_modules) == expected[:1]
    fixed = export_whisper(model, max_cache_len=8, batch_size=1)
    assert fixed.greedy_decode(features[2:3], options) == expected[2:3]
    with pytest.raises(ValueError, match="fixed batch of 1"):
        fixed.greedy_decode(features[:2], options)
    # The bare loop cannot check the batch before calling; its first decoder call names the usual causes.
    with pytest.raises(RuntimeError, match="first call"):
        greedy_decode(WhisperEncoderExport(model), fixed.decoder_step.module(), features[:2], options, max_cache_len=8)


def test_export_rejects_cache_beyond_positions(model):
    with pytest.raises(ValueError, match="max_target_positions"):
        export_whisper(model, max_cache_len=41)


# --- decoding options ---------------------------------------------------------------------------


def test_decoding_options_english_only(model):
    options = decoding_options(model, max_new_tokens=9)
    assert options.prompt_ids == (SOT, NO_TIMESTAMPS)
    assert options.eos_token_id == EOS and options.max_new_tokens == 9
    assert options.suppress_tokens == SUPPRESS and options.begin_suppress_tokens == BEGIN_SUPPRESS
    assert decoding_options(model, language="English").prompt_ids == (SOT, NO_TIMESTAMPS)
    with pytest.raises(ValueError, match="English-only"):
        decoding_options(model, language="de")
    with pytest.raises(ValueError, match="English-only"):
        decoding_options(model, task="translate")


def test_decoding_options_multilingual():
    model = _tiny_whisper(multilingual=True)
    assert decoding_options(model, language="de").prompt_ids == (SOT, LANGS["<|de|>"], TRANSCRIBE, NO_TIMESTAMPS)
    assert decoding_options(model, language="German", task="translate").prompt_ids == (
        SOT, LANGS["<|de|>"], TRANSLATE, NO_TIMESTAMPS,
    )  # fmt: skip
    assert decoding_options(model, language="<|en|>").prompt_ids[1] == LANGS["<|en|>"]
    with pytest.raises(ValueError, match="unknown language 'fr'.*de, en"):
        decoding_options(model, language="fr")
    with pytest.raises(ValueError, match="pass language="):
        decoding_options(model)
    with pytest.raises(ValueError, match="unknown task"):
        decoding_options(model, language="en", task="summarize")


def test_decoding_options_validation():
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        DecodingOptions(prompt_ids=(), eos_token_id=EOS)
    with pytest.raises(ValueError, match="max_new_tokens"):
        DecodingOptions(prompt_ids=(SOT,), eos_token_id=EOS, max_new_tokens=0)
    assert DecodingOptions(prompt_ids=[SOT], eos_token_id=EOS, suppress_tokens=[1, 2]).suppress_tokens == (1, 2)


def test_out_of_vocab_suppress_token_is_a_clear_error(model, features):
    options = DecodingOptions(prompt_ids=(SOT,), eos_token_id=EOS, suppress_tokens=(VOCAB + 3,), max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        greedy_decode(WhisperEncoderExport(model), WhisperDecoderStep(model), features[:1], options)
