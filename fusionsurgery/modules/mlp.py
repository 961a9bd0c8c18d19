"""Gated feed-forward network (SwiGLU; GeGLU with ``activation='gelu_pytorch_tanh'``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class FeedForward(nn.Module):
    """``w2(act(w1(x)) * w3(x))``: w1 is the gate projection, w3 the up, w2 the down.

    With ``fused_gate_up`` one ``w13`` projection holds the gate rows then the up rows (Phi-3's
    ``gate_up_proj``), so a checkpoint's fused tensor loads as it is.
    Shapes: ``[..., dim] -> [..., dim]`` through ``hidden_dim``.
    """

    def __init__(self, dim: int, hidden_dim: int, activation: str = "silu", fused_gate_up: bool = False) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {activation!r}")
        self.activation = activation
        if fused_gate_up:
            self.w13 = nn.Linear(dim, 2 * hidden_dim, bias=False)
            self.w1 = self.w3 = None
        else:
            self.w13 = None
            self.w1 = nn.Linear(dim, hidden_dim, bias=False)
            self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(ACTIVATIONS[self.activation](gate) * up)
