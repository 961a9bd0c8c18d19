"""Streaming writes: safetensors files one tensor at a time, whole-file copies, atomic directories."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType

from ..errors import UsageError, WriteError
from .safetensors_format import SafetensorsHeader, build_header

Progress = Callable[[int], None]
COPY_CHUNK = 64 * 1024 * 1024
READ_CHUNK = 16 * 1024 * 1024


class SafetensorsWriter:
    """Writes a safetensors file whose tensors are given in header order, chunk by chunk."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = path
        prefix, self._offsets = build_header(entries, metadata)
        self._order = [name for name, _, _ in entries]
        self._next = 0
        self._fh = open(path, "wb")
        self._fh.write(prefix)

    def write(self, name: str, chunks: Iterable[bytes], progress: Progress | None = None) -> str:
        """Write tensor ``name`` from ``chunks``; returns the sha256 of its bytes."""
        if self._next >= len(self._order) or self._order[self._next] != name:
            raise RuntimeError(f"tensor {name!r} written out of header order")
        start, end = self._offsets[name]
        digest, written = hashlib.sha256(), 0
        for chunk in chunks:
            self._fh.write(chunk)
            digest.update(chunk)
            written += len(chunk)
            if progress:
                progress(len(chunk))
        if written != end - start:
            raise RuntimeError(f"tensor {name!r}: wrote {written} bytes, header says {end - start}")
        self._next += 1
        return digest.hexdigest()

    def close(self) -> None:
        if self._next != len(self._order):
            self._fh.close()
            raise RuntimeError(f"{self.path}: {len(self._order) - self._next} tensor(s) never written")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()

    def abort(self) -> None:
        self._fh.close()


def copy_file(src: Path, dst: Path, progress: Progress | None = None) -> None:
    """Copy ``src`` to ``dst`` with the kernel's help (copy_file_range, else sendfile, else read/write)."""
    size = src.stat().st_size
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        done = 0
        fast = hasattr(os, "copy_file_range")
        while done < size:
            n = 0
            if fast:
                try:
                    n = os.copy_file_range(fin.fileno(), fout.fileno(), min(COPY_CHUNK, size - done))
                except OSError as exc:
                    if exc.errno in (18, 22, 38, 95):  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP: fall back
                        fast = False
                        fin.seek(done)
                        fout.seek(done)
                        continue
                    raise
            else:
                buf = fin.read(min(COPY_CHUNK, size - done))
                fout.write(buf)
                n = len(buf)
            if n == 0:
                raise WriteError(f"{src}: file shrank while being copied")
            done += n
            if progress:
                progress(n)
        fout.flush()
        os.fsync(fout.fileno())


def tensor_digests(path: Path, header: SafetensorsHeader, progress: Progress | None = None) -> tuple[dict[str, str], str]:
    """sha256 of every tensor's bytes in one sequential read, and a file digest built from them.

    The file digest is sha256 over the header bytes followed by each tensor digest in file order:
    it changes whenever any byte of the file does, without hashing the data twice.
    """
    digests: dict[str, str] = {}
    infos = list(header.tensors.values())
    with open(path, "rb") as fh:
        head = fh.read(header.data_start)
        file_hash = hashlib.sha256(head)
        for info in infos:
            h = hashlib.sha256()
            fh.seek(info.start)
            left = info.nbytes
            while left:
                buf = fh.read(min(READ_CHUNK, left))
                if not buf:
                    raise WriteError(f"{path}: file shorter than its header says")
                h.update(buf)
                left -= len(buf)
                if progress:
                    progress(len(buf))
            digests[info.name] = h.hexdigest()
            file_hash.update(bytes.fromhex(digests[info.name]))
    return digests, file_hash.hexdigest()


class AtomicDirectory:
    """Builds a directory under a temporary name beside ``target`` and renames it into place.

    A failure or interruption removes the temporary directory, so nothing that looks like a
    finished output is ever left behind; with ``force`` an existing ``target`` is replaced only
    after the new one is complete.
    """

    def __init__(self, target: Path, force: bool = False) -> None:
        self.target = target
        self.force = force
        self.tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> "AtomicDirectory":
        self._remove_stale()
        if self.target.exists() and not self.force:
            raise UsageError(f"{self.target} already exists; pass --force to replace it")
        if not self.target.parent.is_dir():
            raise UsageError(f"{self.target.parent}: output's parent directory does not exist")
        try:
            self.tmp.mkdir()
        except OSError as exc:
            raise WriteError(f"cannot create {self.tmp}: {exc.strerror}") from None
        return self

    def _remove_stale(self) -> None:
        """Remove temporary directories of earlier runs on ``target`` whose process is gone (killed)."""
        if not self.target.parent.is_dir():
            return
        for stale in self.target.parent.glob(f".{self.target.name}.tmp-*-*"):
            try:
                pid = int(stale.name.rsplit("-", 2)[-2])
                os.kill(pid, 0)
            except ProcessLookupError:
                shutil.rmtree(stale, ignore_errors=True)
            except (ValueError, PermissionError, IndexError):
                continue

    def commit(self) -> None:
        """Move the finished directory into place (replacing the old one only with ``force``)."""
        old = None
        if self.target.exists() or self.target.is_symlink():
            if not self.force:
                raise WriteError(f"{self.target} appeared while writing (another run?); this run's output was discarded")
            old = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.target, old)
        try:
            os.rename(self.tmp, self.target)
        except OSError as exc:
            if old is not None:
                os.rename(old, self.target)
            raise WriteError(f"{self.target} appeared while writing (another run?): {exc.strerror}") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
