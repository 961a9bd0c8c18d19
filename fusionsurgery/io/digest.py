"""Content digests of tensors and files, computed in one streaming pass.

Each tensor's digest is the sha256 of its raw bytes. A file's digest is the sha256 of its header
bytes followed by its tensor digests in file order: it changes whenever any byte of the file does,
without hashing the data twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from ..errors import CheckpointError
from .safetensors_format import SafetensorsHeader

ALGORITHM = "sha256"
READ_CHUNK = 16 * 1024 * 1024
Progress = Callable[[int], None]


def new_hash() -> "hashlib._Hash":
    return hashlib.new(ALGORITHM)


class FileDigester:
    """Consumes a safetensors file's bytes in order and digests every tensor on the way."""

    def __init__(self, header: SafetensorsHeader) -> None:
        self.header = header
        self._spans = sorted(header.tensors.values(), key=lambda t: t.start)
        self._head = bytearray()
        self._pos = 0
        self._i = 0
        self._hash = new_hash()
        self.digests: dict[str, str] = {}

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            if self._pos < self.header.data_start:
                take = min(len(view), self.header.data_start - self._pos)
                self._head += view[:take]
            else:
                while self._i < len(self._spans) and self._spans[self._i].end <= self._pos:
                    self._close(self._spans[self._i])
                if self._i >= len(self._spans):
                    raise CheckpointError(f"{self.header.path}: more bytes than its header describes")
                info = self._spans[self._i]
                take = min(len(view), info.end - self._pos)
                self._hash.update(view[:take])
            view = view[take:]
            self._pos += take

    def _close(self, info) -> None:
        self.digests[info.name] = self._hash.hexdigest()
        self._hash = new_hash()
        self._i += 1

    def finish(self) -> tuple[dict[str, str], str]:
        """Per-tensor digests and the file digest; every byte must have been seen."""
        while self._i < len(self._spans) and self._spans[self._i].end <= self._pos:
            self._close(self._spans[self._i])
        if self._pos != self.header.file_size or self._i != len(self._spans):
            raise CheckpointError(f"{self.header.path}: file shorter than its header says")
        file_hash = new_hash()
        file_hash.update(bytes(self._head))
        for info in self._spans:
            file_hash.update(bytes.fromhex(self.digests[info.name]))
        return self.digests, file_hash.hexdigest()


def tensor_digests(path: Path, header: SafetensorsHeader, progress: Progress | None = None) -> tuple[dict[str, str], str]:
    """Digest every tensor of ``path`` (and the file) in one sequential read."""
    digester = FileDigester(header)
    buf = bytearray(READ_CHUNK)
    with open(path, "rb") as fh:
        while n := fh.readinto(buf):
            digester.update(memoryview(buf)[:n])
            if progress:
                progress(n)
    return digester.finish()
