"""AOTInductor packages of the CPU deployment: each program compiled ahead of time into a ``.pt2`` package.

What it holds: the lowered program in the CPU layout (`torch_myqasr.lowering.use_cpu_kernels`:
weights in aten's int4 layout, bfloat16 matmuls), compiled by inductor into a shared library with
its weights inside. Loading it (`torch._inductor.aoti_load_package`) needs no tracing and no
compilation, so a server skips ``torch.compile``'s warm-up. The ``myqasr::`` ops stay calls into
this library's implementations (``import torch_myqasr`` registers them; AOTInductor calls them
through its proxy executor), so a package runs in a process with torch_myqasr installed.

Where the platform allows: the package is machine code for the CPU that built it (x86-64 with the
instruction sets inductor detected); the manifest records ``platform.machine()`` and the loader
refuses another. It doubles the artifact on disk (the weights are stored again inside the package).
"""

from __future__ import annotations

import copy
import platform
from pathlib import Path

import torch
from torch import fx

AOTI_SUFFIX = ".aoti.pt2"
"""File name suffix of a program's AOTInductor package inside the artifact (``encoder.aoti.pt2``)."""


def compile_aoti_package(gm: fx.GraphModule, path: Path, *, compute_dtype: torch.dtype = torch.bfloat16) -> Path:
    """Compile a copy of the portable lowered ``gm`` in the CPU layout into an AOTInductor package at ``path``.

    Takes seconds to minutes on CPU (inductor's C++ codegen and the compiler). ``gm`` is not changed.
    """
    from torch_myqasr.artifact.save import reexport
    from torch_myqasr.lowering import use_cpu_kernels

    cpu = use_cpu_kernels(copy.deepcopy(gm), compute_dtype=compute_dtype)
    ep = reexport(cpu)
    with torch.no_grad():
        return Path(torch._inductor.aoti_compile_and_package(ep, package_path=str(path)))


def aoti_platform() -> str:
    """The machine architecture an AOTInductor package built here runs on (``platform.machine()``)."""
    return platform.machine()


def load_aoti_package(path: Path):
    """The callable of an AOTInductor package (same inputs and outputs as the exported program)."""
    return torch._inductor.aoti_load_package(str(path))


__all__ = ["AOTI_SUFFIX", "aoti_platform", "compile_aoti_package", "load_aoti_package"]
