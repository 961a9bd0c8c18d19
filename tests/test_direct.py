"""Writing around the page cache: exact bytes whatever the sizes, and the same output as buffered writes."""

from __future__ import annotations

import os
import threading

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
    f = DirectFile(tmp_path / "dst.bin", buffer_bytes=2 * ALIGN, digest=seen.extend)
    with open(src, "rb") as fin:
        assert f.fill_from(fin.fileno(), 0, 3 * ALIGN) == 3 * ALIGN
        assert f.fill_from(fin.fileno(), 3 * ALIGN, 10 * ALIGN) == 2 * ALIGN + 123  # src ends
    f.close()
    assert (tmp_path / "dst.bin").read_bytes() == data == bytes(seen)


@pytest.mark.parametrize("depth", [2, 3, 5])
def test_pipeline_keeps_order_through_many_buffers(tmp_path, depth):
    """Many small buffers in flight: the file and the digest see the bytes in order, once."""
    chunks = [os.urandom(n) for n in (1, ALIGN, 3 * ALIGN + 1, 17, 9 * ALIGN, 5)] * 7
    seen = bytearray()
    f = DirectFile(tmp_path / "f.bin", buffer_bytes=ALIGN, depth=depth, digest=seen.extend)
    for c in chunks:
        f.write(c)
    f.close()
    assert (tmp_path / "f.bin").read_bytes() == b"".join(chunks) == bytes(seen)


def test_a_failing_stage_is_raised_in_the_filling_thread_and_nothing_hangs(tmp_path):
    calls = []

    def digest(view):
        calls.append(len(view))
        if len(calls) == 2:
            raise ValueError("digest broke")

    f = DirectFile(tmp_path / "f.bin", buffer_bytes=ALIGN, digest=digest)
    with pytest.raises(ValueError, match="digest broke"):
        for _ in range(20):
            f.write(os.urandom(ALIGN))
        f.close()
    f.abort()  # the caller's clean-up: returns, threads gone
    assert not any(t.name.startswith(("digest f.bin", "write f.bin")) for t in threading.enumerate())


def test_abort_while_buffers_are_in_flight(tmp_path):
    f = DirectFile(tmp_path / "f.bin", buffer_bytes=ALIGN, depth=4)
    for _ in range(10):
        f.write(os.urandom(ALIGN))
    f.abort()
    assert not any(t.name == "write f.bin" for t in threading.enumerate())


def test_read_ahead_yields_the_file_in_order(tmp_path):
    from fusionsurgery.io.digest import read_ahead

    data = os.urandom(10 * 1000 + 7)
    (tmp_path / "x").write_bytes(data)
    assert b"".join(bytes(v) for v in read_ahead(tmp_path / "x", chunk=1000, depth=2)) == data
    assert b"".join(bytes(v) for v in read_ahead(tmp_path / "x", chunk=1 << 20)) == data
    it = read_ahead(tmp_path / "x", chunk=1000)
    next(it)
    it.close()  # stopping early ends the reader
    assert not any(t.name == "read x" for t in threading.enumerate())


def test_a_filesystem_refusing_o_direct_is_written_through_the_cache(tmp_path, monkeypatch):
    """Refused at open (EINVAL, as older tmpfs does), or only at the first write: same bytes."""
    real_open, real_write = os.open, os.write

    def open_without_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)

    data = os.urandom(3 * ALIGN + 77)
    monkeypatch.setattr(os, "open", open_without_direct)
    f = DirectFile(tmp_path / "a.bin", buffer_bytes=2 * ALIGN)
    assert not f.direct
    f.write(data)
    f.close()
    assert (tmp_path / "a.bin").read_bytes() == data
    monkeypatch.setattr(os, "open", real_open)

    def write_refusing_direct(fd, view):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_write(fd, view)

    monkeypatch.setattr(os, "write", write_refusing_direct)
    f = DirectFile(tmp_path / "b.bin", buffer_bytes=2 * ALIGN)
    f.write(data)
    f.close()
    assert not f.direct and (tmp_path / "b.bin").read_bytes() == data


def test_direct_and_buffered_fuse_give_identical_files(tmp_path, monkeypatch):
    base = make_base(tmp_path / "base", "llama")[0]
    fs.fuse(base, tmp_path / "direct", every=2, seed=4)
    monkeypatch.setattr(direct, "USE_DIRECT", False)
    monkeypatch.setattr("fusionsurgery.io.copying.USE_DIRECT", False)
    fs.fuse(base, tmp_path / "buffered", every=2, seed=4)
    names = sorted(p.name for p in (tmp_path / "direct").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "buffered").iterdir())
    for name in names:
        if name != "fusion_manifest.json":  # holds its creation time
            assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "buffered" / name).read_bytes(), name
