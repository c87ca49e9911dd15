"""`save_artifact`: write lowered encoder / decoder-step programs as a deployable folder.

Layout (docs/artifact.md)::

    DIR/
      encoder.pt2             torch.export.save of the re-exported lowered encoder, weights left out
      encoder.safetensors     every tensor that program holds: packed low-bit weights, biases, norms
      decoder_step.pt2
      decoder_step.safetensors
      scheme.json             the per-layer scheme (torch_myqasr.allocation.Scheme)
      model_info.json         what a runtime needs besides weights (max_cache_len, decoding options, ...)
      extra/<name>            optional files (e.g. tokenizer.json), checksummed like the rest
      manifest.json           format version, library versions, sha256 and size of every file

Why the programs are saved without weights: ``torch.export.save`` would store every tensor again,
doubling the folder. Each program's state_dict / constants are written once, to safetensors, and
the ``.pt2`` keeps meta-device placeholders of the same shapes that `load_artifact` fills back.
The folder is written under a temporary name beside ``DIR`` and renamed at the end, so a reader
never sees half an artifact.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import fx
from torch.export import Dim, ExportedProgram

from torch_myqasr.allocation import Scheme
from torch_myqasr.artifact.manifest import MANIFEST, ArtifactError, build_manifest
from torch_myqasr.formats import QUANTIZED_FORMATS
from torch_myqasr.lowering import quantized_weight_bytes

PROGRAMS = ("encoder", "decoder_step")
"""Program names in an artifact, in the order `greedy_decode` takes them."""

SIZE_TOLERANCE = 0.02
"""Largest relative difference allowed between the modules' packed bytes and the scheme's quantized bytes."""


def _graph_module(module: torch.nn.Module, name: str) -> fx.GraphModule:
    gm = getattr(module, "_orig_mod", module)  # accept a torch.compile'd module
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"{name} must be a lowered GraphModule (lower_quantized(convert_pt2e(...))), got {type(module).__name__}")
    for node in gm.graph.nodes:
        if node.op == "call_function" and "dequantize_groupwise" in str(node.target):
            raise ArtifactError(
                f"{name} still dequantizes weights ({node.name}); call torch_myqasr.lowering.lower_quantized on it before saving"
            )
    if gm.meta.get("myqasr_compute_dtype") is not None:
        raise ArtifactError(
            f"{name} holds its weights in the CPU-resident layout (use_cpu_kernels / compute_dtype=...); save the "
            "module lowered without compute_dtype and pass compute_dtype to load_artifact instead (the layout is rebuilt at load)"
        )
    return gm


def example_inputs(gm: fx.GraphModule) -> tuple[tuple[torch.Tensor, ...], tuple[Optional[dict[int, Any]], ...]]:
    """Zero example inputs and ``dynamic_shapes`` for re-exporting ``gm`` (from an ``ExportedProgram.module()``).

    Every dimension that is symbolic in the placeholders' ``meta["val"]`` becomes ``Dim.AUTO`` (its
    example size is the traced hint); the others stay static. Returns ``(args, dynamic_shapes)``.
    """
    args, dynamic = [], []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise ArtifactError(
                f"input {node.name} has no tensor metadata; save_artifact re-exports modules that come from "
                "ExportedProgram.module() (through prepare_pt2e / convert_pt2e / lower_quantized)"
            )
        shape, dims = [], {}
        for i, size in enumerate(val.shape):
            if isinstance(size, torch.SymInt):
                hint = size.node.hint if size.node.has_hint() else None
                shape.append(int(hint) if hint is not None else 2)
                dims[i] = Dim.AUTO
            else:
                shape.append(int(size))
        args.append(torch.zeros(shape, dtype=val.dtype, device=val.device))
        dynamic.append(dims or None)
    return tuple(args), tuple(dynamic)


def reexport(gm: fx.GraphModule) -> ExportedProgram:
    """``torch.export`` a lowered GraphModule again, keeping its dynamic dimensions (see `example_inputs`)."""
    args, dynamic = example_inputs(gm)
    with torch.no_grad():
        return torch.export.export(gm, args, dynamic_shapes=dynamic if any(d for d in dynamic) else None, strict=False)


def _write_program(ep: ExportedProgram, folder: Path, name: str) -> dict[str, Any]:
    """Write ``name.pt2`` (weights as meta placeholders) and ``name.safetensors``; returns manifest info."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for kind, table in (("state_dict", ep.state_dict), ("constants", ep.constants)):
        for key, value in table.items():
            if not isinstance(value, torch.Tensor):
                raise ArtifactError(f"{name} holds a non-tensor constant {key!r} ({type(value).__name__}); it cannot be saved")
            # clone: safetensors refuses tensors that share storage
            tensors[f"{kind}/{key}"] = value.detach().to("cpu").contiguous().clone()
    save_file(tensors, str(folder / f"{name}.safetensors"), metadata={"program": name})

    def meta_like(v: torch.Tensor) -> torch.Tensor:
        m = torch.empty_like(v, device="meta")
        return torch.nn.Parameter(m, requires_grad=False) if isinstance(v, torch.nn.Parameter) else m

    saved = (dict(ep.state_dict), dict(ep.constants))
    # torch.export.save also stores the example inputs: for the decoder step those are zero cross-attention
    # caches as large as the model's weights. The loader never needs them.
    ep.example_inputs = None
    try:
        for table in (ep.state_dict, ep.constants):
            for key in list(table):
                table[key] = meta_like(table[key])
        torch.export.save(ep, folder / f"{name}.pt2")
    finally:
        ep.state_dict.clear()
        ep.state_dict.update(saved[0])
        ep.constants.clear()
        ep.constants.update(saved[1])
    return {"program": f"{name}.pt2", "weights": f"{name}.safetensors", "tensors": len(tensors)}


def _json_ready(model_info: Mapping[str, Any]) -> dict[str, Any]:
    info = dict(model_info)
    if "max_cache_len" not in info or not isinstance(info["max_cache_len"], int):
        raise ValueError(
            "model_info must hold max_cache_len (int, ExportedWhisper.max_cache_len): the decoder program's cache size"
        )
    if dataclasses.is_dataclass(info.get("decoding")):
        info["decoding"] = dataclasses.asdict(info["decoding"])
    try:
        json.dumps(info)
    except TypeError as err:
        raise ValueError(f"model_info must be JSON-serialisable (str / int / float / list / dict): {err}") from None
    return info


def save_artifact(
    path: str | os.PathLike,
    encoder: torch.nn.Module,
    decoder_step: torch.nn.Module,
    scheme: Scheme,
    model_info: Mapping[str, Any],
    *,
    extra_files: Optional[Mapping[str, str | os.PathLike]] = None,
    overwrite: bool = False,
    aot_inductor: bool = False,
) -> Path:
    """Write a deployable artifact folder at ``path`` atomically.

    Args:
        path: the folder to create.
        encoder, decoder_step: the LOWERED modules (`torch_myqasr.lowering.lower_quantized` of the
            ``convert_pt2e`` results, without ``compute_dtype``); they are re-exported here.
        scheme: the scheme the quantizer used (``MyQASRQuantizer.scheme``).
        model_info: JSON-serialisable facts for the runtime; must hold ``max_cache_len`` (int).
            Suggested: ``model_id``, ``decoding`` (a `DecodingOptions`, stored as a dict and used by
            `LoadedArtifact.greedy_decode`), ``sampling_rate``, the WER the quantize step measured.
        extra_files: ``{name: source path}`` copied to ``extra/<name>`` (e.g. the tokenizer files).
        overwrite: replace an existing folder (it is swapped out only after the new one is complete).
        aot_inductor: also write ``<program>.aoti.pt2``, AOTInductor packages of the CPU deployment
            layout (`torch_myqasr.artifact.aoti`; compiles for minutes, doubles the folder, runs only on
            this machine's architecture). `load_artifact(..., aot_inductor=True)` loads them.
    Returns:
        the artifact folder.
    Raises:
        ArtifactError: a module is not lowered, or its packed bytes differ from the scheme's
            quantized bytes by more than `SIZE_TOLERANCE`.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True (or --overwrite) or choose another folder")
    info = _json_ready(model_info)
    modules = {"encoder": _graph_module(encoder, "encoder"), "decoder_step": _graph_module(decoder_step, "decoder_step")}
    packed = {name: quantized_weight_bytes(gm) for name, gm in modules.items()}
    scheme_bytes = sum(s.nbytes for s in scheme.layers.values() if s.format in QUANTIZED_FORMATS)
    total = sum(packed.values())
    if not math.isclose(total, scheme_bytes, rel_tol=SIZE_TOLERANCE, abs_tol=0):
        raise ArtifactError(
            f"the lowered modules hold {total} bytes of packed weights but the scheme's quantized layers take "
            f"{scheme_bytes}; pass the modules quantized with this scheme (both programs, lowered)"
        )

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        programs = {}
        for name, gm in modules.items():
            programs[name] = _write_program(reexport(gm), tmp, name)
            programs[name]["quantized_weight_bytes"] = packed[name]
        (tmp / "scheme.json").write_text(scheme.to_json(), encoding="utf-8")
        (tmp / "model_info.json").write_text(json.dumps(info, indent=2, sort_keys=True), encoding="utf-8")
        files = [f"{n}.{ext}" for n in PROGRAMS for ext in ("pt2", "safetensors")] + ["scheme.json", "model_info.json"]
        aoti: dict[str, Any] = {}
        if aot_inductor:
            from torch_myqasr.artifact.aoti import AOTI_SUFFIX, aoti_platform, compile_aoti_package

            for name, gm in modules.items():
                compile_aoti_package(gm, tmp / f"{name}{AOTI_SUFFIX}")
                files.append(f"{name}{AOTI_SUFFIX}")
            aoti = {"aoti": {"platform": aoti_platform(), "compute_dtype": "bfloat16",
                             "programs": {n: f"{n}{AOTI_SUFFIX}" for n in PROGRAMS}}}
        for name, source in (extra_files or {}).items():
            if "/" in name or name.startswith("."):
                raise ValueError(f"extra file name {name!r} must be a plain file name")
            (tmp / "extra").mkdir(exist_ok=True)
            shutil.copyfile(source, tmp / "extra" / name)
            files.append(f"extra/{name}")
        manifest = build_manifest(
            tmp, files,
            {"programs": programs, "scheme_quantized_bytes": scheme_bytes, "quantized_weight_bytes": total, **aoti},
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
        for p in tmp.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        tmp.chmod(0o755)  # mkdtemp makes it private; an artifact is meant to be read by a server
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


__all__ = ["PROGRAMS", "SIZE_TOLERANCE", "example_inputs", "reexport", "save_artifact"]
