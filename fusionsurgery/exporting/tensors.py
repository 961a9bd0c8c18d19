"""Output tensors described as parts of source tensors, and their bytes produced one chunk at a time.

An export is a list of ``OutTensor``: each is a concatenation of ``Part``s (rows of a source tensor,
optionally with the rows of every head permuted, or zero rows), cast to the output dtype only where
it differs. Nothing holds more than one chunk of one tensor in memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..io.checkpoint import Checkpoint
from ..io.digest import DEFAULT_ALGORITHM, new_hash
from ..io.safetensors_format import DTYPE_SIZES, SafetensorsHeader, build_header, header_from_prefix, read_exact
from ..io.writer import MAX_SHARD_BYTES, SafetensorsWriter, group_into_shards
from ..version import __version__
from ..arch.rope_layout import permute_heads
from ..io.progress import Progress

#: Bytes read per chunk.
CHUNK_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Part:
    """``rows`` rows of ``source`` from ``first_row`` (all of them when ``rows`` is None), or zero rows."""

    source: str | None
    first_row: int = 0
    rows: int | None = None
    head_perm: tuple[int, ...] | None = None  # permutation inside every block of len(head_perm) rows


@dataclass
class OutTensor:
    key: str
    dtype: str
    shape: tuple[int, ...]
    parts: list[Part]
    transform: str | None = None  # how its bytes differ from its source's; None: the same bytes
    sources: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def same(ckpt: Checkpoint, src: str, key: str, *, head_perm: tuple[int, ...] | None = None,
         transform: str | None = None) -> OutTensor:
    """``src`` under the name ``key``: same dtype, shape and bytes (rows moved when ``head_perm``)."""
    info = ckpt.info(src)
    return OutTensor(key, info.dtype, info.shape, [Part(src, head_perm=head_perm)], transform, [src])


def _row_layout(shape: tuple[int, ...]) -> tuple[int, int]:
    rows = shape[0] if shape else 1
    return rows, (math.prod(shape[1:]) if len(shape) > 1 else 1)


def part_rows(ckpt: Checkpoint, part: Part) -> int:
    if part.source is None:
        assert part.rows is not None
        return part.rows
    rows, _ = _row_layout(ckpt.info(part.source).shape)
    return rows - part.first_row if part.rows is None else part.rows


def check(ckpt: Checkpoint, t: OutTensor) -> None:
    """The parts must exactly fill the output shape."""
    rows, cols = _row_layout(t.shape)
    total = 0
    for part in t.parts:
        if part.source is not None:
            info = ckpt.info(part.source)
            src_rows, src_cols = _row_layout(info.shape)
            n = part_rows(ckpt, part)
            if src_cols != cols or part.first_row + n > src_rows:
                raise CheckpointError(f"{t.key}: {part.source} {list(info.shape)} does not fit {list(t.shape)}")
            if part.head_perm and n % len(part.head_perm):
                raise CheckpointError(f"{t.key}: {n} rows of {part.source} are not whole heads")
        total += part_rows(ckpt, part)
    if total != rows:
        raise CheckpointError(f"{t.key}: parts give {total} rows, the shape needs {rows}")


def chunks(ckpt: Checkpoint, t: OutTensor) -> Iterator[bytes]:
    """The output bytes of ``t``, chunk by chunk."""
    _, cols = _row_layout(t.shape)
    out_row = cols * DTYPE_SIZES[t.dtype]
    for part in t.parts:
        n = part_rows(ckpt, part)
        if part.source is None:
            step = max(1, CHUNK_BYTES // max(out_row, 1))
            for r0 in range(0, n, step):
                yield bytes(min(step, n - r0) * out_row)
            continue
        info = ckpt.info(part.source)
        src_row = cols * DTYPE_SIZES[info.dtype]
        unit = len(part.head_perm) if part.head_perm else 1
        step = max(unit, (CHUNK_BYTES // max(src_row, 1)) // unit * unit)
        with open(ckpt.path_of(ckpt.key_to_file[part.source]), "rb") as fh:
            for r0 in range(0, n, step):
                k = min(step, n - r0)
                raw = read_exact(fh, info.start + (part.first_row + r0) * src_row, k * src_row)
                if part.head_perm:
                    raw = permute_heads(raw, src_row, part.head_perm)
                yield raw if info.dtype == t.dtype else _cast(raw, info.dtype, t.dtype)


def _cast(raw: bytes, src: str, dst: str) -> bytes:
    from ..io.torch_dtypes import TORCH_DTYPES, tensor_bytes
    import torch

    values = torch.frombuffer(bytearray(raw), dtype=TORCH_DTYPES[src])
    return tensor_bytes(values.to(TORCH_DTYPES[dst]))


def shard_names(count: int, stem: str = "model", numbered: bool = False) -> list[str]:
    """``<stem>.safetensors`` for one shard (unless ``numbered``), else ``<stem>-00001-of-0000N.safetensors``..."""
    if count == 1 and not numbered:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


@dataclass
class PlannedShard:
    """One output file: its name, its tensors in order, and its header bytes."""

    name: str
    tensors: list[OutTensor]
    metadata: dict[str, str]

    @property
    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        return [(t.key, t.dtype, t.shape) for t in self.tensors]

    @property
    def prefix(self) -> bytes:
        return build_header(self.entries, self.metadata)[0]

    @property
    def file_size(self) -> int:
        return len(self.prefix) + sum(t.nbytes for t in self.tensors)

    def header(self, directory: Path) -> SafetensorsHeader:
        """The header the file will have (written or not) in ``directory``."""
        return header_from_prefix(directory / self.name, self.prefix, self.file_size)


def plan_shards(tensors: list[OutTensor], *, max_shard_bytes: int = MAX_SHARD_BYTES, stem: str = "model",
                numbered: bool = False, metadata: dict[str, str] | None = None) -> list[PlannedShard]:
    """The files ``tensors`` are written to: at most ``max_shard_bytes`` each, in order."""
    groups = group_into_shards(tensors, max_shard_bytes)
    meta = {"format": "pt", "producer": f"fusionsurgery {__version__}", **(metadata or {})}
    return [PlannedShard(name, group, meta) for name, group in zip(shard_names(len(groups), stem, numbered), groups)]


def write_tensors(ckpt: Checkpoint, tensors: list[OutTensor], directory: Path, *,
                  progress: Progress | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
                  metadata: dict[str, str] | None = None, algorithm: str = DEFAULT_ALGORITHM,
                  stem: str = "model", numbered: bool = False) -> tuple[dict[str, str], dict[str, str]]:
    """Write ``tensors`` into ``<stem>*.safetensors`` shards; returns (key -> file, key -> digest)."""
    return write_shards(ckpt, plan_shards(tensors, max_shard_bytes=max_shard_bytes, stem=stem, numbered=numbered,
                                          metadata=metadata), directory, progress=progress, algorithm=algorithm)


def write_shards(ckpt: Checkpoint, shards: list[PlannedShard], directory: Path | None, *,
                 progress: Progress | None = None,
                 algorithm: str = DEFAULT_ALGORITHM) -> tuple[dict[str, str], dict[str, str]]:
    """Write planned shards into ``directory`` (or, with None, only digest what they would hold);
    returns (key -> file, key -> digest)."""
    for shard in shards:
        for t in shard.tensors:
            check(ckpt, t)
    files: dict[str, str] = {}
    digests: dict[str, str] = {}
    for shard in shards:
        if directory is None:
            for t in shard.tensors:
                digests[t.key] = digest_chunks(chunks(ckpt, t), algorithm, progress)
                files[t.key] = shard.name
            continue
        with SafetensorsWriter(directory / shard.name, shard.entries, shard.metadata, algorithm) as writer:
            for t in shard.tensors:
                digests[t.key] = writer.write(t.key, chunks(ckpt, t), progress)
                files[t.key] = shard.name
    return files, digests


def digest_chunks(parts: Iterator[bytes], algorithm: str, progress: Progress | None = None) -> str:
    """The digest of a tensor's bytes, given as chunks."""
    h = new_hash(algorithm)
    for chunk in parts:
        h.update(chunk)
        if progress:
            progress(len(chunk))
    return h.hexdigest()


def index_doc(files: dict[str, str], tensors: list[OutTensor]) -> dict[str, Any]:
    return {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": dict(sorted(files.items()))}
