"""The gates, read from the files (no forward): closed gates make a fused model the base's function.

For a type whose forward runs elsewhere (transformers) or not at all here, this is what ``verify``
can say about identity at init without running the model: every gate ``tanh(g)`` is 0 (the fusion
blocks add nothing), or how far they are open (trained). Non-finite gates fail.
"""

from __future__ import annotations

import math

from ..io.checkpoint import Checkpoint
from ..io.float_bits import FLOAT_DTYPES, to_float32
from .report import CheckResult
from .structure import Layout

NAME, TITLE = "gates", "Gates: closed gates leave the base's function (read from the files)"
_GATES = ("ca_scale.scale", "mlp_scale.scale")


def check_gates(ckpt: Checkpoint, layout: Layout) -> CheckResult:
    """Read every planned gate tensor; summarise how open they are."""
    result = CheckResult(NAME, TITLE)
    values: dict[str, float] = {}
    for t in layout.new_tensors:
        if not t.canonical.endswith(_GATES) or t.key not in ckpt.key_to_file:
            continue
        info = ckpt.info(t.key)
        if info.dtype not in FLOAT_DTYPES:
            result.fail(f"{t.key} is {info.dtype}, not a float")
            continue
        for v in to_float32(ckpt.read_bytes(t.key), info.dtype).tolist():
            if not math.isfinite(v):
                result.fail(f"{t.key} is {v}")
            values[t.key] = v
    opened = {k: math.tanh(v) for k, v in values.items() if math.isfinite(v) and v != 0.0}
    result.figures = {"gates": len(values), "open": len(opened),
                      "max_abs_tanh": max((abs(v) for v in opened.values()), default=0.0)}
    if opened:
        result.notes.append(f"{len(opened)} of {len(values)} gate(s) open (trained?): the fused model no longer "
                            "computes the base's function exactly")
        summary = f"{len(opened)} of {len(values)} gates open, max |tanh(g)| {result.figures['max_abs_tanh']:.3g}"
    else:
        summary = f"all {len(values)} gates closed (tanh(0) = 0): the fused model computes the base's function"
    return result.finish(summary)
