"""Converting float32 values to and from the raw bits of 16-bit float types, in numpy (no torch).

``fuse`` creates and copies weights without importing torch (a second of start-up here); these
conversions round to nearest even, as torch's do, and turn NaN into the quiet NaN torch writes.
"""

from __future__ import annotations

import numpy as np

FLOAT_DTYPES = ("F32", "F16", "BF16")
_BF16_QUIET_NAN = np.uint16(0x7FC0)


def to_float32(raw: bytes | bytearray | memoryview, dtype: str) -> np.ndarray:
    """The values of ``raw`` (little-endian ``dtype`` elements) as float32."""
    if dtype == "F32":
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if dtype == "F16":
        return np.frombuffer(raw, dtype="<f2").astype(np.float32)
    if dtype == "BF16":
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    raise ValueError(f"not a float type this converts: {dtype}")


def from_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 ``values`` as a contiguous array holding ``dtype``'s raw bits."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "F32":
        return values
    if dtype == "F16":
        with np.errstate(over="ignore"):  # beyond fp16's range is inf, as in torch
            return values.astype(np.float16)
    if dtype == "BF16":
        u = values.view(np.uint32)
        bits = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
        nan = np.isnan(values)
        if nan.any():
            bits[nan] = _BF16_QUIET_NAN
        return bits
    raise ValueError(f"not a float type this converts: {dtype}")
