"""Builders: a ``TransformerDecoder`` (fused or not) from a ``ModelConfig`` and ``FusionConfig``.

Kept apart from the modules, as torchtune keeps its component builders: modules know nothing of
configs, builders know nothing of files.
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch.config import FusionConfig, ModelConfig
from ..errors import UsageError
from ..modules import (CrossAttention, DecoderLayer, FeedForward, FusionEmbedding, FusionLayer,
                      GatedCrossAttentionLayer, RMSNorm, RotaryEmbedding, SelfAttention, TransformerDecoder)


def build_norm(cfg: ModelConfig, dim: int, eps: float) -> RMSNorm:
    """An RMSNorm following ``cfg``'s convention (Gemma: effective scale ``1 + w``, applied in fp32)."""
    return RMSNorm(dim, eps, offset=cfg.norm_offset, fp32_scale=cfg.norm_fp32_scale)


def build_rope(cfg: ModelConfig, *, rope_layout: str | None = None, rope_theta: float | None = None) -> RotaryEmbedding:
    """RoPE for ``cfg``, in the layout its q/k rows follow (``cfg.rope_layout``) unless ``rope_layout`` says otherwise."""
    theta = rope_theta if rope_theta is not None else cfg.rope_theta
    if theta is None:
        raise UsageError(
            "RoPE theta is unknown (no config.json gave it and tensors cannot tell): pass `config` PATH with "
            "the base's config, or `rope_defaults` llama3 to assume torchtune's Llama 3 settings "
            "(theta 500000, llama3 scaling factor 8)"
        )
    return RotaryEmbedding(cfg.head_dim, theta, cfg.rope_scaling, rope_layout or cfg.rope_layout)


def build_self_attention_layer(cfg: ModelConfig, rope: RotaryEmbedding) -> DecoderLayer:
    """One original decoder layer of ``cfg``'s architecture."""
    attn = SelfAttention(cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rope, bias=cfg.attn_bias,
                         qk_norm_eps=cfg.norm_eps if cfg.qk_norm else None, fused_qkv=cfg.fused_qkv,
                         sliding_window=cfg.sliding_window, norm_offset=cfg.norm_offset,
                         norm_fp32_scale=cfg.norm_fp32_scale)
    mlp = FeedForward(cfg.dim, cfg.intermediate_dim, cfg.activation, fused_gate_up=cfg.fused_gate_up)
    return DecoderLayer(attn, mlp, build_norm(cfg, cfg.dim, cfg.norm_eps), build_norm(cfg, cfg.dim, cfg.norm_eps))


def build_fusion_layer(cfg: ModelConfig, fusion: FusionConfig) -> GatedCrossAttentionLayer:
    """A gated cross-attention block as wide as the decoder, reading ``fusion.encoder_dim`` states.

    Its projections are always separate (q/k/v, gate/up: Mllama's names), whatever the base fuses;
    its norms follow the base's convention, so they start as the identity either way.
    """
    attn = CrossAttention(cfg.dim, fusion.encoder_dim or cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                          qk_norm_eps=fusion.qk_norm_eps, norm_offset=cfg.norm_offset,
                          norm_fp32_scale=cfg.norm_fp32_scale)
    mlp = FeedForward(cfg.dim, cfg.intermediate_dim, cfg.activation)
    return GatedCrossAttentionLayer(attn, mlp, build_norm(cfg, cfg.dim, fusion.norm_eps),
                                    build_norm(cfg, cfg.dim, fusion.norm_eps))


def build_decoder(cfg: ModelConfig, fusion: FusionConfig | None = None, *, rope_layout: str | None = None,
                  rope_theta: float | None = None) -> TransformerDecoder:
    """The decoder of ``cfg``, with ``FusionLayer``s at ``fusion.layers`` when given (weights uninitialised).

    Args:
        cfg: the base's architecture.
        fusion: the fusion settings (layers, placement, encoder width, fusion vocabulary), or None.
        rope_layout: ``"interleaved"`` or ``"half"``; default: the layout the checkpoint's q/k rows
            follow (``cfg.rope_layout``: its naming family's, per type in torchtune's names).
        rope_theta: RoPE base when ``cfg`` has none.

    Returns:
        TransformerDecoder: ``model(tokens [b, s], encoder_input=[b, e, encoder_dim])`` -> ``[b, s, vocab]``.

    Raises:
        UsageError: RoPE theta unknown (no config gave it and ``rope_theta`` is None).
    """
    rope = build_rope(cfg, rope_layout=rope_layout, rope_theta=rope_theta)
    fused = set(fusion.layers) if fusion else set()
    layers: list[nn.Module] = []
    for i in range(cfg.num_layers):
        layer: nn.Module = build_self_attention_layer(cfg, rope)
        if i in fused:
            layer = FusionLayer(layer, build_fusion_layer(cfg, fusion), fusion_first=fusion.fusion_first)
        layers.append(layer)
    if fusion and fusion.fusion_vocab:
        embed: nn.Module = FusionEmbedding(cfg.vocab_size, fusion.fusion_vocab, cfg.dim)
    else:
        embed = nn.Embedding(cfg.vocab_size, cfg.dim)
    output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
    return TransformerDecoder(tok_embeddings=embed, layers=layers, norm=build_norm(cfg, cfg.dim, cfg.norm_eps),
                              output=output, key_family=cfg.family_obj, embed_scale=cfg.embed_scale)


def build_empty(cfg: ModelConfig, fusion: FusionConfig | None, *, dtype: torch.dtype, device: torch.device | str,
                rope_layout: str | None = None, rope_theta: float | None = None) -> TransformerDecoder:
    """The decoder with uninitialised weights on ``device`` (no time spent on random init)."""
    with torch.device("meta"):
        model = build_decoder(cfg, fusion, rope_layout=rope_layout, rope_theta=rope_theta)
    model = model.to_empty(device=device).to(dtype)
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            m.reset_buffers()
    return model
