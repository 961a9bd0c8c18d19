#!/usr/bin/env python3
"""How fast are the new weights made? Elements per second of each init and dtype, 1 and N threads.

    python benchmarks/init_speed.py [--elems 200M] [--threads 1,2] [--rounds 3]

Each case creates ``--elems`` elements of one tensor-shaped init (make_chunk, chunk by chunk, as
``fuse`` does, into reused buffers) on a pool of T threads, and prints elements/s (median of the
rounds, rounds alternating between cases). Beside it, in the same run, two references for what
the machine can do: numpy's float32 uniform sampler (``Generator.random``) and a bare table
lookup (``np.take`` of a 64 K-entry int16 table) on the same thread count. The machine may be
shared: compare the figures of one run with each other, not across runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusionsurgery.surgery import init  # noqa: E402
from fusionsurgery.surgery.plan import NewTensor  # noqa: E402

SHAPE = (8192, 3072)  # a Llama 3.2-3B MLP projection: 25 M elements, 12 chunks


def _count(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}
    return int(float(text[:-1]) * scale[text[-1].upper()]) if text[-1].upper() in scale else int(text)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process: all threads) of ``fn()``."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def run_init(spec: NewTensor, total: int, threads: int) -> None:
    """Make ``total`` elements of ``spec`` (whole tensors, then a part of one), as fuse does."""
    per_tensor = init.num_chunks(spec)
    chunks = max(1, round(total / (spec.numel / per_tensor)))
    specs = [NewTensor(f"t{i}", f"t{i}", spec.shape, spec.dtype, spec.init, spec.std)
             for i in range(-(-chunks // per_tensor))]
    with ThreadPoolExecutor(threads) as pool:
        stream = init.chunk_stream(specs, 0, None, pool if threads > 1 else None)
        for _, _chunk in zip(range(chunks), stream, strict=False):
            pass
        stream.close()


def run_reference(kind: str, total: int, threads: int) -> None:
    """``total`` elements of numpy's float32 uniform, or of a bare table lookup, on ``threads``."""
    block = 1 << 16
    table = np.arange(1 << 16, dtype=np.int16)

    def part(seed: int, n: int) -> None:
        gen = np.random.Generator(np.random.SFC64(seed))
        if kind == "uniform":
            out = np.empty(block, dtype=np.float32)
            for _ in range(0, n, block):
                gen.random(block, dtype=np.float32, out=out)
        else:
            idx = np.random.default_rng(seed).integers(0, 1 << 16, block).astype(np.intp)
            out = np.empty(block, dtype=np.int16)
            for _ in range(0, n, block):
                np.take(table, idx, out=out)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(part, range(threads), [total // threads] * threads))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--elems", default="100M", help="elements per case (default %(default)s)")
    ap.add_argument("--threads", default="1,2", help="thread counts (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", default="normal:BF16,normal:F16,normal:F32,xavier:BF16,xavier:F16,xavier:F32",
                    help="init:dtype pairs (default %(default)s)")
    args = ap.parse_args(argv)
    total = _count(args.elems)
    threads = [int(t) for t in args.threads.split(",")]
    cases = [tuple(c.split(":")) for c in args.cases.split(",")]
    for kind, dtype in cases:  # build the tables outside the timing
        init.make_chunk(NewTensor("w", "w", SHAPE, dtype, kind, 0.02), 0, 0)
    rows: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for t in threads:
            for ref in ("uniform", "take"):
                name = f"reference: numpy {'float32 uniform' if ref == 'uniform' else 'np.take'} [{t} thr]"
                rows.setdefault(name, []).append(timed(lambda: run_reference(ref, total, t)))
            for kind, dtype in cases:
                spec = NewTensor("w", "w", SHAPE, dtype, kind, 0.02)
                rows.setdefault(f"{kind} {dtype} [{t} thr]", []).append(timed(lambda: run_init(spec, total, t)))
    print(f"{total / 1e6:.0f} M elements per case, median of {args.rounds} rounds; M elements/s of wall time "
          "(min-max), and per CPU-second (all threads: what one core does when it is not shared):")
    for name, runs in sorted(rows.items(), key=lambda kv: (kv[0].startswith("reference"), kv[0])):
        rates = [total / w for w, _ in runs]
        per_cpu = statistics.median(total / c for _, c in runs)
        print(f"  {name:42s} {statistics.median(rates) / 1e6:8.0f}   ({min(rates) / 1e6:.0f}-{max(rates) / 1e6:.0f})"
              f"   {per_cpu / 1e6:8.0f} per CPU-s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
