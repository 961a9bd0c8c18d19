"""Creating the new weights one row-chunk at a time, reproducibly and in parallel.

Every chunk has its own generator (numpy's SFC64) seeded from (seed, canonical name, chunk index),
so the values depend only on the seed and the tensor: never on memory limits, thread count or the
naming family. Chunks are produced by a small thread pool (numpy releases the GIL while it fills
arrays) and handed to the writer in order, a few at a time, into a ring of reused buffers, so
memory stays flat and no page is faulted in twice.

How the values are made, all from the generator's raw 64-bit words, with integer operations and
table lookups that give the same bytes on every CPU:

- bf16 / fp16, normal or Xavier-uniform: drawn already rounded (``rounded_normal``: the exact
  distribution of the rounded value, to 2^-50 (bf16) or 2^-52 (fp16) in probability);
- fp32 normal: an inverse-CDF table with linear interpolation (``float32_normal``);
- fp32 Xavier-uniform: 23 random bits as the mantissa of a float in [1, 2), then
  ``(f - 1.5) * 2 * bound``: uniform on a grid of 2^23 points over [-bound, bound);
- copy: the source rows' bytes (converted when the dtype differs).

Why not torch.randn: torch picks its normal sampler by CPU (AVX2/AVX-512 or scalar) and the two
differ in the last bits of a third of the values, so the same seed would give other bytes on
another machine.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor

import numpy as np

from ..io.checkpoint import Checkpoint
from ..io.float_bits import FLOAT_DTYPES, from_float32, to_float32
from ..io.safetensors_format import DTYPE_SIZES
from . import float32_normal
from .plan import NewTensor
from .rounded_normal import rounded_normal, rounded_uniform

#: Elements per generated chunk (8 MiB of fp32): bounds memory whatever the tensor size.
CHUNK_ELEMS = 1 << 21
#: Chunks generated ahead of the writer when a pool is given.
PREFETCH = 4
_ONE = np.uint32(0x3F800000)  # float32 1.0


def _seed(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:16], "little")


def _layout(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(rows, columns, rows per chunk) of a tensor seen as a matrix."""
    rows = shape[0] if shape else 1
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    return rows, cols, max(1, CHUNK_ELEMS // max(cols, 1))


def num_chunks(spec: NewTensor) -> int:
    rows, _, step = _layout(spec.shape)
    return max(1, -(-rows // step)) if rows else 0


def xavier_bound(spec: NewTensor) -> float:
    rows, cols, _ = _layout(spec.shape)
    return math.sqrt(6.0 / (cols + rows))


def make_chunk(spec: NewTensor, seed: int, index: int, base: Checkpoint | None = None,
               buffer: np.ndarray | None = None) -> np.ndarray | bytes:
    """Chunk ``index`` of ``spec``'s initial value, as raw bytes of ``spec.dtype``.

    Random chunks are written into ``buffer`` (bytes, large enough) when given."""
    rows, cols, step = _layout(spec.shape)
    r0 = index * step
    n = min(step, rows - r0) * cols
    if spec.init == "copy":
        return _copy_rows(spec, base, r0, n // cols, cols, buffer)
    if spec.init in ("zeros", "ones"):
        return from_float32(np.full(n, 0.0 if spec.init == "zeros" else 1.0, dtype=np.float32), spec.dtype)
    if spec.init not in ("normal", "xavier"):
        raise ValueError(f"unknown init {spec.init!r}")
    size = DTYPE_SIZES[spec.dtype]
    if buffer is None or buffer.size < n * size:  # (a row longer than a chunk)
        buffer = np.empty(n * size, dtype=np.uint8)
    out = buffer[:n * size]
    gen = np.random.Generator(np.random.SFC64(_seed(seed, spec.canonical, index)))
    if spec.dtype in ("BF16", "F16"):
        table = rounded_normal(spec.std, spec.dtype) if spec.init == "normal" else \
            rounded_uniform(xavier_bound(spec), spec.dtype)
        table.sample_into(out.view(np.int16), gen)
    elif spec.dtype == "F32" and spec.init == "normal":
        float32_normal.sample_into(out.view(np.float32), spec.std, gen)
    elif spec.dtype == "F32":
        _uniform_f32(out.view(np.uint32), xavier_bound(spec), gen)
    else:
        raise ValueError(f"cannot create {spec.init} values of dtype {spec.dtype}")
    return out


def _uniform_f32(out: np.ndarray, bound: float, gen: np.random.Generator) -> None:
    """Uniform on [-bound, bound): 23 random bits as the mantissa of f in [1, 2), then (f - 1.5) * 2 * bound."""
    block = float32_normal.BLOCK
    for s in range(0, out.size, block):
        o = out[s:s + block]
        np.right_shift(gen.bit_generator.random_raw((o.size + 1) // 2).view(np.uint32)[:o.size], 9, out=o)
        np.bitwise_or(o, _ONE, out=o)
        f = o.view(np.float32)
        np.subtract(f, np.float32(1.5), out=f)
        np.multiply(f, np.float32(2 * bound), out=f)


def _copy_rows(spec: NewTensor, base: Checkpoint | None, r0: int, n: int, cols: int,
               buffer: np.ndarray | None = None) -> np.ndarray | bytes:
    """Rows ``r0:r0+n`` of the source tensor, cast to ``spec.dtype`` when it differs (read straight
    into ``buffer`` when the dtype is the same and it is large enough)."""
    assert base is not None and spec.source is not None
    info = base.info(spec.source)
    first = spec.source_row or 0  # a row range of a fused projection, or the whole tensor
    fits = info.shape == spec.shape if spec.source_row is None else (
        info.shape[1:] == spec.shape[1:] and first + spec.shape[0] <= info.shape[0])
    if not fits:
        raise ValueError(f"{spec.key}: cannot copy {spec.source} of shape {list(info.shape)}")
    row_bytes = cols * DTYPE_SIZES[info.dtype]
    with open(base.path_of(base.key_to_file[spec.source]), "rb", buffering=0) as fh:
        fh.seek(info.start + (first + r0) * row_bytes)
        if info.dtype == spec.dtype and buffer is not None and buffer.size >= n * row_bytes:
            got = fh.readinto(memoryview(buffer)[:n * row_bytes])
            return buffer[:got]  # (short only if the file shrank: the writer's size check says so)
        raw = fh.read(n * row_bytes)
    if info.dtype == spec.dtype:
        return raw
    if info.dtype in FLOAT_DTYPES:
        src = to_float32(raw, info.dtype)
    else:  # another source type (F64, ...): torch converts it
        import torch

        from ..io.torch_dtypes import TORCH_DTYPES

        src = torch.frombuffer(bytearray(raw), dtype=TORCH_DTYPES[info.dtype]).float().numpy()
    return from_float32(src, spec.dtype)


def chunk_stream(specs: Iterable[NewTensor], seed: int, base: Checkpoint | None = None,
                 pool: Executor | None = None) -> Iterator[tuple[NewTensor, np.ndarray | bytes]]:
    """Every chunk of every tensor of ``specs``, in order, as (tensor, chunk).

    With ``pool``, ``PREFETCH`` chunks are generated ahead, across tensor boundaries, into a ring of
    ``PREFETCH + 1`` reused buffers: a chunk is valid until the next one is asked for."""
    jobs = ((spec, i) for spec in specs for i in range(num_chunks(spec)))
    if pool is None:
        for spec, i in jobs:
            yield spec, make_chunk(spec, seed, i, base)
        return
    ring = [np.empty(CHUNK_ELEMS * 4, dtype=np.uint8) for _ in range(PREFETCH + 1)]
    pending: deque = deque()
    submitted = 0
    try:
        while True:
            while len(pending) < PREFETCH:
                job = next(jobs, None)
                if job is None:
                    break
                buffer = ring[submitted % len(ring)]
                pending.append((job[0], pool.submit(make_chunk, job[0], seed, job[1], base, buffer)))
                submitted += 1
            if not pending:
                return
            spec, fut = pending.popleft()
            yield spec, fut.result()
    finally:
        for _, fut in pending:
            fut.cancel()
        for _, fut in pending:
            if not fut.cancelled():
                fut.exception()  # wait: the ring must outlive the workers writing into it
