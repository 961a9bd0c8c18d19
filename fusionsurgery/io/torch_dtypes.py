"""Mapping between safetensors dtype names and torch dtypes (imports torch)."""

from __future__ import annotations

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
for _name, _attr in (("F8_E8M0", "float8_e8m0fnu"), ("C64", "complex64")):  # E8M0: torch >= 2.7
    if hasattr(torch, _attr):
        TORCH_DTYPES[_name] = getattr(torch, _attr)
ST_DTYPES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}

#: Names users type for --dtype.
DTYPE_ALIASES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def tensor_from_bytes(data: bytes | bytearray | memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor that owns a copy of ``data`` interpreted as ``dtype`` and ``shape``."""
    tdt = TORCH_DTYPES[dtype]
    if len(data) == 0:
        return torch.empty(shape, dtype=tdt)
    buf = bytearray(data)
    return torch.frombuffer(buf, dtype=tdt).reshape(shape)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a CPU tensor, as safetensors stores them."""
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def parse_dtype(name: str) -> torch.dtype:
    """A torch dtype from a user's spelling (bf16, fp16, fp32, ...)."""
    try:
        return DTYPE_ALIASES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of bf16, fp16, fp32") from None
