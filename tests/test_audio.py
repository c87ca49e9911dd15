"""load_audio / save_audio: resampling, mix-down, and every AudioError case."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile

from torch_myqasr.audio import AudioError, load_audio, save_audio


def _sine(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spectrum.argmax()])


def test_stereo_44k_is_mixed_and_resampled(tmp_path):
    left = _sine(440.0, 44_100, 1.0)
    right = _sine(440.0, 44_100, 1.0, amp=0.3)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([left, right], axis=1), 44_100, subtype="FLOAT")

    out = load_audio(path)

    assert out.dtype == np.float32 and out.ndim == 1
    assert len(out) == 16_000  # 1 s at 16 kHz
    assert abs(_peak_hz(out, 16_000) - 440.0) < 2.0
    # Mean of the channels: amplitude (0.5 + 0.3) / 2 = 0.4, kept by a high-quality resampler.
    assert np.abs(out[1000:-1000]).max() == pytest.approx(0.4, abs=0.01)


def test_matching_rate_is_returned_unchanged(tmp_path):
    x = _sine(1000.0, 16_000, 0.25)
    path = tmp_path / "mono.wav"
    soundfile.write(path, x, 16_000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(path), x)


def test_other_target_rate(tmp_path):
    path = tmp_path / "a.flac"
    soundfile.write(path, _sine(300.0, 16_000, 0.5), 16_000)
    out = load_audio(path, sample_rate=8_000)
    assert len(out) == 4_000
    assert abs(_peak_hz(out, 8_000) - 300.0) < 4.0


def test_bad_sample_rate_argument(tmp_path):
    with pytest.raises(ValueError, match="positive integer"):
        load_audio(tmp_path / "x.wav", sample_rate=0)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: None, "not found"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"RIFF\x24\x00\x00\x00WAVEthis is not audio at all" * 3), "cannot decode"),
        (lambda p: soundfile.write(p, np.zeros(0, np.float32), 16_000), "no samples"),
        (lambda p: soundfile.write(p, np.zeros(16_000, np.float32), 16_000), "silent"),
        (lambda p: soundfile.write(p, np.full(100, 5e-5, np.float32), 16_000, subtype="FLOAT"), "silent"),
    ],
    ids=["missing", "zero-bytes", "corrupt", "zero-frames", "zeros", "below-threshold"],
)
def test_audio_errors_name_the_file(tmp_path, make, match):
    path = tmp_path / "clip.wav"
    make(path)
    with pytest.raises(AudioError, match=match) as info:
        load_audio(path)
    assert str(path) in str(info.value)


def test_nan_and_inf_rejected(tmp_path):
    x = _sine(440.0, 16_000, 0.1)
    for bad in (np.nan, np.inf):
        x[10] = bad
        path = tmp_path / "nan.wav"
        soundfile.write(path, x, 16_000, subtype="FLOAT")
        with pytest.raises(AudioError, match="NaN/inf") as info:
            load_audio(path)
        assert str(path) in str(info.value)


def test_opposite_phase_stereo_is_silent_after_mixdown(tmp_path):
    x = _sine(440.0, 16_000, 0.1)
    path = tmp_path / "phase.wav"
    soundfile.write(path, np.stack([x, -x], axis=1), 16_000, subtype="FLOAT")
    with pytest.raises(AudioError, match="silent.*mixing"):
        load_audio(path)


def test_folder_is_not_a_file(tmp_path):
    with pytest.raises(AudioError, match="not a file"):
        load_audio(tmp_path)


def test_audio_error_is_a_value_error():
    assert issubclass(AudioError, ValueError)


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_save_round_trip(tmp_path, suffix):
    x = _sine(440.0, 16_000, 0.2)
    path = tmp_path / "sub" / f"out{suffix}"
    save_audio(path, x, 16_000)
    info = soundfile.info(path)
    assert info.samplerate == 16_000 and info.frames == len(x) and info.channels == 1
    np.testing.assert_allclose(load_audio(path), x, atol=1e-4)  # 16-bit PCM
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_save_is_atomic_on_failure(tmp_path):
    path = tmp_path / "keep.wav"
    save_audio(path, _sine(440.0, 16_000, 0.1), 16_000)
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_audio(path, _sine(440.0, 16_000, 0.1), 16_000, subtype="NOT_A_SUBTYPE")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.wav"]


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(AudioError, match="suffix"):
        save_audio(tmp_path / "x.xyz", np.zeros(10, np.float32), 16_000)
    with pytest.raises(AudioError, match="NaN"):
        save_audio(tmp_path / "x.wav", np.array([0.1, np.nan], np.float32), 16_000)
    with pytest.raises(AudioError, match="shape"):
        save_audio(tmp_path / "x.wav", np.zeros((2, 2, 2), np.float32), 16_000)
