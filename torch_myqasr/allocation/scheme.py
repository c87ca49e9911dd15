"""The scheme file: the per-layer choice for one user and one budget, as JSON.

Layout (``format_version`` 1; docs/allocation.md has an example)::

    {"format_version": 1, "model_id": "...", "strategy": "myqasr", "order": "low-score-first",
     "budget_mb": 20.0, "size_mb": 19.87, "size_bytes": 20835123, "fixed_bytes": 123456,
     "group_size": 64,
     "calibration": {"n_clips": 8, "seconds": 61.2, "audio_sha256": "...", "score": "median_abs"},
     "layers": {"<module name>": {"format": "int4", "bits": 4, "group_size": 64, "nbytes": 1234,
                                  "out_features": 384, "in_features": 384}, ...}}

Sizes are bytes (``*_bytes``, ``nbytes``) or MiB (``*_mb``, 2**20 bytes). ``layers`` is in model
order. Loading checks everything that can be checked: known formats, bits matching the format,
each layer's bytes against `weight_nbytes` (when its shape is stored), the total against
``size_bytes`` / ``size_mb``, and the total against the budget.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from torch_myqasr.allocation.layers import LayerScheme
from torch_myqasr.atomic import atomic_write_text
from torch_myqasr.formats import FORMATS, MIB, get_format, weight_nbytes

SCHEME_FORMAT_VERSION = 1
"""Version of the JSON layout written by `Scheme.to_json`; loading refuses newer versions."""

CALIBRATION_KEYS = ("n_clips", "seconds", "audio_sha256", "score")
"""Keys of `Scheme.calibration`: clips used, seconds of audio, sha256 of the audio, score name."""


class SchemeError(ValueError):
    """A scheme file or JSON text is malformed or inconsistent; the message says what and where."""


@dataclass
class Scheme:
    """The per-layer format choice for one model, user and budget.

    Attributes:
        model_id: which model the scheme is for (e.g. ``"whisper-tiny.en"``).
        budget_mb: the budget asked for, MiB (2**20 bytes).
        size_mb: achieved size, MiB: ``(fixed_bytes + sum of layer nbytes) / 2**20``.
        strategy: ``"myqasr"``, ``"optimal"``, ``"uniform"`` (or another allocator's name).
        group_size: the group size asked for (layers carry their own too).
        layers: ``{module name: LayerScheme}`` in model order.
        fixed_bytes: bytes not allocated per layer (norms, biases, positions, fp layers).
        calibration: ``n_clips``, ``seconds``, ``audio_sha256``, ``score`` (see `CALIBRATION_KEYS`).
        order: the ``myqasr`` sweep order used, when relevant.
        format_version: JSON layout version.
    """

    model_id: str
    budget_mb: float
    size_mb: float
    strategy: str
    group_size: int
    layers: dict[str, LayerScheme]
    fixed_bytes: int = 0
    calibration: dict[str, Any] = field(default_factory=dict)
    order: str | None = None
    format_version: int = SCHEME_FORMAT_VERSION

    @classmethod
    def build(
        cls,
        *,
        model_id: str,
        budget_mb: float,
        strategy: str,
        group_size: int,
        layers: Mapping[str, LayerScheme],
        fixed_bytes: int = 0,
        calibration: Mapping[str, Any] | None = None,
        order: str | None = None,
    ) -> "Scheme":
        """A `Scheme` whose ``size_mb`` is computed from ``layers`` and ``fixed_bytes``."""
        layers = dict(layers)
        size = fixed_bytes + sum(s.nbytes for s in layers.values())
        return cls(
            model_id=model_id,
            budget_mb=float(budget_mb),
            size_mb=size / MIB,
            strategy=strategy,
            group_size=group_size,
            layers=layers,
            fixed_bytes=fixed_bytes,
            calibration=dict(calibration or {}),
            order=order,
        )

    @property
    def size_bytes(self) -> int:
        """Achieved size in bytes: ``fixed_bytes`` plus every layer's ``nbytes``."""
        return self.fixed_bytes + sum(s.nbytes for s in self.layers.values())

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dictionary (see the module docstring for the layout)."""
        layers = {}
        for name, s in self.layers.items():
            entry: dict[str, Any] = {"format": s.format, "bits": s.bits, "group_size": s.group_size, "nbytes": s.nbytes}
            if s.out_features is not None and s.in_features is not None:
                entry["out_features"] = s.out_features
                entry["in_features"] = s.in_features
            layers[name] = entry
        return {
            "format_version": self.format_version,
            "model_id": self.model_id,
            "strategy": self.strategy,
            "order": self.order,
            "budget_mb": self.budget_mb,
            "size_mb": self.size_mb,
            "size_bytes": self.size_bytes,
            "fixed_bytes": self.fixed_bytes,
            "group_size": self.group_size,
            "calibration": dict(self.calibration),
            "layers": layers,
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The scheme as JSON text (UTF-8 safe, layers in model order)."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "scheme") -> "Scheme":
        """Build and validate a `Scheme` from a parsed JSON object; `SchemeError` names any problem."""
        return _parse(data, source)

    @classmethod
    def from_json(cls, text: str, *, source: str = "scheme JSON") -> "Scheme":
        """Parse and validate JSON text written by `to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SchemeError(
                f"{source} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                "re-create it with `myqasr quantize` or fix the file by hand"
            ) from None
        return _parse(data, source)


def _need(d: Mapping[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise SchemeError(f"{where}: missing key {key!r}")
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, types):
        names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise SchemeError(f"{where}: {key!r} must be {names}, got {v!r}")
    return v


def _parse_layer(name: str, e: Any, where: str) -> LayerScheme:
    here = f"{where}: layer {name!r}"
    if not isinstance(e, dict):
        raise SchemeError(f"{here} must be an object with format, bits, group_size, nbytes")
    fmt = _need(e, "format", str, here)
    if fmt not in FORMATS:
        raise SchemeError(f"{here}: unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
    f = get_format(fmt)
    bits = _need(e, "bits", int, here)
    if bits != f.bits:
        raise SchemeError(f"{here}: bits {bits} does not match format {fmt} ({f.bits} bits)")
    gs = _need(e, "group_size", int, here)
    if f.grouped and gs <= 0:
        raise SchemeError(f"{here}: group_size must be positive for {fmt}, got {gs}")
    nbytes = _need(e, "nbytes", int, here)
    n, k = e.get("out_features"), e.get("in_features")
    if (n is None) != (k is None):
        raise SchemeError(f"{here}: give both out_features and in_features or neither")
    if n is not None:
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (n, k)):
            raise SchemeError(f"{here}: out_features / in_features must be positive ints, got {n!r}, {k!r}")
        expect = weight_nbytes(fmt, n, k, gs if f.grouped else 1)
        if nbytes != expect:
            raise SchemeError(
                f"{here}: nbytes {nbytes} does not add up: a [{n}, {k}] weight in {fmt} with group size "
                f"{gs} takes {expect} bytes"
            )
    elif nbytes < 0:
        raise SchemeError(f"{here}: nbytes must be non-negative, got {nbytes}")
    return LayerScheme(fmt, bits, gs, nbytes, n, k)


def _parse(data: Any, source: str) -> Scheme:
    if not isinstance(data, dict):
        raise SchemeError(f"{source}: the top level must be a JSON object, got {type(data).__name__}")
    version = data.get("format_version", SCHEME_FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version > SCHEME_FORMAT_VERSION or version < 1:
        raise SchemeError(
            f"{source}: format_version {version!r} is not supported (this torch_myqasr reads 1.."
            f"{SCHEME_FORMAT_VERSION}); upgrade torch_myqasr or re-create the scheme"
        )
    budget = float(_need(data, "budget_mb", (int, float), source))
    size_mb = float(_need(data, "size_mb", (int, float), source))
    strategy = _need(data, "strategy", str, source)
    raw_layers = _need(data, "layers", dict, source)
    layers = {name: _parse_layer(name, e, source) for name, e in raw_layers.items()}
    grouped = [s.group_size for s in layers.values() if get_format(s.format).grouped]
    group_size = data.get("group_size", grouped[0] if grouped else 0)
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise SchemeError(f"{source}: 'group_size' must be int, got {group_size!r}")
    fixed = data.get("fixed_bytes", 0)
    if not isinstance(fixed, int) or isinstance(fixed, bool) or fixed < 0:
        raise SchemeError(f"{source}: 'fixed_bytes' must be a non-negative int, got {fixed!r}")
    calibration = data.get("calibration", {})
    if not isinstance(calibration, dict):
        raise SchemeError(f"{source}: 'calibration' must be an object, got {calibration!r}")
    for key, types in (("n_clips", int), ("seconds", (int, float)), ("audio_sha256", str), ("score", str)):
        if key in calibration and (isinstance(calibration[key], bool) or not isinstance(calibration[key], types)):
            raise SchemeError(f"{source}: calibration {key!r} has the wrong type: {calibration[key]!r}")
    order = data.get("order")
    if order is not None and not isinstance(order, str):
        raise SchemeError(f"{source}: 'order' must be a string or null, got {order!r}")
    scheme = Scheme(
        model_id=str(data.get("model_id", "")),
        budget_mb=budget,
        size_mb=size_mb,
        strategy=strategy,
        group_size=group_size,
        layers=layers,
        fixed_bytes=fixed,
        calibration=calibration,
        order=order,
        format_version=version,
    )
    total = scheme.size_bytes
    stored = data.get("size_bytes", total)
    # size_mb is a float of a byte count; half a byte of slack absorbs only float rounding.
    if stored != total or not math.isclose(size_mb * MIB, total, rel_tol=0, abs_tol=0.5):
        raise SchemeError(
            f"{source}: the size does not add up: fixed_bytes + layer nbytes = {total} bytes "
            f"({total / MIB:.6f} MiB) but the file says size_bytes {stored}, size_mb {size_mb}"
        )
    if total > math.floor(budget * MIB):
        raise SchemeError(
            f"{source}: achieved size {total / MIB:.6f} MiB exceeds the budget {budget} MiB; "
            "the scheme is corrupt or was edited by hand"
        )
    return scheme


def save_scheme(scheme: Scheme, path: str | os.PathLike) -> Path:
    """Write ``scheme`` as JSON to ``path`` atomically (temp file + os.replace); returns the path.

    The scheme is validated first (by parsing its own JSON), so an inconsistent scheme is never
    written.
    """
    text = scheme.to_json()
    Scheme.from_json(text, source="scheme to save")
    path = Path(path)
    atomic_write_text(path, text)
    return path


def load_scheme(path: str | os.PathLike) -> Scheme:
    """Read and validate a scheme JSON file (a folder means ``folder/scheme.json``).

    Raises:
        FileNotFoundError: no such file.
        SchemeError: bad JSON, missing keys, unknown format, or sizes that do not add up.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "scheme.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"scheme file {str(p)!r} not found; write one with `myqasr quantize ... --out DIR` "
            "(it creates DIR/scheme.json) or `save_scheme(scheme, path)`"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SchemeError(f"scheme file {str(p)!r} is not UTF-8 text ({e.reason})") from None
    return Scheme.from_json(text, source=f"scheme file {str(p)!r}")


def bit_histogram(scheme: Scheme) -> dict[str, int]:
    """Number of layers in each format, most bits first (ties by name); only formats in use."""
    counts: dict[str, int] = {}
    for s in scheme.layers.values():
        counts[s.format] = counts.get(s.format, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-get_format(kv[0]).bits, kv[0])))


def format_scheme_summary(scheme: Scheme, width: int = 30) -> str:
    """A few lines for the CLI: achieved size against the budget and a per-format histogram.

    Args:
        scheme: the scheme to describe.
        width: characters of the longest histogram bar.
    """
    size, budget = scheme.size_bytes / MIB, scheme.budget_mb
    order = f", order {scheme.order}" if scheme.order else ""
    lines = [
        f"scheme for {scheme.model_id or '(unnamed model)'}: strategy {scheme.strategy}{order}, group size {scheme.group_size}",
        f"size {size:.3f} MiB of {budget:.3f} MiB budget ({100 * size / budget:.1f}%), "
        f"{scheme.fixed_bytes / MIB:.3f} MiB fixed (not allocated), {len(scheme.layers)} layers",
    ]
    numel = sum(s.out_features * s.in_features for s in scheme.layers.values() if s.out_features and s.in_features)
    if numel and all(s.out_features for s in scheme.layers.values()):
        lines.append(f"average {8 * sum(s.nbytes for s in scheme.layers.values()) / numel:.3f} bits per weight (scales included)")
    hist = bit_histogram(scheme)
    most = max(hist.values(), default=0)
    by_fmt: dict[str, int] = {}
    for s in scheme.layers.values():
        by_fmt[s.format] = by_fmt.get(s.format, 0) + s.nbytes
    for fmt, count in hist.items():
        bar = "#" * max(1, round(width * count / most))
        lines.append(f"  {fmt:>5} | {bar:<{width}} | {count:4d} layers {by_fmt[fmt] / MIB:9.3f} MiB")
    return "\n".join(lines)


def uniform_size_mb(scheme: Scheme, fmt: str) -> float:
    """Size in MiB the model of ``scheme`` would take with every allocated layer in ``fmt``.

    Uses the scheme's own layer shapes, group size and fixed bytes, so it is the uniform baseline at
    exactly the accounting the scheme used (e.g. to place a budget halfway between int3 and int4).
    """
    total = scheme.fixed_bytes
    for name, layer in scheme.layers.items():
        if layer.out_features is None or layer.in_features is None:
            raise SchemeError(f"layer {name!r} of the scheme has no shape; re-create the scheme with this version")
        total += weight_nbytes(fmt, layer.out_features, layer.in_features, scheme.group_size)
    return total / MIB


def budget_for_bits(scheme: Scheme, bits_per_weight: float) -> float:
    """Budget in MiB at ``bits_per_weight`` average integer bits: linear between the uniform sizes.

    E.g. 3.5 is halfway between the uniform int3 and int4 sizes of the model ``scheme`` describes
    (same group size, everything counted); rounded down to 0.001 MiB so it never exceeds that point.
    """
    lo, hi = math.floor(bits_per_weight), math.ceil(bits_per_weight)
    size_lo = uniform_size_mb(scheme, f"int{lo}")
    if lo == hi:
        return size_lo
    size_hi = uniform_size_mb(scheme, f"int{hi}")
    return math.floor((size_lo + (bits_per_weight - lo) * (size_hi - size_lo)) * 1000) / 1000

