"""Reading and writing audio clips: one function in, one function out, clear errors in between.

Every clip the project touches (calibration clips, evaluation utterances) goes through
`load_audio`, so every model sees the same thing: float32 mono samples at the requested rate,
already checked for the problems that would otherwise show up much later as a baffling WER
(an empty file, digital silence, NaNs from a broken float WAV).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile
import soxr

from torch_myqasr.atomic import atomic_open

DEFAULT_SAMPLE_RATE = 16_000
"""Whisper's (and wav2vec2's) input rate, in Hz."""

SILENCE_THRESHOLD = 1e-4
"""A clip whose every |sample| (full scale = 1.0) is below this is treated as silent.

-80 dBFS: well below the noise floor of any microphone recording and of 16-bit dither, so only
digital silence (or a recording with the input muted) trips it.
"""

AUDIO_EXTENSIONS = frozenset(
    {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".caf", ".w64", ".rf64", ".sph", ".nist"}
)
"""File suffixes (lower case) that the dataset readers treat as audio; libsndfile reads all of them."""

# libsndfile picks its container from a format name, not a suffix; these are the suffixes whose
# name differs from the upper-cased suffix.
_FORMAT_FOR_SUFFIX = {".aif": "AIFF", ".oga": "OGG", ".opus": "OGG", ".sph": "NIST"}
_CONVERT_HINT = "convert it to 16 kHz mono WAV, e.g. `sox in.xxx -r 16000 -c 1 out.wav`"


class AudioError(ValueError):
    """An audio file that cannot be used: missing, unreadable, empty, silent or non-finite.

    The message names the file and says how to fix it.
    """


def load_audio(path: str | os.PathLike, sample_rate: int = DEFAULT_SAMPLE_RATE) -> np.ndarray:
    """Read an audio file as float32 mono samples at ``sample_rate`` Hz.

    Any format libsndfile (``soundfile``) reads is accepted (WAV, FLAC, OGG/Vorbis/Opus, MP3, ...).
    Multi-channel audio is mixed down to mono by averaging the channels; a file at another rate is
    resampled with soxr at high quality ("HQ").

    Args:
        path: the audio file.
        sample_rate: output rate in Hz (default 16000).

    Returns:
        1-D ``np.float32`` array of samples in [-1, 1] (full scale = 1.0), length
        ``round(frames * sample_rate / file_rate)``.

    Raises:
        AudioError: the file is missing, cannot be decoded, holds no samples, holds NaN/inf, or is
            silent (every |sample| < `SILENCE_THRESHOLD` after the mix-down).
        ValueError: ``sample_rate`` is not a positive integer.
    """
    if not isinstance(sample_rate, (int, np.integer)) or isinstance(sample_rate, bool) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer number of Hz, got {sample_rate!r}")
    path = Path(path)
    if not path.exists():
        raise AudioError(f"audio file not found: {path}; check the path (relative paths start from {Path.cwd()})")
    if not path.is_file():
        raise AudioError(f"{path} is not a file; pass an audio file (a folder of clips is a dataset: use open_dataset)")
    if path.stat().st_size == 0:
        raise AudioError(f"audio file {path} is empty (0 bytes); re-record or re-export it, or remove it from the dataset")
    try:
        # always_2d gives [frames, channels] for mono and multi-channel alike.
        data, file_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, RuntimeError) as e:
        raise AudioError(
            f"cannot decode audio file {path} ({e}); it is corrupt or not in a format libsndfile reads "
            f"(WAV, FLAC, OGG, MP3, ...): {_CONVERT_HINT}"
        ) from e
    if data.shape[0] == 0:
        raise AudioError(f"audio file {path} contains no samples (0 frames); re-record or re-export it, or remove it")
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise AudioError(
            f"audio file {path} contains {bad} NaN/inf samples (a broken float recording); "
            f"re-export it as integer PCM: {_CONVERT_HINT}"
        )
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    peak = float(np.abs(mono).max())
    if peak < SILENCE_THRESHOLD:
        raise AudioError(
            f"audio file {path} is silent (peak |sample| {peak:.1e} < {SILENCE_THRESHOLD:.0e} of full scale"
            f"{' after mixing its channels to mono' if data.shape[1] > 1 else ''}); check that the microphone "
            "was not muted, or remove the file"
        )
    if file_rate != sample_rate:
        mono = soxr.resample(mono, file_rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def save_audio(
    path: str | os.PathLike, audio: np.ndarray, sample_rate: int, subtype: str | None = None
) -> None:
    """Write ``audio`` to ``path`` atomically (a temporary file beside it, then ``os.replace``).

    A reader of ``path`` sees the old file or the whole new one, never a half-written one. The
    container comes from the suffix (.wav, .flac, .ogg, ...); parent folders are created.

    Args:
        path: destination file.
        audio: samples in [-1, 1] (full scale = 1.0), shape [frames] or [frames, channels];
            any float or integer dtype soundfile accepts.
        sample_rate: rate in Hz.
        subtype: libsndfile sample encoding (e.g. "PCM_16", "FLOAT"); default: the container's
            default (16-bit PCM for WAV and FLAC).

    Raises:
        AudioError: unknown suffix, bad shape, or NaN/inf samples.
    """
    path = Path(path)
    audio = np.asarray(audio)
    if audio.ndim not in (1, 2):
        raise AudioError(f"cannot save {path}: audio must be [frames] or [frames, channels], got shape {audio.shape}")
    if audio.dtype.kind == "f" and not np.isfinite(audio).all():
        raise AudioError(f"cannot save {path}: audio contains NaN/inf samples; fix the signal before saving")
    suffix = path.suffix.lower()
    fmt = _FORMAT_FOR_SUFFIX.get(suffix, suffix.lstrip(".").upper())
    if fmt not in soundfile.available_formats():
        raise AudioError(
            f"cannot save {path}: unknown audio suffix {path.suffix!r}; use one of .wav, .flac, .ogg "
            f"(libsndfile formats: {', '.join(sorted(soundfile.available_formats()))})"
        )
    # The temporary file's own name ends in .tmp, so the format must be given explicitly.
    with atomic_open(path, "wb") as f:
        soundfile.write(f, audio, int(sample_rate), format=fmt, subtype=subtype)
