"""The converted model decodes real speech exactly as the CTranslate2 engine does on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torch_myqasr.models import load_whisper
from torch_myqasr.models import whisper as whisper_mod

ctranslate2 = pytest.importorskip("ctranslate2", reason="the parity reference needs `pip install ctranslate2`")


@pytest.fixture(scope="module")
def real_clips():
    from torch_myqasr.audio import load_dataset_audio, open_dataset
    from torch_myqasr.corpus import corpus_manifest

    dataset = open_dataset(corpus_manifest("test"))
    picked = []
    for speaker in ("librivox", "slt", "kal"):
        picked += [u for u in dataset if u.speaker == speaker][:2]
    assert len(picked) == 6
    return [audio for _, audio in load_dataset_audio(picked)]


@pytest.mark.slow
def test_greedy_tokens_match_ctranslate2(real_clips, tmp_path):
    bundle = load_whisper("tiny.en", cache_dir=tmp_path)
    _, meta = whisper_mod._pinned_files(whisper_mod.PINNED_MODELS["tiny.en"])
    engine = ctranslate2.models.Whisper(str(meta), device="cpu", compute_type="float32")
    feats = bundle.feature_extractor(real_clips, sampling_rate=16000, return_tensors="np").input_features
    prompt = [bundle.tokenizer.convert_tokens_to_ids(t) for t in ("<|startoftranscript|>", "<|notimestamps|>")]

    # Encoder outputs agree to fp16-weight rounding (CTranslate2 widens the same fp16 weights).
    ct2_enc = np.asarray(engine.encode(ctranslate2.StorageView.from_array(feats[:1]), to_cpu=True))
    with torch.inference_mode():
        ours_enc = bundle.model.model.encoder(torch.from_numpy(feats[:1])).last_hidden_state.numpy()
    assert np.abs(ct2_enc - ours_enc).max() < 5e-3

    results = engine.generate(
        ctranslate2.StorageView.from_array(feats),
        [prompt] * len(real_clips),
        beam_size=1,
        max_length=120,
        return_no_speech_prob=False,
    )
    with torch.inference_mode():
        ours = bundle.model.generate(
            torch.from_numpy(feats), max_new_tokens=100, do_sample=False, num_beams=1, return_timestamps=False
        )
    special = set(bundle.tokenizer.all_special_ids)
    for i, r in enumerate(results):
        ours_ids = [t for t in ours[i].tolist() if t not in special]
        assert ours_ids == [t for t in r.sequences_ids[0] if t not in special], f"clip {i}"
        assert len(ours_ids) > 3
