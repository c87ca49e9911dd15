"""Deployable artifacts: lowered programs + packed weights + scheme + manifest (docs/artifact.md).

    from torch_myqasr.artifact import save_artifact, load_artifact
    save_artifact("out/", lowered_encoder, lowered_decoder, q.scheme,
                  {"model_id": "tiny.en", "max_cache_len": ew.max_cache_len, "decoding": options})
    art = load_artifact("out/")                      # in a fresh process
    tokens = art.greedy_decode(features)
"""

from torch_myqasr.artifact.manifest import ARTIFACT_FORMAT_VERSION, ArtifactError  # noqa: I001
from torch_myqasr.artifact.save import example_inputs, reexport, save_artifact
from torch_myqasr.artifact.load import LoadedArtifact, load_artifact

__all__ = [
    "ARTIFACT_FORMAT_VERSION",
    "ArtifactError",
    "LoadedArtifact",
    "example_inputs",
    "load_artifact",
    "reexport",
    "save_artifact",
]
