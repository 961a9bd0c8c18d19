"""Decoder layers: the original self-attention layer and the gated cross-attention fusion layer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .attention import CrossAttention, SelfAttention
from .caches import AttentionCaches
from .mlp import FeedForward
from .norm import RMSNorm


class TanhGate(nn.Module):
    """Multiplies its input by ``tanh(scale)``; ``scale`` is a ``[1]`` parameter starting at zero."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.tanh()


class DecoderLayer(AttentionCaches, nn.Module):
    """Pre-norm self-attention then pre-norm MLP, each added to the residual.

    Shapes: ``[b, s, dim] -> [b, s, dim]``; ``input_pos [s]`` (``positions``, its former name, is
    accepted too); ``mask [b, s, s]`` (or ``[b, s, cache length]`` while decoding) replaces the causal
    mask where given. Encoder arguments are accepted and ignored, so a stack can pass the same keyword
    arguments to every layer. Cache methods in both torchtune spellings (``setup_caches`` needs
    ``decoder_max_seq_len``).

    Args:
        attn: the self-attention.
        mlp: the feed-forward block.
        sa_norm: the norm before the attention.
        mlp_norm: the norm before the MLP.
    """

    _length = "decoder_max_seq_len"

    def __init__(self, attn: SelfAttention, mlp: FeedForward, sa_norm: RMSNorm, mlp_norm: RMSNorm) -> None:
        super().__init__()
        self.sa_norm, self.attn, self.mlp_norm, self.mlp = sa_norm, attn, mlp_norm, mlp

    def forward(self, x: torch.Tensor, *, input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        if input_pos is None:
            input_pos = positions if positions is not None else torch.arange(x.shape[1], device=x.device)
        h = x + self.attn(self.sa_norm(x), positions=input_pos, mask=mask)
        return h + self.mlp(self.mlp_norm(h))


class GatedCrossAttentionLayer(AttentionCaches, nn.Module):
    """Flamingo's gated cross-attention block (torchtune's ``TransformerCrossAttentionLayer``).

    The tanh gates, initialised at zero so the block starts as the identity, are Flamingo's
    (https://arxiv.org/abs/2204.14198, its GATED XATTN-DENSE layers); the q/k RMSNorms over
    ``head_dim`` follow Llama 3.2 Vision's released cross-attention layers (transformers' Mllama).

    ``h = x + tanh(ca_scale) * attn(ca_norm(x), encoder)``; ``out = h + tanh(mlp_scale) * mlp(mlp_norm(h))``.
    With zero gates the block is the identity; with no encoder input and an empty cache it returns
    ``x`` untouched, so a fused model runs text-only. Shapes: ``[b, s, dim] -> [b, s, dim]``.
    Cache methods in both torchtune spellings (``setup_caches`` needs ``encoder_max_seq_len``).

    Args:
        attn: the cross-attention to encoder states ``[b, e, encoder_dim]``.
        mlp: the feed-forward block.
        ca_norm: the norm before the cross-attention.
        mlp_norm: the norm before the MLP.
    """

    _length = "encoder_max_seq_len"

    def __init__(self, attn: CrossAttention, mlp: FeedForward, ca_norm: RMSNorm, mlp_norm: RMSNorm) -> None:
        super().__init__()
        self.ca_norm, self.attn, self.mlp_norm, self.mlp = ca_norm, attn, mlp_norm, mlp
        self.ca_scale, self.mlp_scale = TanhGate(), TanhGate()

    def forward(self, x: torch.Tensor, *, encoder_input: torch.Tensor | None = None,
                encoder_mask: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        if encoder_input is None and not self.attn.has_cached_input:
            return x
        h = x + self.ca_scale(self.attn(self.ca_norm(x), encoder_input, encoder_mask))
        mlp_out = self.mlp(self.mlp_norm(h))
        if encoder_mask is not None:
            mlp_out = mlp_out.masked_fill(~encoder_mask.to(torch.bool).any(-1)[..., None], 0.0)
        return h + self.mlp_scale(mlp_out)
