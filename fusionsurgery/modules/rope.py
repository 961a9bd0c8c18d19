"""Rotary position embeddings in both layouts that checkpoints use.

``half`` (Hugging Face) rotates dimension ``j`` with ``j + head_dim/2``; ``interleaved``
(torchtune, Meta) rotates pairs ``(2j, 2j+1)``. A checkpoint's q/k rows are ordered for one of them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` for ``theta`` and an optional scaling rule."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv = 1.0 / (theta ** exponents)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_scaled(inv, scaling)
    raise ValueError(f"unsupported rope type {kind!r}")


def _llama3_scaled(inv: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling: long wavelengths slowed by ``factor``, short kept."""
    factor = float(s["factor"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    context = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    slowed = torch.where(wavelen > context / low, inv / factor, inv)
    blend = (context / wavelen - low) / (high - low)
    mixed = (1 - blend) * slowed / factor + blend * slowed
    middle = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(middle, mixed, slowed)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to ``[batch, heads, seq, head_dim]`` tensors at given positions."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None = None, layout: str = "half") -> None:
        super().__init__()
        if layout not in ("half", "interleaved"):
            raise ValueError(f"unknown RoPE layout {layout!r}")
        self.head_dim, self.layout, self.theta, self.scaling = head_dim, layout, theta, scaling
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)

    def reset_buffers(self) -> None:
        """Recompute the frequencies in fp32 (after ``to_empty`` or a dtype change)."""
        device = self.inv_freq.device
        self.inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling).to(device)

    def _apply(self, fn, recurse: bool = True):  # keep the frequencies fp32 whatever the model dtype
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and self.inv_freq.device.type != "meta":
            self.reset_buffers()
        return self

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` ``[b, h, s, d]`` by ``positions`` ``[s]`` (or ``[b, s]``)."""
        angles = positions.float()[..., :, None] * self.inv_freq.float()  # [(b,) s, d/2]
        if angles.dim() == 3:
            angles = angles[:, None]  # [b, 1, s, d/2]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        if self.layout == "half":
            cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
            x1, x2 = x.chunk(2, dim=-1)
            return x * cos + torch.cat([-x2, x1], -1) * sin
        pairs = x.unflatten(-1, (-1, 2))
        x1, x2 = pairs[..., 0], pairs[..., 1]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
        return out.flatten(-2)
