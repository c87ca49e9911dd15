"""`plot_scheme`: bits per layer in model order, as a PNG."""

from __future__ import annotations

import io
import os
from pathlib import Path

from torch_myqasr.allocation.scheme import Scheme
from torch_myqasr.atomic import atomic_write_bytes
from torch_myqasr.formats import MIB


def plot_scheme(scheme: Scheme, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Draw one bar per layer (height = bits per weight value, model order) and save it as PNG.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change), and writes the
    file atomically. Returns the path.

    Args:
        scheme: the scheme to draw.
        path: where to write the PNG.
        title: plot title; by default model, strategy, achieved size and budget (MiB).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    names = list(scheme.layers)
    bits = [scheme.layers[n].bits for n in names]
    formats = [scheme.layers[n].format for n in names]
    palette = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]
    kinds = sorted(set(formats), key=lambda f: (-scheme.layers[names[formats.index(f)]].bits, f))
    color = {f: palette[i % len(palette)] for i, f in enumerate(kinds)}

    fig = Figure(figsize=(max(6.0, min(24.0, 0.08 * len(names) + 4)), 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(names)), bits, width=0.9, color=[color[f] for f in formats])
    if names:  # one legend entry per format in use, above the bars
        handles = [Patch(color=color[f], label=f) for f in kinds]
        ax.legend(handles=handles, loc="upper right", fontsize=8, ncol=len(kinds))
        ax.set_ylim(0, max(bits) * 1.3)
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("bits per weight value")
    ax.set_xlim(-0.5, max(len(names), 1) - 0.5)
    if len(names) <= 40:
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_title(
        title
        or f"{scheme.model_id or 'model'} - {scheme.strategy}: {scheme.size_bytes / MIB:.2f} of {scheme.budget_mb:.2f} MiB",
        fontsize=10,
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
