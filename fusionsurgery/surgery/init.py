"""Creating the new weights one row-chunk at a time, reproducibly.

Every chunk has its own generator seeded from (seed, canonical name, chunk index), so the values
depend only on the seed and the tensor, never on memory limits, threads or the naming family.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import torch

from ..io.checkpoint import Checkpoint
from ..io.safetensors_format import DTYPE_SIZES
from ..io.torch_dtypes import TORCH_DTYPES, tensor_bytes
from .plan import NewTensor

#: Elements per generated chunk (16 MiB of fp32): bounds memory whatever the tensor size.
CHUNK_ELEMS = 1 << 22


def _seed(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _rows_per_chunk(shape: tuple[int, ...]) -> tuple[int, int]:
    rows = shape[0] if shape else 1
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    return rows, max(1, CHUNK_ELEMS // max(cols, 1))


def tensor_chunks(spec: NewTensor, seed: int, base: Checkpoint | None = None) -> Iterator[bytes]:
    """The bytes of ``spec``'s initial value, in row chunks."""
    rows, step = _rows_per_chunk(spec.shape)
    cols = math.prod(spec.shape[1:]) if len(spec.shape) > 1 else 1
    dtype = TORCH_DTYPES[spec.dtype]
    if spec.init == "copy":
        yield from _copy_chunks(spec, base, rows, cols, step)
        return
    for index, r0 in enumerate(range(0, rows, step)):
        n = min(step, rows - r0)
        if spec.init == "zeros":
            block = torch.zeros(n, cols)
        elif spec.init == "ones":
            block = torch.ones(n, cols)
        else:
            gen = torch.Generator().manual_seed(_seed(seed, spec.canonical, index))
            if spec.init == "normal":
                block = torch.randn(n, cols, generator=gen) * spec.std
            elif spec.init == "xavier":
                fan_out, fan_in = spec.shape[0], cols
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                block = (torch.rand(n, cols, generator=gen) * 2 - 1) * bound
            else:
                raise ValueError(f"unknown init {spec.init!r}")
        yield tensor_bytes(block.to(dtype))


def _copy_chunks(spec: NewTensor, base: Checkpoint | None, rows: int, cols: int, step: int) -> Iterator[bytes]:
    """Rows of the source tensor, cast to ``spec.dtype`` when it differs."""
    assert base is not None and spec.source is not None
    info = base.info(spec.source)
    if info.shape != spec.shape:
        raise ValueError(f"{spec.key}: cannot copy {spec.source} of shape {list(info.shape)}")
    row_bytes = cols * DTYPE_SIZES[info.dtype]
    with open(base.path_of(base.key_to_file[spec.source]), "rb") as fh:
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            fh.seek(info.start + r0 * row_bytes)
            raw = fh.read(n * row_bytes)
            if info.dtype == spec.dtype:
                yield raw
            else:
                src = torch.frombuffer(bytearray(raw), dtype=TORCH_DTYPES[info.dtype])
                yield tensor_bytes(src.to(TORCH_DTYPES[spec.dtype]))
