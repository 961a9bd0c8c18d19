"""Creating the new weights one row-chunk at a time, reproducibly and in parallel.

Every chunk has its own generator (numpy's SFC64) seeded from (seed, canonical name, chunk index),
so the values depend only on the seed and the tensor: never on memory limits, thread count or the
naming family. Chunks are produced by a small thread pool (numpy releases the GIL while it fills
arrays) and handed to the writer in order, a few at a time, so memory stays flat.

A bf16 or fp16 normal init is drawn already rounded (``rounded_normal``: a table lookup from
32-bit random integers, about twice as fast as a float32 normal plus a conversion); fp32
and the other inits use numpy's float32 samplers.

Why numpy and not torch.randn, which is twice as fast on one core: torch picks its normal sampler
by CPU (AVX2/AVX-512 or scalar) and the two differ in the last bits of a third of the values, so
the same seed would give other bytes on another machine. numpy's ziggurat gives the same values
everywhere.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor

import numpy as np

from ..io.checkpoint import Checkpoint
from ..io.float_bits import FLOAT_DTYPES, from_float32, to_float32
from ..io.safetensors_format import DTYPE_SIZES
from .plan import NewTensor
from .rounded_normal import rounded_normal

#: Elements per generated chunk (16 MiB of fp32): bounds memory whatever the tensor size.
CHUNK_ELEMS = 1 << 22
#: Chunks generated ahead of the writer when a pool is given (16 MiB of fp32 each at most).
PREFETCH = 4


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


def make_chunk(spec: NewTensor, seed: int, index: int, base: Checkpoint | None = None) -> np.ndarray | bytes:
    """Chunk ``index`` of ``spec``'s initial value, as raw bytes of ``spec.dtype``."""
    rows, cols, step = _layout(spec.shape)
    r0 = index * step
    n = min(step, rows - r0)
    if spec.init == "copy":
        return _copy_rows(spec, base, r0, n, cols)
    if spec.init in ("zeros", "ones"):
        values = np.full(n * cols, 0.0 if spec.init == "zeros" else 1.0, dtype=np.float32)
    else:
        gen = np.random.Generator(np.random.SFC64(_seed(seed, spec.canonical, index)))
        if spec.init == "normal" and spec.dtype in ("BF16", "F16"):
            # the rounded value straight from 32-bit integers: same distribution, half the work
            raw = gen.bit_generator.random_raw((n * cols + 1) // 2).view(np.uint32)[:n * cols]
            return rounded_normal(spec.std, spec.dtype).sample(raw)
        if spec.init == "normal":
            values = gen.standard_normal(n * cols, dtype=np.float32)
            values *= np.float32(spec.std)
        elif spec.init == "xavier":
            bound = math.sqrt(6.0 / (cols + spec.shape[0]))
            values = gen.random(n * cols, dtype=np.float32)
            values *= np.float32(2 * bound)
            values -= np.float32(bound)
        else:
            raise ValueError(f"unknown init {spec.init!r}")
    return from_float32(values, spec.dtype)


def _copy_rows(spec: NewTensor, base: Checkpoint | None, r0: int, n: int, cols: int) -> np.ndarray | bytes:
    """Rows ``r0:r0+n`` of the source tensor, cast to ``spec.dtype`` when it differs."""
    assert base is not None and spec.source is not None
    info = base.info(spec.source)
    first = spec.source_row or 0  # a row range of a fused projection, or the whole tensor
    fits = info.shape == spec.shape if spec.source_row is None else (
        info.shape[1:] == spec.shape[1:] and first + spec.shape[0] <= info.shape[0])
    if not fits:
        raise ValueError(f"{spec.key}: cannot copy {spec.source} of shape {list(info.shape)}")
    row_bytes = cols * DTYPE_SIZES[info.dtype]
    with open(base.path_of(base.key_to_file[spec.source]), "rb") as fh:
        fh.seek(info.start + (first + r0) * row_bytes)
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


def tensor_chunks(spec: NewTensor, seed: int, base: Checkpoint | None = None,
                  pool: Executor | None = None) -> Iterator[np.ndarray | bytes]:
    """All chunks of ``spec`` in order; generated ``PREFETCH`` ahead on ``pool`` when given."""
    total = num_chunks(spec)
    if pool is None:
        for i in range(total):
            yield make_chunk(spec, seed, i, base)
        return
    pending: deque = deque()
    next_index = 0
    try:
        while next_index < total or pending:
            while next_index < total and len(pending) < PREFETCH:
                pending.append(pool.submit(make_chunk, spec, seed, next_index, base))
                next_index += 1
            yield pending.popleft().result()
    finally:
        for fut in pending:
            fut.cancel()
