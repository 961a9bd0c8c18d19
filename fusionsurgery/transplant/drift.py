"""How far one base is from another (``graft --was``): per-tensor relative difference of the original weights.

``||BASE - BASE0|| / ||BASE0||`` (Frobenius norms) for every tensor, in float32 over blocks of rows
(sums carried in float64), so no more than a block of each tensor is in memory; bit-identical
blocks are not subtracted. numpy only: no torch. Per decoder layer, the same
ratio over all its tensors. BASE0's tensor digests are taken on the way, to tell whether it is the
very base an adapter was made from.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..arch.families import Family, is_fusion_key
from ..errors import UsageError
from ..io.checkpoint import Checkpoint
from ..io.digest import DEFAULT_ALGORITHM, new_hash
from ..io.float_bits import FLOAT_DTYPES, to_float32
from ..exporting.tensors import OutTensor, Part, chunks
from ..io.progress import Progress

#: Bytes of one tensor read at a time (per checkpoint).
BLOCK_BYTES = 8 * 1024 * 1024
#: Layers listed as having moved most.
TOP_LAYERS = 5


@dataclass
class TensorDelta:
    name: str
    layer: int | None
    diff_sq: float  # sum of squared differences
    ref_sq: float  # sum of squares of BASE0's tensor
    identical: bool

    @property
    def relative(self) -> float:
        return _ratio(self.diff_sq, self.ref_sq)


@dataclass
class Drift:
    """The comparison of a base with BASE0."""

    was: str
    tensors: list[TensorDelta] = field(default_factory=list)
    fused_layers: list[int] = field(default_factory=list)
    #: BASE0 tensors whose digest equals the adapter's record of its base (None: nothing to compare with)
    matches_adapter_base: int | None = None

    def layers(self) -> list[tuple[int, float]]:
        """(layer, relative difference over all its tensors), the most moved first."""
        sums: dict[int, list[float]] = {}
        for t in self.tensors:
            if t.layer is not None:
                acc = sums.setdefault(t.layer, [0.0, 0.0])
                acc[0] += t.diff_sq
                acc[1] += t.ref_sq
        return sorted(((i, _ratio(d, r)) for i, (d, r) in sums.items()), key=lambda x: (-x[1], x[0]))

    def summary(self) -> dict[str, Any]:
        rel = [t.relative for t in self.tensors]
        worst = max(self.tensors, key=lambda t: t.relative, default=None)
        return {
            "tensors": len(self.tensors),
            "identical": sum(t.identical for t in self.tensors),
            "overall": _ratio(sum(t.diff_sq for t in self.tensors), sum(t.ref_sq for t in self.tensors)),
            "median": statistics.median(rel) if rel else 0.0,
            "mean": statistics.fmean(rel) if rel else 0.0,
            "max": worst.relative if worst else 0.0,
            "max_tensor": worst.name if worst else None,
        }

    def to_dict(self) -> dict[str, Any]:
        fused = set(self.fused_layers)
        return {
            "was": self.was,
            "summary": self.summary(),
            "layers_moved_most": [{"layer": i, "relative": r, "has_fusion_layer": i in fused}
                                  for i, r in self.layers()[:TOP_LAYERS]],
            "non_layer_tensors": {t.name: t.relative for t in self.tensors if t.layer is None},
            "matches_adapter_base": self.matches_adapter_base,
        }


def _ratio(diff_sq: float, ref_sq: float) -> float:
    if ref_sq == 0.0:
        return 0.0 if diff_sq == 0.0 else math.inf
    return math.sqrt(diff_sq / ref_sq)


def _blocks(ckpt: Checkpoint, key: str) -> Iterator[bytes]:
    """The raw bytes of tensor ``key``, a block of rows at a time."""
    info = ckpt.info(key)
    rows = info.shape[0] if info.shape else 1
    rest = tuple(info.shape[1:])
    step = max(1, BLOCK_BYTES // max(1, info.nbytes // max(rows, 1)))
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        yield b"".join(chunks(ckpt, OutTensor(key, info.dtype, (n, *rest), [Part(key, r0, n)])))


def _floats(raw: bytes, dtype: str, key: str) -> np.ndarray:
    if dtype not in FLOAT_DTYPES:
        raise UsageError(f"`was`: {key} is {dtype}; only float tensors can be compared")
    return to_float32(raw, dtype)


def compare(base: Checkpoint, ref: Checkpoint, family: Family, *, fused_layers: list[int], was: str,
            expected: dict[str, str] | None = None, algorithm: str = DEFAULT_ALGORITHM,
            progress: Progress | None = None) -> Drift:
    """Compare every original tensor of ``base`` with the same tensor of ``ref`` (same names and shapes:
    the caller checks the dimensions). ``expected``: the adapter's record of its base's digests."""
    drift = Drift(was, fused_layers=list(fused_layers))
    matches = 0
    for key in base.keys():
        canonical = family.to_canonical(key)
        if is_fusion_key(canonical):
            continue
        layer = family.layer_of(key)
        diff_sq = ref_sq = 0.0
        dtype_a, dtype_b = base.info(key).dtype, ref.info(key).dtype
        identical = dtype_a == dtype_b
        digest = new_hash(algorithm)
        for raw_a, raw_b in zip(_blocks(base, key), _blocks(ref, key)):
            b = _floats(raw_b, dtype_b, key)
            ref_sq += float(np.dot(b, b))
            if not (identical and raw_a == raw_b):
                identical = False
                d = _floats(raw_a, dtype_a, key) - b
                diff_sq += float(np.dot(d, d))
            digest.update(raw_b)
            if progress:
                progress(len(raw_a) + len(raw_b))
        drift.tensors.append(TensorDelta(key, layer, diff_sq, ref_sq, identical))
        if expected is not None and expected.get(key) == digest.hexdigest():
            matches += 1
    drift.matches_adapter_base = matches if expected is not None else None
    return drift
