"""`load_artifact`: verify and load an artifact folder into callables `greedy_decode` can drive."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

import torch_myqasr.ops  # noqa: F401  (registers myqasr::linear_* and myqasr::embedding_packed)
from torch_myqasr.allocation import Scheme
from torch_myqasr.artifact.manifest import ArtifactError, read_manifest, verify_files, version_problems
from torch_myqasr.artifact.save import PROGRAMS


@dataclass
class LoadedArtifact:
    """A loaded artifact.

    Attributes:
        path: the folder.
        encoder, decoder_step: callables with the signatures of `WhisperEncoderExport` /
            `WhisperDecoderStep` (``ExportedProgram.module()`` GraphModules; ``torch.compile`` them
            for speed).
        scheme: the per-layer scheme.
        model_info: the dict given to `save_artifact`.
        manifest: the parsed manifest (versions, checksums, byte counts).
    """

    path: Path
    encoder: torch.nn.Module
    decoder_step: torch.nn.Module
    scheme: Scheme
    model_info: dict[str, Any]
    manifest: dict[str, Any] = field(repr=False)

    @property
    def max_cache_len(self) -> int:
        """Self-attention cache rows the decoder program was exported with."""
        return int(self.model_info["max_cache_len"])

    def decoding_options(self, **overrides: Any):
        """The `DecodingOptions` stored in ``model_info["decoding"]``, with ``overrides`` applied."""
        from torch_myqasr.export import DecodingOptions

        stored = self.model_info.get("decoding")
        if stored is None:
            raise ArtifactError(
                f"{self.path} stores no decoding options (model_info['decoding']); pass options= explicitly"
            )
        return DecodingOptions(**{**stored, **overrides})

    def greedy_decode(self, input_features: torch.Tensor, options=None) -> list[list[int]]:
        """Greedy token ids per row (no prompt, no eos) for ``[B, n_mels, 3000]`` log-mel features.

        ``options`` defaults to `decoding_options` (the ones saved with the artifact).
        """
        from torch_myqasr.export import greedy_decode

        options = self.decoding_options() if options is None else options
        return greedy_decode(self.encoder, self.decoder_step, input_features, options, max_cache_len=self.max_cache_len)


def _load_program(folder: Path, entry: dict[str, Any], name: str) -> torch.export.ExportedProgram:
    from safetensors.torch import load_file

    try:
        ep = torch.export.load(folder / entry["program"])
    except Exception as err:  # unknown ops, serialization version: say what usually fixes it
        raise ArtifactError(
            f"could not load {folder / entry['program']} ({type(err).__name__}: {err}); the myqasr ops register on "
            "`import torch_myqasr.ops`, and the program needs the torch version recorded in manifest.json"
        ) from err
    tensors = load_file(str(folder / entry["weights"]))
    for kind, table in (("state_dict", ep.state_dict), ("constants", ep.constants)):
        for key in list(table):
            placeholder = table[key]
            value = tensors.pop(f"{kind}/{key}", None)
            if value is None:
                raise ArtifactError(f"{entry['weights']} lacks tensor {kind}/{key} that {name} needs; re-create the artifact")
            if value.shape != placeholder.shape or value.dtype != placeholder.dtype:
                raise ArtifactError(
                    f"{entry['weights']}: {key} is {value.dtype} {list(value.shape)} but {name} expects "
                    f"{placeholder.dtype} {list(placeholder.shape)}; re-create the artifact"
                )
            table[key] = torch.nn.Parameter(value, requires_grad=False) if isinstance(placeholder, torch.nn.Parameter) else value
    if tensors:
        raise ArtifactError(f"{entry['weights']} holds tensors {sorted(tensors)[:3]} that {name} does not use; re-create the artifact")
    return ep


def load_artifact(
    path: str | os.PathLike,
    *,
    compute_dtype: Optional[torch.dtype] = None,
    strict_versions: bool = True,
    aot_inductor: bool = False,
) -> LoadedArtifact:
    """Verify and load an artifact written by `save_artifact`.

    Args:
        path: the artifact folder.
        compute_dtype: None (default): the saved numerics (equal to the converted model's; slow on CPU,
            every call dequantizes). ``torch.bfloat16``: the CPU deployment: weights move to aten's int4
            CPU layout and the matmuls run in bfloat16 (`torch_myqasr.lowering.use_cpu_kernels`; faster
            than the float32 model, bfloat16 rounding, int4 / int8 weights in the same memory).
        strict_versions: a torch_myqasr or torch (major.minor) version different from the writer's is an
            error; False turns it into a warning.
        aot_inductor: run the AOTInductor packages saved with ``save_artifact(..., aot_inductor=True)``
            (the CPU layout compiled ahead of time: no warm-up); ``compute_dtype`` is then the package's.
            ``encoder`` / ``decoder_step`` are the packages' callables, not GraphModules.
    Returns:
        a `LoadedArtifact`.
    Raises:
        ArtifactError: missing manifest or file, checksum mismatch, version mismatch, or a program
            that cannot be loaded; the message names the file and the fix.
    """
    folder = Path(path)
    manifest = read_manifest(folder)
    problems = version_problems(manifest.get("versions", {}))
    if problems:
        message = f"{folder} was written by other versions: {'; '.join(problems)}. Re-create the artifact with this install, or install the writer's versions"
        if strict_versions:
            raise ArtifactError(message)
        warnings.warn(message + " (loading anyway: strict_versions=False)", stacklevel=2)
    verify_files(folder, manifest)
    scheme = Scheme.from_json((folder / "scheme.json").read_text(encoding="utf-8"), source=str(folder / "scheme.json"))
    model_info = json.loads((folder / "model_info.json").read_text(encoding="utf-8"))
    modules = {}
    if aot_inductor:
        from torch_myqasr.artifact.aoti import aoti_platform, load_aoti_package

        aoti = manifest.get("aoti")
        if aoti is None:
            raise ArtifactError(f"{folder} holds no AOTInductor packages; write it with save_artifact(..., aot_inductor=True) "
                                "(myqasr quantize --aot-inductor) or load it without aot_inductor")
        if aoti["platform"] != aoti_platform():
            raise ArtifactError(f"{folder}'s AOTInductor packages were built for {aoti['platform']}, this is "
                                f"{aoti_platform()}; load it without aot_inductor (the portable programs run anywhere)")
        modules = {name: load_aoti_package(folder / aoti["programs"][name]) for name in PROGRAMS}
        return LoadedArtifact(folder, modules["encoder"], modules["decoder_step"], scheme, model_info, manifest)
    for name in PROGRAMS:
        module = _load_program(folder, manifest["programs"][name], name).module()
        if compute_dtype is not None:
            from torch_myqasr.lowering import use_cpu_kernels

            use_cpu_kernels(module, compute_dtype=compute_dtype)
        modules[name] = module
    return LoadedArtifact(folder, modules["encoder"], modules["decoder_step"], scheme, model_info, manifest)


__all__ = ["LoadedArtifact", "load_artifact"]
