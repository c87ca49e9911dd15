"""The artifact manifest: format version, library versions, and the sha256 of every file.

``manifest.json`` is written last (inside the temporary folder, before the rename), so a folder
that has one was written completely. Loading re-hashes every listed file; any difference is an
`ArtifactError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import torch

ARTIFACT_FORMAT_VERSION = 1
"""Layout version of the artifact folder; bump it when files or their meaning change."""

MANIFEST = "manifest.json"


class ArtifactError(RuntimeError):
    """An artifact folder is missing a file, fails its checksum, or was written by other versions."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in ``chunk``-byte pieces (bytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def current_versions() -> dict[str, str]:
    """Versions that decide whether a saved program can be loaded: torch_myqasr, torch, python."""
    import torch_myqasr

    return {"torch_myqasr": torch_myqasr.__version__, "torch": torch.__version__, "python": platform.python_version()}


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def version_problems(saved: dict[str, str]) -> list[str]:
    """Human-readable mismatches between ``saved`` versions and this process's (empty when compatible).

    torch_myqasr must match exactly (the op schemas and the lowering live there); torch must match
    in major.minor (``torch.export`` serialization is not promised across minor releases); Python
    is recorded but not checked.
    """
    now = current_versions()
    problems = []
    if saved.get("torch_myqasr") != now["torch_myqasr"]:
        problems.append(f"torch_myqasr {saved.get('torch_myqasr')} wrote it, this is {now['torch_myqasr']}")
    if _major_minor(saved.get("torch", "?")) != _major_minor(now["torch"]):
        problems.append(f"torch {saved.get('torch')} wrote it, this is {now['torch']}")
    return problems


def build_manifest(folder: Path, files: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    """The manifest dict for ``files`` (names relative to ``folder``) plus ``extra`` entries."""
    entries = {name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size} for name in files}
    return {"format_version": ARTIFACT_FORMAT_VERSION, "versions": current_versions(), "files": entries, **extra}


def read_manifest(folder: Path) -> dict[str, Any]:
    """Parse ``folder/manifest.json``; an `ArtifactError` says what is wrong and how to fix it."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not a folder; pass the directory `myqasr quantize --out DIR` wrote")
    if not path.is_file():
        raise ArtifactError(
            f"{path} is missing: {folder} is not a complete myqasr artifact (the manifest is written last); "
            "re-create it with save_artifact / `myqasr quantize --out DIR`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}); re-create the artifact") from err
    if manifest.get("format_version") != ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(
            f"{folder} has artifact format version {manifest.get('format_version')!r}, this torch_myqasr reads "
            f"version {ARTIFACT_FORMAT_VERSION}; re-create the artifact with this version"
        )
    return manifest


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Check every file the manifest lists exists with its recorded size and sha256."""
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"artifact file {path} is missing; the artifact is incomplete, re-create it")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise ArtifactError(
                f"checksum mismatch for {path}: the file changed after the artifact was written "
                "(corrupt copy or edited by hand); copy the artifact again or re-create it"
            )


__all__ = [
    "ARTIFACT_FORMAT_VERSION",
    "ArtifactError",
    "MANIFEST",
    "build_manifest",
    "current_versions",
    "read_manifest",
    "sha256_file",
    "verify_files",
    "version_problems",
]
