"""Output directories built under a temporary name and renamed into place: nothing half-written is ever
left where a finished output would be."""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from pathlib import Path
from types import TracebackType

from ..errors import UsageError, WriteError


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
