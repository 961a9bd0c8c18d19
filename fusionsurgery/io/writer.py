"""Streaming writes: safetensors files one tensor at a time, whole-file copies, atomic directories."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

from ..errors import UsageError, WriteError
from .checkpoint import Checkpoint
from .digest import DEFAULT_ALGORITHM, new_hash
from .direct import DirectFile
from .safetensors_format import build_header
from .progress import Progress



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

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
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


def default_output(source: Path, suffix: str) -> Path:
    """``<source name>-<suffix>`` beside the source (a file's stem for a single file); beside the
    path as given, not where a symlink leads (a DVC or annex store names its files by hash)."""
    source = Path(os.path.abspath(source))
    name = source.stem if source.is_file() else source.name
    return source.parent / f"{name}-{suffix}"


def check_output_location(source: Path, out: Path) -> None:
    """Refuse an output that is the input, lies inside it, or contains it (``--force`` would delete it)."""
    s, o = source.resolve(), out.resolve()
    if o == s or (s.is_dir() and s in o.parents):
        raise UsageError(f"output {out} is the input or inside it; choose another -o")
    if o in s.parents:
        raise UsageError(f"output {out} contains the input {source}; choose another -o")


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` as indented JSON and make it durable."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_index(path: Path, weight_map: dict[str, str], total_size: int) -> None:
    """A Hugging Face ``model.safetensors.index.json``: every key to its file, and the tensor bytes."""
    write_json(path, {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})


def copy_sidecars(ckpt: Checkpoint, directory: Path) -> list[str]:
    """Tokenizer, generation-config and chat-template files, copied as real files (a symlink is followed
    where ``io.links`` allows it; ``Checkpoint.sidecar_files`` refuses the others)."""
    names = []
    for sidecar in ckpt.sidecar_files():
        shutil.copyfile(sidecar, directory / sidecar.name)
        names.append(sidecar.name)
    return names


class AtomicDirectory:
    """Builds a directory under a temporary name beside ``target`` and renames it into place.

    A failure or interruption removes the temporary directory, so nothing that looks like a
    finished output is ever left behind; with ``force`` an existing ``target`` is replaced only
    after the new one is complete. The run holds an exclusive ``flock`` on its temporary directory
    (and on an old output it moves aside) until it ends: the kernel drops it when the process dies,
    however it dies, so a later run knows debris from a live run's work (even after a reboot, when
    process ids are reused).
    """

    def __init__(self, target: Path, force: bool = False) -> None:
        self.target = target
        self.force = force
        self.tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._locks: list[int] = []

    def __enter__(self) -> "AtomicDirectory":
        self._remove_stale()
        if self.target.exists() and not self.force:
            raise UsageError(f"{self.target} already exists; pass `force` to replace it")
        if not self.target.parent.is_dir():
            raise UsageError(f"{self.target.parent}: output's parent directory does not exist")
        while True:
            try:
                self.tmp.mkdir()
            except OSError as exc:
                raise WriteError(f"cannot create {self.tmp}: {exc.strerror}") from None
            # Blocking: another run's _remove_stale may be probing the lock of this still unlocked
            # directory; if it took it for debris and removed it, start again under a new name.
            fd = os.open(self.tmp, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink > 0 and self.tmp.is_dir():
                self._locks.append(fd)
                return self
            os.close(fd)
            self.tmp = self.target.parent / f".{self.target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def _hold(self, path: Path) -> None:
        fd = _try_lock(path)
        if fd is None:
            raise WriteError(f"{path} is locked by another run")
        self._locks.append(fd)

    def _remove_stale(self) -> None:
        """Clean up after earlier runs on ``target`` whose process is gone (killed, power loss).

        Their temporary directories are removed. A ``.old-`` directory means a run died between
        moving the previous output aside and moving its own into place: the previous output is put
        back (or removed when a newer one is already in place).
        """
        parent = self.target.parent
        if not parent.is_dir():
            return
        for stale in parent.glob(f".{self.target.name}.tmp-*-*"):
            fd = _try_lock(stale)
            if fd is not None:  # removed while locked, so its maker cannot take it meanwhile
                shutil.rmtree(stale, ignore_errors=True)
                os.close(fd)
        for old in parent.glob(f".{self.target.name}.old-*-*"):
            fd = _try_lock(old)
            if fd is None:
                continue
            if self.target.exists() or self.target.is_symlink():
                _remove(old)
            else:
                os.rename(old, self.target)
            os.close(fd)

    def commit(self) -> None:
        """Make the finished directory durable, then move it into place (replacing the old one only
        with ``force``): a crash at any moment leaves the previous output or the new one, whole."""
        _sync_tree(self.tmp)
        old = None
        if self.target.exists() or self.target.is_symlink():
            if not self.force:
                raise WriteError(f"{self.target} appeared while writing (another run?); this run's output was discarded")
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            if self.target.is_dir() and not self.target.is_symlink():
                self._hold(self.target)  # the lock follows the directory to its new name
            os.rename(self.target, old)
        try:
            os.rename(self.tmp, self.target)
        except OSError as exc:
            if old is not None:
                os.rename(old, self.target)
            raise WriteError(f"{self.target} appeared while writing (another run?): {exc.strerror}") from None
        _fsync_path(self.target.parent)
        if old is not None:
            _remove(old)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        for fd in self._locks:
            os.close(fd)
        self._locks.clear()


def _remove(path: Path) -> None:
    """Remove a directory tree, or a file or symlink (a replaced ``-o`` may have been either)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive ``flock`` on directory ``path``, or None when another
    process holds it (or it cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(directory: Path) -> None:
    """fsync every file in ``directory`` and the directory itself (cheap for files already synced)."""
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False):
            _fsync_path(Path(entry.path))
    _fsync_path(directory)
