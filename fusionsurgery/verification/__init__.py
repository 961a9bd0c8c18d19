"""Verification of fused checkpoints: structure, originals, identity at init, a live fusion path,
forward/backward, KV cache and figures, on CPU or GPU, whole or streamed one layer at a time.

``verify(path, base=None, device="auto", dtype="same", stream=False) -> Report``.
"""

from .report import CheckResult, Report
from .runner import verify

__all__ = ["CheckResult", "Report", "verify"]
