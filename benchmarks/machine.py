"""Names the machine a benchmark ran on, so every committed figure says where it came from."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform.processor())."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe_machine() -> dict:
    """Device, CPU, thread count and software versions of this run, as a JSON-able dict."""
    import torch

    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def machine_slug() -> str:
    """Short file-name-safe name of the device: the GPU if there is one, else ``cpu<N>``."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name().lower().replace("nvidia ", "").replace(" ", "-")
    return f"cpu{os.cpu_count()}"


def machine_line() -> str:
    """One human-readable line naming the machine, for the top of a results table."""
    m = describe_machine()
    dev = f"{m['gpu']} (CUDA {m['cuda']}), " if "gpu" in m else ""
    return f"{dev}{m['cpu']}, {m['cpu_count']} cores ({m['torch_threads']} torch threads), torch {m['torch']}, Python {m['python']}"
