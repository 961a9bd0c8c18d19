"""Writing around the page cache: exact bytes whatever the sizes, and the same output as buffered writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import fusionsurgery as fs
from fusionsurgery.io import direct
from fusionsurgery.io.direct import ALIGN, DirectFile
from helpers import make_base


@pytest.mark.parametrize("sizes", [[], [1], [ALIGN], [ALIGN - 1, 2], [3 * ALIGN + 5, 7, 2 * ALIGN], [40_000] * 9])
def test_direct_file_writes_exact_bytes(tmp_path, sizes):
    chunks = [os.urandom(n) for n in sizes]
    path = tmp_path / "f.bin"
    f = DirectFile(path, buffer_bytes=4 * ALIGN)  # small buffer: many flushes, chunks crossing them
    for c in chunks:
        f.write(c)
    f.close()
    assert path.read_bytes() == b"".join(chunks)


def test_fill_from_copies_and_digests_every_byte_once(tmp_path):
    src = tmp_path / "src.bin"
    data = os.urandom(5 * ALIGN + 123)
    src.write_bytes(data)
    seen = bytearray()
    f = DirectFile(tmp_path / "dst.bin", buffer_bytes=2 * ALIGN)
    with open(src, "rb") as fin:
        assert f.fill_from(fin.fileno(), 0, 3 * ALIGN, seen.extend) == 3 * ALIGN
        assert f.fill_from(fin.fileno(), 3 * ALIGN, 10 * ALIGN, seen.extend) == 2 * ALIGN + 123  # src ends
    f.close()
    assert (tmp_path / "dst.bin").read_bytes() == data == bytes(seen)


def test_a_filesystem_without_o_direct_is_written_through_the_cache():
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm (tmpfs) here")
    path = shm / f"fusionsurgery-test-{os.getpid()}.bin"
    try:
        f = DirectFile(path)
        assert not f.direct  # tmpfs refuses O_DIRECT at open
        f.write(b"abc" * 5000)
        f.close()
        assert path.read_bytes() == b"abc" * 5000
    finally:
        path.unlink(missing_ok=True)


def test_direct_and_buffered_fuse_give_identical_files(tmp_path, monkeypatch):
    base = make_base(tmp_path / "base", "llama")[0]
    fs.fuse(base, tmp_path / "direct", every=2, seed=4)
    monkeypatch.setattr(direct, "USE_DIRECT", False)
    monkeypatch.setattr("fusionsurgery.io.copy.USE_DIRECT", False)
    fs.fuse(base, tmp_path / "buffered", every=2, seed=4)
    names = sorted(p.name for p in (tmp_path / "direct").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "buffered").iterdir())
    for name in names:
        if name != "fusion_manifest.json":  # holds its creation time
            assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "buffered" / name).read_bytes(), name
