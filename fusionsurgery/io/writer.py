"""Streaming safetensors writes: one file written tensor by tensor in header order, and the grouping of
tensors into shards."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Protocol, TypeVar

from .digest import DEFAULT_ALGORITHM, new_hash
from .direct import DirectFile
from .progress import Progress
from .safetensors_format import build_header


class SafetensorsWriter:
    """Writes a safetensors file whose tensors are given in header order, chunk by chunk.

    Used as a context manager: the file is closed (and checked complete) when the block ends, and
    aborted (removed, nothing half-written left behind) when the block raises.

    Args:
        path (Path): the file to write.
        entries (list[tuple[str, str, tuple[int, ...]]]): ``(name, safetensors dtype, shape)`` in file order.
        metadata (dict[str, str] | None): the header's ``__metadata__``.
        algorithm (str): the digest of each tensor's bytes that ``write`` returns.

    Example:
        >>> with SafetensorsWriter(path, [("w", "F32", (2,))]) as writer:  # doctest: +SKIP
        ...     digest = writer.write("w", [struct.pack("<2f", 1.0, 2.0)])
    """

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, algorithm: str = DEFAULT_ALGORITHM) -> None:
        self.path = path
        self.algorithm = algorithm
        prefix, self._offsets = build_header(entries, metadata)
        self._order = [name for name, _, _ in entries]
        self._next = 0
        self._fh = DirectFile(path)
        self._fh.write(prefix)

    def write(self, name: str, chunks: Iterable[bytes | memoryview], progress: Progress | None = None) -> str:
        """Write tensor ``name`` from ``chunks`` (any buffers); returns the digest of its bytes."""
        if self._next >= len(self._order) or self._order[self._next] != name:
            raise RuntimeError(f"tensor {name!r} written out of header order")
        start, end = self._offsets[name]
        digest, written = new_hash(self.algorithm), 0
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            self._fh.write(view)
            digest.update(view)
            written += view.nbytes
            if progress:
                progress(view.nbytes)
        if written != end - start:
            raise RuntimeError(f"tensor {name!r}: wrote {written} bytes, header says {end - start}")
        self._next += 1
        return digest.hexdigest()

    def close(self) -> None:
        if self._next != len(self._order):
            self._fh.abort()
            raise RuntimeError(f"{self.path}: {len(self._order) - self._next} tensor(s) never written")
        self._fh.close()

    def abort(self) -> None:
        self._fh.abort()

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        """Close the file after the block, or abort it when the block raised (the exception goes on)."""
        if exc_type is None:
            self.close()
        else:
            self.abort()


#: Largest shard file a writer makes (5 GiB).
MAX_SHARD_BYTES = 5 * 1024**3


class Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


S = TypeVar("S", bound=Sized)


def group_into_shards(tensors: list[S], max_bytes: int = MAX_SHARD_BYTES) -> list[list[S]]:
    """Consecutive groups of ``tensors`` of at most ``max_bytes`` each (a larger tensor alone)."""
    shards: list[list[S]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards
