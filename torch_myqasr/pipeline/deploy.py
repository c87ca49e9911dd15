"""Deploy a personalised Whisper: lowered artifact on disk, loaded back the way a device runs it.

    qw = quantize_whisper(bundle, clips, budget_mb=...)          # converted PT2E programs + scheme
    deployed = deploy_quantized(qw, "my-model")                 # writes my-model/artifact, loads it
    evaluate(bundle, test_set, decode=deployed.decoder())        # WER of what a device would run
    load_deployed("my-model")                                    # the same, in a fresh process

On CPU the default is the deployment layout (`torch_myqasr.lowering.use_cpu_kernels`): weights in
aten's int4 layout, matmuls in bfloat16. ``compute_dtype=None`` keeps the portable, exact numerics
(the converted model's outputs, but every call dequantizes: slow on CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from torch_myqasr.evaluation.transcribe import DecodeFn

DEFAULT_COMPUTE_DTYPE = torch.bfloat16
"""Matmul activation dtype of a deployed model on CPU (aten's int4 kernel is fast only in bf16/fp16)."""


@dataclass
class DeployedWhisper:
    """A loaded artifact ready to transcribe.

    Attributes:
        bundle: tokenizer, feature extractor and generation config: the artifact's own (``extra/``,
            a `WhisperBundle` with ``model=None``), or the base model's for artifacts without them.
        artifact: the `LoadedArtifact` (scheme, manifest, model_info).
        encoder, decoder_step: the programs that run: the artifact's, in the CPU layout when
            ``compute_dtype`` was given, wrapped by ``torch.compile`` when ``compiled``.
        compute_dtype: matmul dtype (None: the portable exact path).
        compiled: whether the programs go through ``torch.compile``, or are AOTInductor packages
            (``"aot_inductor"``).
    """

    bundle: object
    artifact: object
    encoder: torch.nn.Module
    decoder_step: torch.nn.Module
    compute_dtype: Optional[torch.dtype]
    compiled: bool | str

    def decoder(self) -> DecodeFn:
        """A `DecodeFn` (evaluation.transcribe) running greedy decoding through the deployed programs."""
        from torch_myqasr.pipeline.personalize import exported_decoder

        return exported_decoder(self.bundle, self.artifact.max_cache_len, (self.encoder, self.decoder_step))

    @property
    def resident_bytes(self) -> Optional[int]:
        """Bytes of every parameter and buffer of both programs (weights, biases, norms, positions);
        None for AOTInductor packages, whose weights live inside the compiled library."""
        from torch_myqasr.lowering import module_bytes

        if self.compiled == "aot_inductor":
            return None
        return module_bytes(self.artifact.encoder) + module_bytes(self.artifact.decoder_step)


def artifact_dir(path: str | os.PathLike) -> Optional[Path]:
    """The artifact folder inside ``path`` (``path/artifact``, or ``path`` itself), or None if there is none."""
    from torch_myqasr.artifact.manifest import MANIFEST
    from torch_myqasr.pipeline.personalize import ARTIFACT_DIR

    for candidate in (Path(path) / ARTIFACT_DIR, Path(path)):
        if (candidate / MANIFEST).is_file():
            return candidate
    return None


def load_deployed(
    path: str | os.PathLike,
    *,
    bundle=None,
    compute_dtype: Optional[torch.dtype] = DEFAULT_COMPUTE_DTYPE,
    compile: bool = False,
    aot_inductor: bool = False,
) -> DeployedWhisper:
    """Load the artifact in ``path`` (a ``myqasr quantize`` folder or the artifact folder) for transcription.

    Args:
        path: folder holding ``artifact/manifest.json`` or ``manifest.json``.
        bundle: the base model's bundle, if already loaded (else the artifact's own front end in
            ``extra/``: no fp32 weights are loaded; older artifacts without it load the base model).
        compute_dtype: ``torch.bfloat16`` (default, the CPU deployment layout) or None (portable, exact).
        compile: wrap both programs in ``torch.compile`` (the first calls compile: tens of seconds on CPU).
        aot_inductor: run the artifact's AOTInductor packages instead (built by ``myqasr quantize
            --aot-inductor``; bfloat16 CPU layout, no warm-up); ``compute_dtype`` and ``compile`` are ignored.
    Raises:
        FileNotFoundError: no artifact in ``path`` (the message says how to write one).
        ArtifactError: a damaged or foreign artifact (`load_artifact`).
    """
    from torch_myqasr.artifact import load_artifact
    from torch_myqasr.models import load_whisper
    from torch_myqasr.models.whisper import FRONTEND_FILES, load_frontend

    folder = artifact_dir(path)
    if folder is None:
        raise FileNotFoundError(f"{path} holds no artifact (manifest.json); write one with `myqasr quantize ... --out {path}`")
    art = load_artifact(folder, compute_dtype=compute_dtype, aot_inductor=aot_inductor)
    model_id = art.model_info["model_id"]
    if bundle is None and all((folder / "extra" / name).is_file() for name in FRONTEND_FILES):
        bundle = load_frontend(folder / "extra", model_id=model_id)
    elif bundle is None:
        bundle = load_whisper(model_id)
    elif bundle.model_id != model_id:
        raise ValueError(f"{folder} was made from {model_id!r}, not {bundle.model_id!r}")
    encoder, decoder_step = art.encoder, art.decoder_step
    if aot_inductor:
        return DeployedWhisper(bundle, art, encoder, decoder_step, torch.bfloat16, "aot_inductor")
    if compile:
        encoder, decoder_step = torch.compile(encoder), torch.compile(decoder_step)
    return DeployedWhisper(bundle, art, encoder, decoder_step, compute_dtype, compile)


def deploy_quantized(
    qw, out_dir: str | os.PathLike, *, compute_dtype: Optional[torch.dtype] = DEFAULT_COMPUTE_DTYPE, compile: bool = False,
) -> DeployedWhisper:
    """Lower ``qw`` (a `QuantizedWhisper`), write ``out_dir/artifact`` and load it back with `load_deployed`.

    Evaluating the returned model measures exactly what a fresh process loading ``out_dir`` runs.
    """
    from torch_myqasr.pipeline.personalize import save_lowered_artifact

    save_lowered_artifact(qw, out_dir)
    return load_deployed(out_dir, bundle=qw.bundle, compute_dtype=compute_dtype, compile=compile)


__all__ = ["DEFAULT_COMPUTE_DTYPE", "DeployedWhisper", "artifact_dir", "deploy_quantized", "load_deployed"]
