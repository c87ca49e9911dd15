"""Reader for CTranslate2's ``model.bin`` (binary format version 6), with no ctranslate2 dependency.

Layout (little-endian): u32 version; string model name; u32 revision; u32 variable count; per
variable: string name, u8 rank, rank x u32 dims, u8 dtype, u32 byte count, raw bytes; then u32
alias count and (alias, target) string pairs. A string is a u16 length that counts a trailing NUL,
then the bytes. Reading is strict: any field running past the end of the file, a byte count that
disagrees with the shape, or trailing garbage raises `CorruptModelError` naming the file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUPPORTED_BINARY_VERSION = 6

# CTranslate2's DataType enum, in file order.
_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),  # bfloat16: raw 16-bit pattern; `bf16_to_float32` widens it
}


class CorruptModelError(ValueError):
    """A model file is truncated, corrupted or of an unsupported version."""


@dataclass
class CTranslate2Model:
    """The contents of a ``model.bin``: model spec name, revision and named arrays.

    ``variables`` maps names such as ``encoder/layer_0/ffn/linear_0/weight`` to numpy arrays
    (bfloat16 arrives as uint16 bit patterns, see `bf16_to_float32`); aliases are resolved.
    """

    spec_name: str
    revision: int
    variables: dict[str, np.ndarray]
    bf16_names: frozenset[str] = frozenset()

    def float32(self, name: str) -> np.ndarray:
        """Variable ``name`` widened to float32 (bf16 and fp16 alike); KeyError names what exists."""
        try:
            arr = self.variables[name]
        except KeyError:
            raise KeyError(f"variable {name!r} not in the model (it has {len(self.variables)} variables)") from None
        if name in self.bf16_names:
            return bf16_to_float32(arr)
        return arr.astype(np.float32)


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class _Cursor:
    def __init__(self, data: memoryview, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise CorruptModelError(
                f"{self.path}: truncated or corrupted while reading {what} at byte {self.pos} "
                f"(needs {n} bytes, file has {len(self.data)}); reinstall the model package or re-copy the file"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(size, what))

    def string(self, what: str) -> str:
        (length,) = self.unpack("<H", f"length of {what}")
        raw = bytes(self.take(length, what))
        if length == 0 or raw[-1] != 0:
            raise CorruptModelError(f"{self.path}: {what} is not NUL-terminated at byte {self.pos}: the file is corrupted")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptModelError(f"{self.path}: {what} is not valid UTF-8: the file is corrupted") from None


def read_ctranslate2_model(path: str | Path) -> CTranslate2Model:
    """Read a CTranslate2 ``model.bin`` (binary version 6) into numpy arrays.

    The arrays are copies, so the file can be closed or replaced afterwards. Raises
    `CorruptModelError` for truncated, corrupted or unsupported files and FileNotFoundError
    (naming the path) when the file is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CTranslate2 model file not found: {path}")
    data = memoryview(path.read_bytes())
    cur = _Cursor(data, path)
    (version,) = cur.unpack("<I", "binary version")
    if version != SUPPORTED_BINARY_VERSION:
        raise CorruptModelError(
            f"{path}: CTranslate2 binary version {version} is not supported (only {SUPPORTED_BINARY_VERSION}); "
            "convert the model with a CTranslate2 4.x converter"
        )
    spec_name = cur.string("model spec name")
    (revision,) = cur.unpack("<I", "spec revision")
    (count,) = cur.unpack("<I", "variable count")
    variables: dict[str, np.ndarray] = {}
    bf16: set[str] = set()
    for i in range(count):
        name = cur.string(f"name of variable {i}")
        (rank,) = cur.unpack("<B", f"rank of {name}")
        dims = cur.unpack(f"<{rank}I", f"shape of {name}") if rank else ()
        (dtype_id,) = cur.unpack("<B", f"dtype of {name}")
        if dtype_id not in _DTYPES:
            raise CorruptModelError(f"{path}: variable {name!r} has unknown dtype id {dtype_id}: the file is corrupted")
        dtype = _DTYPES[dtype_id]
        (nbytes,) = cur.unpack("<I", f"byte count of {name}")
        expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
        if nbytes != expected:
            raise CorruptModelError(
                f"{path}: variable {name!r} has {nbytes} bytes but shape {tuple(dims)} of {dtype} needs {expected}: "
                "the file is corrupted"
            )
        raw = cur.take(nbytes, f"data of {name}")
        variables[name] = np.frombuffer(raw, dtype=dtype).reshape(dims).copy()
        if dtype_id == 5:
            bf16.add(name)
    if cur.pos < len(data):
        (n_alias,) = cur.unpack("<I", "alias count")
        for _ in range(n_alias):
            alias = cur.string("alias name")
            target = cur.string("alias target")
            if target not in variables:
                raise CorruptModelError(f"{path}: alias {alias!r} points to missing variable {target!r}")
            variables[alias] = variables[target]
            if target in bf16:
                bf16.add(alias)
    if cur.pos != len(data):
        raise CorruptModelError(f"{path}: {len(data) - cur.pos} unexpected trailing bytes: the file is corrupted")
    return CTranslate2Model(spec_name, revision, variables, frozenset(bf16))
