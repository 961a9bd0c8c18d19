"""The safetensors file format: a strict header parser and a header writer.

Layout: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON, then the tensor bytes.
Each JSON entry gives ``dtype``, ``shape`` and ``data_offsets`` (relative to the data start); an
optional ``__metadata__`` maps strings to strings. This module never imports torch.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import CheckpointError
from .manifest_schema import is_int

#: Bytes per element for every dtype the format defines.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,  # E8M0: MXFP4's power-of-two scales
    "C64": 8,
}

#: safetensors' own limit on the header size; anything larger is refused before it is read.
MAX_HEADER_BYTES = 100 * 1024 * 1024
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header, with absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed header: tensors in file order, metadata and the data region."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_header_bytes(raw: bytes, data_size: int, where: str) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Validate a header's JSON bytes against a data region of ``data_size`` bytes.

    Returns tensors (offsets relative to the data start), metadata and the header length.
    Raises ``CheckpointError`` naming ``where`` on any inconsistency.
    """
    try:
        text = raw.decode("utf-8")
        doc = json.loads(text, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where}: header is not valid JSON ({exc}); not a safetensors file?") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{where}: header is not a JSON object; not a safetensors file?")
    metadata = doc.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{where}: __metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        tensors[name] = _parse_entry(name, entry, where)
    spans = sorted(tensors.values(), key=lambda t: (t.start, t.end))
    cursor = 0
    for info in spans:
        if info.start < cursor:
            raise CheckpointError(f"{where}: tensor {info.name!r} overlaps the tensor before it (data_offsets)")
        if info.start > cursor:
            raise CheckpointError(f"{where}: gap in the data before tensor {info.name!r} (data_offsets out of order)")
        cursor = info.end
    if cursor != data_size:
        if cursor > data_size:
            raise CheckpointError(
                f"{where}: tensor data runs past the end of the file ({cursor} > {data_size} bytes); truncated?"
            )
        raise CheckpointError(f"{where}: {data_size - cursor} trailing bytes after the last tensor")
    return tensors, metadata, len(raw)


def _parse_entry(name: str, entry: Any, where: str) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: entry for {name!r} is not an object")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise CheckpointError(f"{where}: tensor {name!r} has unknown dtype {dtype!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: tensor {name!r} has an invalid shape {shape!r}")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(is_int(o) and o >= 0 for o in offsets)
        or offsets[1] < offsets[0]
    ):
        raise CheckpointError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}")
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise CheckpointError(
            f"{where}: tensor {name!r} has shape {shape} {dtype} ({nbytes} bytes) "
            f"but data_offsets span {offsets[1] - offsets[0]} bytes"
        )
    return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])


def read_header(path: Path) -> SafetensorsHeader:
    """Read and validate a safetensors file's header, touching no tensor data."""
    where = str(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 8:
                raise CheckpointError(f"{where}: too short to be a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{where}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit; not a safetensors file?"
                )
            if n > size - 8:
                raise CheckpointError(f"{where}: header length {n} is past the end of the file; truncated?")
            raw = fh.read(n)
    except OSError as exc:
        raise CheckpointError(f"{where}: cannot read ({exc.strerror or exc})") from None
    return header_from_prefix(path, struct.pack("<Q", n) + raw, size)


def header_from_prefix(path: Path, prefix: bytes, file_size: int) -> SafetensorsHeader:
    """The header of a ``file_size``-byte file at ``path`` that starts with ``prefix`` (length + JSON):
    what ``read_header`` gives, also for a file not written yet (``build_header``'s prefix)."""
    where = str(path)
    rel, metadata, _ = parse_header_bytes(prefix[8:], file_size - len(prefix), where)
    base = len(prefix)
    tensors = {
        name: TensorInfo(name, t.dtype, t.shape, base + t.start, base + t.end)
        for name, t in sorted(rel.items(), key=lambda kv: kv[1].start)
    }
    return SafetensorsHeader(path, tensors, metadata, base, file_size)


def build_header(
    entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Serialise a header for tensors written in the given order.

    Returns the full prefix (length + JSON, padded with spaces to 8-byte alignment) and each
    tensor's (start, end) offsets relative to the data start.
    """
    doc: dict[str, Any] = {}
    if metadata:
        doc[METADATA_KEY] = dict(metadata)
    offsets: dict[str, tuple[int, int]] = {}
    cursor = 0
    for name, dtype, shape in entries:
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise ValueError(f"unknown dtype {dtype!r}")
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, cursor + nbytes]}
        offsets[name] = (cursor, cursor + nbytes)
        cursor += nbytes
    body = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    body += b" " * (-(len(body) + 8) % 8)
    return struct.pack("<Q", len(body)) + body, offsets


def read_exact(fh: BinaryIO, start: int, nbytes: int) -> bytes:
    """Read exactly ``nbytes`` at ``start`` or raise ``CheckpointError`` (file shrank)."""
    fh.seek(start)
    data = fh.read(nbytes)
    if len(data) != nbytes:
        raise CheckpointError(f"{getattr(fh, 'name', 'file')}: file shorter than its header says; truncated?")
    return data
