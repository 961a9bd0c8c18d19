"""Samples of a continuous distribution already rounded to a 16-bit float type, from random bits.

What a bf16 or fp16 weight initialised "normal" (or "xavier", uniform) holds is ``round(X)``: one
of at most 65536 values, each with a probability fixed by X's CDF between its rounding
boundaries. So instead of drawing a float32 and rounding it, draw uniform random bits and look up
the value whose cumulative-probability interval holds them:

- ``cell_bits`` random bits (18 for bf16; 20 for fp16, whose values are eight times denser; three
  cell numbers cut from each random 64-bit word) pick one of ``2**cell_bits`` equally likely
  cells; a cell inside one value's interval *is* that value: one table lookup (``np.take``), for
  98.8% (bf16) or 97.7% (fp16) of normal draws. (Finer cells make boundary cells rarer, but past
  512 KiB-2 MiB the table falls out of the CPU's cache and the lookup slows more than it saves.)
- a draw in a cell that straddles a boundary takes 32 more random bits (a second draw): the
  value is the one whose interval holds the number ``cell * 2**32 + bits``. Their top bits pick a
  sub-cell of the cell (a second table); only sub-cells that straddle a boundary too (a few in
  10^4 draws) are looked up by binary search over all the boundaries.

So the distribution is exactly that of ``round(X)`` with every value's probability rounded to a
multiple of 2^-50 (bf16) or 2^-52 (fp16). For a normal, values less likely than that never come
up: the draws stop at 8.0 (bf16) or 8.2 (fp16) standard deviations, beyond which a true normal
has 1.2e-15 (bf16) or 3e-16 of its mass: one value in 800 trillion, where a 70B model has 7e10. Values beyond
the largest finite number of the dtype are clamped to it (no infinities).

Tables depend only on (distribution, dtype), take 0.1-0.3 s to build and are cached.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

#: Elements handled per pass: large enough that per-call overheads vanish, small enough for the cache.
BLOCK = 1 << 17
#: Cell bits per dtype: few draws (1.2% bf16, 2.3% fp16) land in a cell straddling a boundary,
#: and the table (512 KiB, 2 MiB) still lives in the CPU's cache.
CELL_BITS = {"BF16": 18, "F16": 20}
#: Sub-cells of mixed cells tabulated, at most (the sub-cell bits are chosen to fit).
FINE_ENTRIES = 1 << 20
#: Marks a cell straddling a boundary: a NaN pattern in bf16 and fp16, never a sample.
MIXED = np.int16(0x7FC1)


def _values_of(dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Every finite value of ``dtype``, ascending (-0 before +0), as (float64 values, raw int16 bits)."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    if dtype == "BF16":
        with np.errstate(invalid="ignore"):  # NaN patterns, dropped below
            values = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    elif dtype == "F16":
        values = bits.view(np.float16).astype(np.float64)
    else:
        raise ValueError(f"no rounded-sample table for {dtype}")
    keep = np.isfinite(values)
    values, bits = values[keep], bits[keep]
    order = np.lexsort((~np.signbit(values), values))  # by value; -0 (owning the tiny negatives) first
    return values[order], bits[order].view(np.int16)


@dataclass(frozen=True)
class RoundedSampler:
    """Lookup tables drawing ``round_to_dtype(X)`` for one distribution of X and one dtype."""

    cell_bits: int
    thresholds: np.ndarray  # uint64, ascending: value k is drawn for thresholds[k-1] <= n < thresholds[k]
    bits: np.ndarray        # int16 raw bits of value k
    cells: np.ndarray       # int16 per cell: its value, or MIXED
    fine_bits: int          # a mixed cell is cut into 2**fine_bits sub-cells by the top bits of 32 more
    fine_start: np.ndarray  # int32 per cell: where a mixed cell's sub-cells start in ``fine``
    fine: np.ndarray        # int16 per sub-cell of every mixed cell: its value, or MIXED

    def sample_into(self, out: np.ndarray, gen: np.random.Generator) -> None:
        """Fill ``out`` (int16, contiguous) with raw 16-bit patterns drawn with ``gen``'s bits."""
        bits = self.cell_bits
        per_word = 64 // bits  # cell numbers cut from each random 64-bit word
        index = np.empty(-(-min(BLOCK, out.size) // per_word) * per_word, dtype=np.intp)
        mixed = np.empty(min(BLOCK, out.size), dtype=bool)
        for s in range(0, out.size, BLOCK):
            block = out[s:s + BLOCK]
            n = block.size
            m = -(-n // per_word)
            words = gen.bit_generator.random_raw(m)
            idx = index[:n]
            if per_word == 4:  # 16-bit cells: the words seen as 16-bit integers, one conversion
                np.copyto(idx, words.view(np.uint16)[:n], casting="unsafe")
            else:  # lane k of every word fills index[k*m:(k+1)*m]: contiguous, no casts
                signed = words.view(np.int64)
                for lane in range(per_word):
                    dst = index[lane * m:(lane + 1) * m]
                    if lane:
                        np.right_shift(signed, bits * lane, out=dst)
                        np.bitwise_and(dst, (1 << bits) - 1, out=dst)
                    else:
                        np.bitwise_and(signed, (1 << bits) - 1, out=dst)
            np.take(self.cells, idx, out=block, mode="wrap")
            hit = np.flatnonzero(np.equal(block, MIXED, out=mixed[:n]))
            if hit.size:
                block[hit] = self._resolve(idx[hit], gen)

    def _resolve(self, cell: np.ndarray, gen: np.random.Generator) -> np.ndarray:
        """Values for draws that landed in mixed cells ``cell``, with 32 more random bits each."""
        low = gen.bit_generator.random_raw(cell.size) >> np.uint64(32)
        sub = np.take(self.fine_start, cell).astype(np.intp)
        sub += (low >> np.uint64(32 - self.fine_bits)).astype(np.intp)
        values = np.take(self.fine, sub)
        rare = np.flatnonzero(values == MIXED)  # a sub-cell straddling a boundary: search them all
        if rare.size:
            n = (cell[rare].astype(np.uint64) << np.uint64(32)) | low[rare]
            values[rare] = self.bits[np.searchsorted(self.thresholds, n, side="right")]
        return values

    def sample(self, n: int, gen: np.random.Generator) -> np.ndarray:
        """``n`` raw 16-bit patterns (int16)."""
        out = np.empty(n, dtype=np.int16)
        self.sample_into(out, gen)
        return out


def _values_at(thresholds: np.ndarray, bits: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """Per cell ``[start, start + width)`` of draws: its value's bits, or MIXED where values change inside."""
    first = np.searchsorted(thresholds, starts, side="right")  # value of a cell's first number
    last = np.searchsorted(thresholds, starts + np.uint64(width - 1), side="right")  # and of its last
    values = bits[first].copy()
    values[last > first] = MIXED
    return values


def build_sampler(cdf: Callable[[float], float], dtype: str) -> RoundedSampler:
    """Tables for ``round_to_dtype(X)`` where X has the continuous ``cdf`` (round to nearest)."""
    cell_bits = CELL_BITS.get(dtype)
    if cell_bits is None:
        raise ValueError(f"no rounded-sample table for {dtype}")
    values, bits = _values_of(dtype)
    bounds = (values[1:] + values[:-1]) / 2  # round to nearest: a value owns the half-way points around it
    res = cell_bits + 32
    one = float(1 << res)
    cum = np.array([cdf(b) for b in bounds.tolist()], dtype=np.float64)
    thresholds = np.minimum(np.floor(cum * one + 0.5), one).astype(np.uint64)
    thresholds = np.append(thresholds, np.uint64(1 << res))  # the last value takes what is left
    starts = np.arange(1 << cell_bits, dtype=np.uint64) << np.uint64(32)
    cells = _values_at(thresholds, bits, starts, 1 << 32)
    mixed = np.flatnonzero(cells == MIXED)
    fine_bits = int(min(10, max(4, math.floor(math.log2(FINE_ENTRIES / max(1, mixed.size))))))
    sub = np.arange(1 << fine_bits, dtype=np.uint64) << np.uint64(32 - fine_bits)
    fine = _values_at(thresholds, bits, (starts[mixed][:, None] + sub[None, :]).reshape(-1), 1 << (32 - fine_bits))
    fine_start = np.zeros(1 << cell_bits, dtype=np.int32)
    fine_start[mixed] = np.arange(mixed.size, dtype=np.int32) << fine_bits
    return RoundedSampler(cell_bits, thresholds, bits, cells, fine_bits, fine_start, fine)


def _normal_cdf(std: float) -> Callable[[float], float]:
    root2 = math.sqrt(2.0) * std
    # erfc from the nearer tail keeps the small tail probabilities exact to the last bit
    return lambda x: 0.5 * math.erfc(-x / root2) if x <= 0 else 1.0 - 0.5 * math.erfc(x / root2)


@lru_cache(maxsize=4)
def rounded_normal(std: float, dtype: str) -> RoundedSampler:
    """``round(std * Z)`` in ``dtype`` (BF16 or F16)."""
    if not std > 0:
        raise ValueError(f"std must be positive, got {std}")
    return build_sampler(_normal_cdf(std), dtype)


@lru_cache(maxsize=6)
def rounded_uniform(bound: float, dtype: str) -> RoundedSampler:
    """``round(U)`` in ``dtype`` for U uniform on [-bound, bound] (Xavier-uniform)."""
    if not bound > 0:
        raise ValueError(f"bound must be positive, got {bound}")
    return build_sampler(lambda x: min(1.0, max(0.0, (x + bound) / (2 * bound))), dtype)
