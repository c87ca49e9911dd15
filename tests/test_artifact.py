"""Deployable artifacts on a tiny random Whisper: the round trip in a fresh process (same tokens),
sizes on disk, atomic writes, and clear errors (missing file, checksum, versions, unlowered module)."""

import copy
import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from transformers import WhisperConfig, WhisperForConditionalGeneration

from torch_myqasr.artifact import ArtifactError, load_artifact, save_artifact
from torch_myqasr.export import DecodingOptions, export_whisper, greedy_decode
from torch_myqasr.lowering import lower_quantized, quantized_weight_bytes
from torch_myqasr.quantizer import MyQASRQuantizer

VOCAB, EOS, SOT, NO_TS, MELS, CACHE = 64, 50, 51, 54, 8, 16
OPTS = DecodingOptions(prompt_ids=(SOT, NO_TS), eos_token_id=EOS, begin_suppress_tokens=(EOS,), max_new_tokens=10)
REPO = Path(__file__).resolve().parents[1]


def _tiny_whisper():
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=MELS, d_model=64, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=1500, max_target_positions=40, pad_token_id=EOS, bos_token_id=EOS, eos_token_id=EOS,
        decoder_start_token_id=SOT, init_std=0.3,  # a random model with the default 0.02 ignores its input
    )  # fmt: skip
    return WhisperForConditionalGeneration(config).eval()


@functools.lru_cache(maxsize=1)
def _quantized():
    """(scheme, lowered encoder, lowered decoder, features, tokens from the converted q/dq model)."""
    ew = export_whisper(_tiny_whisper(), max_cache_len=CACHE)  # dynamic batch
    q = MyQASRQuantizer(budget_mb=0.5, formats=("int4",), strategy="uniform", progress=False, clip_grid=(1.0, 0.9))
    pe, pd = prepare_pt2e(ew.encoder.module(), q), prepare_pt2e(ew.decoder_step.module(), q)
    feats = torch.randn(2, MELS, 3000, generator=torch.Generator().manual_seed(0))
    greedy_decode(pe, pd, feats, OPTS, max_cache_len=CACHE)
    ce, cd = convert_pt2e(pe), convert_pt2e(pd)
    ref = greedy_decode(ce, cd, feats, OPTS, max_cache_len=CACHE)
    return q.scheme, lower_quantized(ce), lower_quantized(cd), feats, ref


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    scheme, le, ld, _, _ = _quantized()
    out = tmp_path_factory.mktemp("art") / "model"
    save_artifact(out, le, ld, scheme, {"model_id": "tiny-random", "max_cache_len": CACHE, "decoding": OPTS})
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_layout_sizes_and_manifest(artifact):
    scheme, le, ld, _, _ = _quantized()
    names = sorted(p.name for p in artifact.iterdir())
    assert names == ["decoder_step.pt2", "decoder_step.safetensors", "encoder.pt2", "encoder.safetensors",
                     "manifest.json", "model_info.json", "scheme.json"]
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert set(manifest["files"]) == set(names) - {"manifest.json"}
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["quantized_weight_bytes"] == quantized_weight_bytes(le) + quantized_weight_bytes(ld)
    assert manifest["quantized_weight_bytes"] == sum(s.nbytes for s in scheme.layers.values())
    # the weights are stored once: the safetensors hold the scheme's bytes plus the safetensors
    # headers; the programs hold graphs only (no weights, no example inputs)
    weights = sum((artifact / f"{n}.safetensors").stat().st_size for n in ("encoder", "decoder_step"))
    assert scheme.size_bytes <= weights <= scheme.size_bytes + 16_000
    for n in ("encoder", "decoder_step"):
        assert (artifact / f"{n}.pt2").stat().st_size < 400_000
    assert not [p for p in artifact.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_round_trip_in_a_fresh_process(artifact, tmp_path):
    _, _, _, feats, ref = _quantized()
    torch.save(feats, tmp_path / "feats.pt")
    script = textwrap.dedent(f"""
        import json, sys, torch
        import torch_myqasr
        from torch_myqasr.artifact import load_artifact
        art = load_artifact({str(artifact)!r})
        feats = torch.load({str(tmp_path / "feats.pt")!r})
        fast = load_artifact({str(artifact)!r}, compute_dtype=torch.bfloat16)  # opt-in CPU kernels
        out = {{"batch": art.greedy_decode(feats), "single": art.greedy_decode(feats[1:]),
               "bf16": fast.greedy_decode(feats)}}
        print(json.dumps(out))
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["batch"] == ref  # same tokens as the converted (q/dq) model
    assert out["single"] == ref[1:]  # dynamic batch survived the re-export
    assert len(out["bf16"]) == 2 and all(len(r) > 0 for r in out["bf16"])


@pytest.mark.slow  # torch.compile of both dynamic-shape programs: about a minute on two shared cores
def test_compiled_loaded_artifact_same_tokens(artifact):
    _, _, _, feats, ref = _quantized()
    art = load_artifact(artifact)
    assert art.scheme.to_json() == _quantized()[0].to_json()
    torch._dynamo.reset()
    tokens = greedy_decode(torch.compile(art.encoder), torch.compile(art.decoder_step), feats, OPTS,
                           max_cache_len=art.max_cache_len)
    assert tokens == ref


def test_missing_file_and_checksum_mismatch_are_clear(artifact, tmp_path):
    broken = _copy(artifact, tmp_path / "missing")
    (broken / "encoder.safetensors").unlink()
    with pytest.raises(ArtifactError, match="encoder.safetensors is missing"):
        load_artifact(broken)
    edited = _copy(artifact, tmp_path / "edited")
    data = bytearray((edited / "decoder_step.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (edited / "decoder_step.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch for .*decoder_step.safetensors"):
        load_artifact(edited)
    no_manifest = _copy(artifact, tmp_path / "partial")
    (no_manifest / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="not a complete myqasr artifact"):
        load_artifact(no_manifest)


def test_version_mismatch_is_an_error_or_a_warning(artifact, tmp_path):
    other = _copy(artifact, tmp_path / "old")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["versions"]["torch"] = "2.9.0"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"torch 2\.9\.0 wrote it"):
        load_artifact(other)
    with pytest.warns(UserWarning, match="strict_versions=False"):
        load_artifact(other, strict_versions=False)
    manifest["format_version"] = 99
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format version 99"):
        load_artifact(other)


def test_save_refuses_unlowered_or_mismatched_modules_and_existing_folder(artifact, tmp_path):
    scheme, le, ld, _, _ = _quantized()
    info = {"max_cache_len": CACHE}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_artifact(artifact, le, ld, scheme, info)
    with pytest.raises(ArtifactError, match="packed weights but the scheme"):
        save_artifact(tmp_path / "half", le, le, scheme, info)  # decoder's layers missing
    with pytest.raises(ValueError, match="max_cache_len"):
        save_artifact(tmp_path / "x", le, ld, scheme, {})
    fast = lower_quantized(copy.deepcopy(ld), compute_dtype=torch.bfloat16)
    with pytest.raises(ArtifactError, match="pass compute_dtype to load_artifact"):
        save_artifact(tmp_path / "y", le, fast, scheme, info)
    assert not (tmp_path / "half").exists() and not (tmp_path / "y").exists()
    # overwrite replaces the folder only once the new one is complete
    again = save_artifact(_copy(artifact, tmp_path / "again"), le, ld, scheme, info, overwrite=True)
    assert load_artifact(again).model_info == info


@pytest.mark.slow
def test_aot_inductor_packages_match_the_cpu_layout_and_check_platform(tmp_path):
    scheme, le, ld, feats, _ = _quantized()
    out = tmp_path / "aoti"
    save_artifact(out, le, ld, scheme, {"model_id": "tiny-random", "max_cache_len": CACHE, "decoding": OPTS}, aot_inductor=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["aoti"]["programs"].values()) <= set(manifest["files"])  # checksummed like the rest
    packaged = load_artifact(out, aot_inductor=True)
    layout = load_artifact(out, compute_dtype=torch.bfloat16)  # the same numerics, run eagerly
    with torch.no_grad():
        enc_p, enc_l = packaged.encoder(feats), layout.encoder(feats)
        ids = torch.tensor([[SOT, NO_TS]] * 2)
        k = torch.zeros(enc_l[1].shape[0], 2, enc_l[1].shape[2], CACHE, enc_l[1].shape[4])
        step_p = packaged.decoder_step(ids, torch.tensor(0), k, k.clone(), *enc_l[1:])
        step_l = layout.decoder_step(ids, torch.tensor(0), k, k.clone(), *enc_l[1:])
    for got, ref in list(zip(enc_p, enc_l)) + list(zip(step_p, step_l)):
        assert got.shape == ref.shape
        assert float((got - ref).norm() / ref.norm()) < 2e-2  # inductor rounds bf16 in other places
    # a package is machine code: another architecture is refused, and an artifact without packages too
    manifest["aoti"]["platform"] = "sparc64"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="built for sparc64"):
        load_artifact(out, aot_inductor=True)
    plain = tmp_path / "plain"
    save_artifact(plain, le, ld, scheme, {"model_id": "tiny-random", "max_cache_len": CACHE, "decoding": OPTS})
    with pytest.raises(ArtifactError, match="holds no AOTInductor packages"):
        load_artifact(plain, aot_inductor=True)
