"""Running one command and measuring it (a Step's Samples): wall time, peak RSS and CPU seconds; the page cache; output sizes."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


DROP_CACHES = Path("/proc/sys/vm/drop_caches")
READ_CHUNK = 64 * 1024 * 1024


@dataclass
class Sample:
    wall: float
    maxrss_kib: int
    rc: int
    cpu: float = 0.0  # user + system seconds of the command (its threads and waited-for children)


GNU_TIME = shutil.which("time") if Path("/usr/bin/time").exists() or shutil.which("time") else None


def run_measured(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Sample:
    """Run ``argv`` (no shell), wall-clock it and read its peak RSS.

    The peak comes from GNU time (`time -f %M`) when installed: a small C process forks the command,
    so the figure is the command's own. Without it, wait4's ru_maxrss of a direct child is used, which
    on Linux is at least this Python's own peak (the child is vforked from it), so small peaks are
    overstated.
    """
    rss_file = log.with_suffix(".rss")
    cmd = [GNU_TIME, "-f", "%M %U %S", "-o", str(rss_file), *argv] if GNU_TIME else argv
    with open(log, "ab") as fh:
        fh.write(f"\n$ {' '.join(argv)}\n".encode())
        fh.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    maxrss, cpu = int(usage.ru_maxrss), usage.ru_utime + usage.ru_stime
    if GNU_TIME:
        try:
            rss, user, system = rss_file.read_text().strip().splitlines()[-1].split()
            maxrss, cpu = int(rss), float(user) + float(system)
        except (OSError, ValueError, IndexError):
            pass
        rss_file.unlink(missing_ok=True)
    return Sample(wall, maxrss, proc.returncode, cpu)


def sync_all() -> None:
    os.sync()


def drop_caches() -> None:
    os.sync()
    DROP_CACHES.write_text("3\n")


def can_drop_caches() -> bool:
    try:
        with open(DROP_CACHES, "w") as fh:
            fh.write("1\n")
        return True
    except OSError:
        return False


def warm(paths: list[Path]) -> None:
    """Read every file under ``paths`` so it sits in the page cache."""
    buf = bytearray(READ_CHUNK)
    for p in paths:
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file():
                with open(f, "rb", buffering=0) as fh:
                    while fh.readinto(buf):
                        pass


def files_under(p: Path) -> list[Path]:
    if not p.exists():
        return []
    return [f for f in sorted(p.rglob("*")) if f.is_file() and not f.is_symlink()]


def inodes(p: Path) -> set[tuple[int, int]]:
    return {(st.st_dev, st.st_ino) for st in (f.stat() for f in files_under(p))}


def output_size(out: Path, base_inodes: set[tuple[int, int]]) -> tuple[int, int]:
    """(apparent bytes, disk bytes of blocks not shared with the base; each inode once)."""
    apparent, disk, seen = 0, 0, set(base_inodes)
    for f in files_under(out):
        st = f.stat()
        apparent += st.st_size
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            disk += st.st_blocks * 512
    return apparent, disk


def remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()
    for stale in p.parent.glob(f".{p.name}.tmp-*"):  # an interrupted fuse's staging directory
        shutil.rmtree(stale, ignore_errors=True)


@dataclass
class Step:
    key: str
    label: str  # the command as a user would type it
    what: str  # one line: what it does
    argv: list[str] | None = None  # None: derived or skipped
    out: Path | None = None
    env: dict[str, str] | None = None
    expect_bytes: int = 0  # free disk needed for its output
    skip: str | None = None  # why it is not run
    samples: list[Sample] = field(default_factory=list)
    apparent: int | None = None
    new_disk: int | None = None
