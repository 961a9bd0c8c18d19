"""RMSNorm with a learnable ``scale`` (torchtune's parameter name)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, computed in fp32.

    Args:
        dim: size of the normalised (last) dimension.
        eps: added to the mean square before the square root.
    Shapes: ``[..., dim] -> [..., dim]``.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.scale * xf.to(x.dtype)
