"""The fusion block in transformers' own spelling: Mllama's cross-attention decoder layer names.

Parameter names are the checkpoint's keys (``cross_attn.q_proj.weight``, ``input_layernorm.weight``,
``cross_attn_attn_gate`` ...), so transformers' loader, PEFT and FSDP see the checkpoint's names. The
math is ``GatedCrossAttentionLayer``'s (``fusionsurgery.modules``): pre-norm cross-attention with
q/k RMSNorms over ``head_dim`` and no RoPE, then a pre-norm gated MLP, each through a ``tanh`` gate;
a token that may attend no encoder position is left untouched. Norms are the base model's own
RMSNorm class, so they follow its convention (Gemma's ``1 + w``) exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..arch.config import FusionConfig, activation_of
from ..modules.mlp import ACTIVATIONS

#: Attribute of a transformers ``Cache`` holding the encoder keys/values: {layer index: (k, v)}.
ENCODER_KV_ATTR = "fusion_encoder_kv"


@dataclass(frozen=True)
class BlockSpec:
    """Sizes of one fusion block, read from a transformers config with a ``fusion`` section."""

    dim: int
    encoder_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_dim: int
    activation: str
    norm_eps: float
    qk_norm_eps: float

    @classmethod
    def from_config(cls, config: Any, fusion: FusionConfig) -> "BlockSpec":
        doc = config.to_dict()
        heads = int(config.num_attention_heads)
        return cls(
            dim=int(config.hidden_size), encoder_dim=int(fusion.encoder_dim or config.hidden_size),
            num_heads=heads, num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            intermediate_dim=int(config.intermediate_size), activation=activation_of(doc, config.model_type),
            norm_eps=float(fusion.norm_eps), qk_norm_eps=float(fusion.qk_norm_eps),
        )


class FusionCrossAttention(nn.Module):
    """Grouped-query attention from tokens ``[b, s, dim]`` to encoder keys/values, no RoPE, not causal."""

    def __init__(self, spec: BlockSpec, norm_cls: type[nn.Module]) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_proj = nn.Linear(spec.dim, spec.num_heads * spec.head_dim, bias=False)
        self.k_proj = nn.Linear(spec.encoder_dim, spec.num_kv_heads * spec.head_dim, bias=False)
        self.v_proj = nn.Linear(spec.encoder_dim, spec.num_kv_heads * spec.head_dim, bias=False)
        self.o_proj = nn.Linear(spec.num_heads * spec.head_dim, spec.dim, bias=False)
        self.q_norm = norm_cls(spec.head_dim, eps=spec.qk_norm_eps)
        self.k_norm = norm_cls(spec.head_dim, eps=spec.qk_norm_eps)

    def encode(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[b, kv_heads, e, head_dim]`` of encoder states ``[b, e, encoder_dim]``."""
        b, e, _ = states.shape
        states = states.to(self.k_proj.weight.dtype)
        k = self.k_norm(self.k_proj(states).view(b, e, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(states).view(b, e, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                visible: torch.Tensor | None = None) -> torch.Tensor:
        """``visible`` ``[b, s or 1, e]`` (True: may attend); rows that see nothing must be zeroed by the caller."""
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.num_heads, self.head_dim)).transpose(1, 2)
        mask = None if visible is None else visible[:, None]
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class FusionMLP(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` with the base's activation."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(spec.dim, spec.intermediate_dim, bias=False)
        self.up_proj = nn.Linear(spec.dim, spec.intermediate_dim, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_dim, spec.dim, bias=False)
        self.act = ACTIVATIONS[spec.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class FusionBlock(nn.Module):
    """A gated cross-attention block attached to decoder layer ``layer_idx`` (its ``fusion_layer``).

    ``forward(x [b, s, dim], states [b, e, encoder_dim] | None, mask, cache) -> [b, s, dim]``. Without
    states it reads the keys/values that an earlier call stored in ``cache`` (generation), and with
    neither it returns ``x``: the model runs text-only. ``mask`` ``[b, e]`` or ``[b, s, e]`` is true
    (or 1) where a token may attend an encoder position.
    """

    def __init__(self, spec: BlockSpec, norm_cls: type[nn.Module], layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.cross_attn = FusionCrossAttention(spec, norm_cls)
        self.input_layernorm = norm_cls(spec.dim, eps=spec.norm_eps)
        self.post_attention_layernorm = norm_cls(spec.dim, eps=spec.norm_eps)
        self.mlp = FusionMLP(spec)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def fusion_params(self) -> list[str]:
        """Every parameter of the block (``fusionsurgery.get_fusion_params`` reads this)."""
        return [name for name, _ in self.named_parameters()]

    def reset_gates(self) -> None:
        with torch.no_grad():
            self.cross_attn_attn_gate.zero_()
            self.cross_attn_mlp_gate.zero_()

    def keys_values(self, states: torch.Tensor | None, cache: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys/values of ``states`` (stored in ``cache`` when there is one), else those ``cache`` holds."""
        store = getattr(cache, ENCODER_KV_ATTR, None) if cache is not None else None
        if states is not None:
            kv = self.cross_attn.encode(states)
            if cache is not None:
                if store is None:
                    store = {}
                    setattr(cache, ENCODER_KV_ATTR, store)
                store[self.layer_idx] = kv
            return kv
        return store.get(self.layer_idx) if store else None

    def forward(self, x: torch.Tensor, states: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache: Any = None) -> torch.Tensor:
        kv = self.keys_values(states, cache)
        if kv is None:
            return x
        visible = dead = None
        if mask is not None:
            visible = mask.to(device=x.device, dtype=torch.bool)
            if visible.dim() == 2:
                visible = visible[:, None, :]
            dead = ~visible.any(-1, keepdim=True)  # [b, s or 1, 1]: tokens that may attend nothing
            visible = visible | dead  # keeps the softmax finite; those rows are zeroed below
        attn = self.cross_attn(self.input_layernorm(x), *kv, visible)
        if dead is not None:
            attn = attn.masked_fill(dead, 0.0)
        h = x + attn * self.cross_attn_attn_gate.tanh()
        mlp = self.mlp(self.post_attention_layernorm(h))
        if dead is not None:
            mlp = mlp.masked_fill(dead, 0.0)
        return h + mlp * self.cross_attn_mlp_gate.tanh()


def check_mask(states: torch.Tensor | None, mask: torch.Tensor | None, seq_len: int) -> None:
    """A clear error for a ``cross_attention_mask`` that does not fit the states and tokens."""
    if mask is None:
        return
    if mask.dim() not in (2, 3):
        raise ValueError(f"cross_attention_mask must be [batch, encoder_len] or [batch, seq, encoder_len], "
                         f"got shape {list(mask.shape)}")
    if states is not None and (mask.shape[0] != states.shape[0] or mask.shape[-1] != states.shape[1]):
        raise ValueError(f"cross_attention_mask {list(mask.shape)} does not fit cross_attention_states "
                         f"{list(states.shape)} (batch and encoder length must agree)")
    if mask.dim() == 3 and mask.shape[1] != seq_len:
        raise ValueError(f"cross_attention_mask has {mask.shape[1]} token rows for {seq_len} tokens")
