#!/usr/bin/env python3
"""Where does `fuse`'s time go? Time each of its stages alone, on one base, single-threaded.

    python benchmarks/profile_fuse.py benchmarks/work/base-3b [--every 4] [--init normal]

Stages: start-up imports (in fresh interpreters), opening the base (headers), creating the new
weights (make_chunk: random numbers + dtype conversion), digesting bytes (blake3, sha256), copying
a shard (fuse's copy_file: O_DIRECT where the filesystem takes it, else copy_file_range; with and
without the digest) against `cp`, and writing the new bytes through the page cache and around it.
Each figure is a throughput, so the sum of stage times over the 2 threads `fuse` runs says how
far the engine can be from `cp -r`. The base is read into the page cache first.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fresh_import_seconds(module: str, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--init", default="normal")
    ap.add_argument("--max-gen-chunks", type=int, default=64, help="chunks of new weights to time (0: all)")
    ap.add_argument("--tmp", type=Path, default=None, help="scratch directory (default: beside the base)")
    args = ap.parse_args(argv)

    rows: list[tuple[str, str]] = []

    def row(name: str, text: str) -> None:
        rows.append((name, text))
        print(f"{name:48s} {text}", flush=True)

    row("python -c pass", f"{fresh_import_seconds('sys'):.3f} s")
    row("import fusionsurgery.cli.app", f"{fresh_import_seconds('fusionsurgery.cli.app'):.3f} s")
    row("import fusionsurgery.surgery.fuse", f"{fresh_import_seconds('fusionsurgery.surgery.fuse'):.3f} s")
    row("import torch", f"{fresh_import_seconds('torch'):.3f} s")

    from fusionsurgery.arch.config import read_model_config
    from fusionsurgery.io.checkpoint import Checkpoint
    from fusionsurgery.io.copying import copy_file
    from fusionsurgery.io.digest import FileDigester
    from fusionsurgery.surgery import fuse as fuse_mod
    from fusionsurgery.surgery.init import make_chunk, num_chunks
    from fusionsurgery.surgery.plan import plan_new_tensors
    from fusionsurgery.surgery.selection import select_layers

    t = time.perf_counter()
    ckpt = Checkpoint.open(args.base)
    cfg = read_model_config(ckpt)
    row("open base (headers, config)", f"{time.perf_counter() - t:.3f} s")
    fusion = fuse_mod._fusion_config(cfg, ckpt, select_layers(cfg.num_layers, args.every, None), False, None, 0,
                                     args.init, 0.02, 0, "same")
    new = plan_new_tensors(cfg, fusion)
    new_elems = sum(n.numel for n in new)
    base_bytes = ckpt.total_bytes()
    row("sizes", f"base {base_bytes / 1e9:.2f} GB, new {new_elems / 1e6:.0f} M elements "
                 f"({new_elems * 2 / 1e9:.2f} GB bf16)")

    # creating the new weights: one thread, as fuse's single 'init' worker
    big = max(new, key=lambda n: n.numel)
    limit = num_chunks(big) if args.max_gen_chunks == 0 else min(num_chunks(big), args.max_gen_chunks)
    t, elems, chunks = time.perf_counter(), 0, []
    for i in range(limit):
        c = make_chunk(big, 0, i, ckpt)
        elems += memoryview(c).nbytes // 2
        if i < 4:
            chunks.append(bytes(memoryview(c)))
    gen = elems / (time.perf_counter() - t)
    row(f"make_chunk ({args.init}, {big.dtype}), 1 thread", f"{gen / 1e6:.0f} M elements/s "
        f"-> {new_elems / gen:.1f} s for all new weights")

    # its parts: numpy's generator alone and the bf16 conversion alone
    g = np.random.Generator(np.random.SFC64(0))
    n = 1 << 22
    t = time.perf_counter()
    for _ in range(16):
        v = g.standard_normal(n, dtype=np.float32)
    normal = 16 * n / (time.perf_counter() - t)
    row("  numpy SFC64 standard_normal float32", f"{normal / 1e6:.0f} M/s")
    t = time.perf_counter()
    for _ in range(16):
        g.random(n, dtype=np.float32)
    row("  numpy SFC64 random (uniform) float32", f"{16 * n / (time.perf_counter() - t) / 1e6:.0f} M/s")
    try:
        import torch

        tg = torch.Generator().manual_seed(0)
        t = time.perf_counter()
        for _ in range(16):
            torch.randn(n, generator=tg, dtype=torch.float32)
        row(f"  torch.randn float32 ({torch.get_num_threads()} threads)",
            f"{16 * n / (time.perf_counter() - t) / 1e6:.0f} M/s")
        t = time.perf_counter()
        for _ in range(16):
            torch.from_numpy(v).to(torch.bfloat16)
        row("  float32 -> bf16 (torch)", f"{16 * n / (time.perf_counter() - t) / 1e6:.0f} M/s")
    except ImportError:
        pass

    # digesting
    buf = b"".join(chunks) or bytes(64 << 20)
    reps = max(1, (1 << 30) // len(buf))
    import blake3

    for label, new_hash in (("blake3 (fuse's default)", blake3.blake3), ("sha256 (hashlib)", hashlib.sha256)):
        t = time.perf_counter()
        h = new_hash()
        for _ in range(reps):
            h.update(buf)
        rate = reps * len(buf) / (time.perf_counter() - t)
        row(label, f"{rate / 1e9:.2f} GB/s -> {base_bytes / rate:.1f} s for the base, "
                   f"{new_elems * 2 / rate:.1f} s for the new bytes")

    # copying the largest shard: cp, copy_file alone, copy_file + digest
    shard = max((ckpt.path_of(name) for name in ckpt.files), key=lambda p: p.stat().st_size)
    size = shard.stat().st_size
    header = ckpt.files[shard.name]
    with open(shard, "rb") as fh:  # warm
        while fh.read(64 << 20):
            pass
    scratch = Path(tempfile.mkdtemp(dir=args.tmp or args.base.parent, prefix=".profile-"))
    try:
        def timed(label: str, fn) -> None:
            subprocess.run(["sync"], check=True)
            t = time.perf_counter()
            fn()
            dt = time.perf_counter() - t
            row(label, f"{dt:.2f} s, {size / dt / 1e9:.2f} GB/s")
            (scratch / "x").unlink(missing_ok=True)
            subprocess.run(["sync"], check=True)

        timed(f"cp {shard.name} ({size / 1e9:.2f} GB)", lambda: subprocess.run(["cp", shard, scratch / "x"], check=True))
        timed("cp + sync", lambda: subprocess.run(["sh", "-c", f'cp "{shard}" "{scratch}/x" && sync "{scratch}/x"'],
                                                  check=True))
        timed("copy_file (O_DIRECT or copy_file_range, + fsync)", lambda: copy_file(shard, scratch / "x"))
        timed("copy_file + digest (fuse's copy)",
              lambda: copy_file(shard, scratch / "x", digester=FileDigester(header)))

        def write_new() -> None:
            block = buf[: 64 << 20] if len(buf) >= 64 << 20 else (buf * ((64 << 20) // len(buf) + 1))[: 64 << 20]
            left = size
            with open(scratch / "x", "wb") as fh:
                while left > 0:
                    fh.write(block[:left])
                    left -= len(block)
                fh.flush()
                import os
                os.fsync(fh.fileno())

        timed("write the same size from memory + fsync", write_new)

        def write_new_direct() -> None:
            from fusionsurgery.io.direct import DirectFile

            block = buf[: 64 << 20] if len(buf) >= 64 << 20 else (buf * ((64 << 20) // len(buf) + 1))[: 64 << 20]
            out, left = DirectFile(scratch / "x"), size
            while left > 0:
                out.write(block[:left])
                left -= len(block)
            out.close()

        timed("the same through DirectFile (O_DIRECT) + fsync", write_new_direct)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
