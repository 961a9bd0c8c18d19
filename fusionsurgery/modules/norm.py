"""RMSNorm with a learnable ``scale`` (torchtune's parameter name)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, computed in fp32.

    Args:
        dim: size of the normalised (last) dimension.
        eps: added to the mean square before the square root.
        offset: the effective scale is ``offset + scale`` (Gemma stores ``w`` for a scale of ``1 + w``,
            so its identity is a stored zero); a new norm starts at an effective scale of one.
        fp32_scale: multiply by the scale in fp32 and cast afterwards (Gemma), instead of casting
            the normalised input first and multiplying in the input's dtype (Llama).
    Shapes: ``[..., dim] -> [..., dim]``.
    """

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0, fp32_scale: bool = False) -> None:
        super().__init__()
        self.eps, self.offset, self.fp32_scale = eps, offset, fp32_scale
        self.scale = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.scale, self.eps, self.offset, self.fp32_scale)


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float, offset: float = 0.0,
             fp32_scale: bool = False) -> torch.Tensor:
    """``x`` normalised over its last dimension in fp32, times ``offset + scale`` (see ``RMSNorm``).

    Args:
        x: input ``[..., dim]``.
        scale: the stored scale ``[dim]``.
        eps: added to the mean square.
        offset: added to ``scale`` (Gemma: 1).
        fp32_scale: multiply in fp32 then cast (Gemma), else cast then multiply (Llama).
    Returns:
        ``[..., dim]`` in ``x``'s dtype (Llama's convention: the product's promoted dtype).
    """
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if fp32_scale:
        return (xf * (scale.float() + offset)).to(x.dtype)
    scale = scale + offset if offset else scale
    return scale * xf.to(x.dtype)
