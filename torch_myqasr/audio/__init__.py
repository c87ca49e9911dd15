"""Audio I/O and datasets: clips in as float32 mono 16 kHz, datasets as sequences of `Utterance`.

- `load_audio` / `save_audio` (`io.py`): any libsndfile format, mixed to mono, resampled with soxr.
- `open_dataset` and the readers (`datasets.py`): LibriSpeech trees, JSONL manifests, audio folders.
- `load_dataset_audio`: decode a dataset's clips, raising on or skipping (with one warning) bad ones.
"""

from torch_myqasr.audio.datasets import (
    UNKNOWN_SPEAKER,
    Dataset,
    DatasetError,
    SkippedAudioWarning,
    Utterance,
    load_dataset_audio,
    open_dataset,
    read_audio_folder,
    read_librispeech,
    read_manifest,
)
from torch_myqasr.audio.io import (
    AUDIO_EXTENSIONS,
    DEFAULT_SAMPLE_RATE,
    SILENCE_THRESHOLD,
    AudioError,
    load_audio,
    save_audio,
)

__all__ = [
    "AUDIO_EXTENSIONS",
    "DEFAULT_SAMPLE_RATE",
    "SILENCE_THRESHOLD",
    "UNKNOWN_SPEAKER",
    "AudioError",
    "Dataset",
    "DatasetError",
    "SkippedAudioWarning",
    "Utterance",
    "load_audio",
    "load_dataset_audio",
    "open_dataset",
    "read_audio_folder",
    "read_librispeech",
    "read_manifest",
    "save_audio",
]
