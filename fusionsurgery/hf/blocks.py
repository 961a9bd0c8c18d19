"""The fusion block in transformers' own spelling: Mllama's cross-attention decoder layer names.

Parameter names are the checkpoint's keys (``cross_attn.q_proj.weight``, ``input_layernorm.weight``,
``cross_attn_attn_gate`` ...), so transformers' loader, PEFT and FSDP see the checkpoint's names. The
math is ``GatedCrossAttentionLayer``'s (``fusionsurgery.modules``): pre-norm cross-attention with
q/k RMSNorms over ``head_dim`` and no RoPE, then a pre-norm gated MLP, each through a ``tanh`` gate;
a token that may attend no encoder position is left untouched. Norms are RMSNorms in the convention
the ``fusion`` section records (``norm_offset``: Gemma's ``1 + w`` or a plain ``w``), whatever norm
the base itself uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..arch.config import FusionConfig, fusion_activation, norm_offset_of
from ..modules.mlp import ACTIVATIONS
from ..modules.norm import rms_norm

#: Attribute of a transformers ``Cache`` holding the encoder keys/values: {layer index: (k, v)}.
ENCODER_KV_ATTR = "fusion_encoder_kv"


def _first(obj: Any, *names: str) -> Any:
    """The first of ``names`` that ``obj`` sets (a transformers config, or a dict), else None.

    A per-layer attribute that transformers refuses to read globally counts as unset.
    """
    for name in names:
        try:
            value = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
        except Exception:  # noqa: BLE001 - e.g. Gemma 4's AmbiguousGlobalPerLayerAttributeError
            value = None
        if value is not None and not isinstance(value, bool):
            return value
    return None


@dataclass(frozen=True)
class BlockSpec:
    """Sizes of one fusion block, read from the ``fusion`` section of a config (derived from the base's
    own fields when a section written by an older version lacks them)."""

    dim: int
    encoder_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_dim: int
    activation: str
    norm_eps: float
    qk_norm_eps: float
    norm_offset: float = 0.0

    @classmethod
    def from_config(cls, config: Any, fusion: FusionConfig) -> "BlockSpec":
        """``config``: a transformers config (or its dict) whose ``fusion`` section is ``fusion``.

        Raises:
            ValueError: when neither the fusion section nor the base's config gives a size.
        """
        section = _section(config)
        base = _text_config(config)
        dim = _first(section, "dim") or _first(base, "hidden_size", "n_embd", "d_model", "dim")
        heads = _first(section, "num_heads") or _first(base, "num_attention_heads", "n_head", "num_heads")
        if dim is None or heads is None:
            raise ValueError("the config names neither the fusion block's width and heads (fusion.dim, "
                             "fusion.num_heads) nor the base's (hidden_size, num_attention_heads)")
        dim, heads = int(dim), int(heads)
        kv = _first(section, "num_kv_heads") or _first(base, "num_key_value_heads", "num_kv_heads") or heads
        head_dim = _first(section, "head_dim") or _first(base, "head_dim") or dim // heads
        inter = _first(section, "intermediate_dim") or _first(base, "intermediate_size", "n_inner",
                                                              "ffn_hidden_size") or 4 * dim
        activation = _first(section, "activation") or fusion_activation(
            _first(base, "hidden_activation", "hidden_act", "activation_function"))
        offset = _first(section, "norm_offset")
        if offset is None:
            offset = norm_offset_of(str(_first(base, "model_type") or _first(config, "model_type") or ""))
        if activation not in ACTIVATIONS:
            raise ValueError(f"fusion.activation {activation!r} is not one the fusion block implements "
                             f"({', '.join(ACTIVATIONS)})")
        return cls(dim=dim, encoder_dim=int(fusion.encoder_dim or dim), num_heads=heads, num_kv_heads=int(kv),
                   head_dim=int(head_dim), intermediate_dim=int(inter), activation=str(activation),
                   norm_eps=float(fusion.norm_eps), qk_norm_eps=float(fusion.qk_norm_eps), norm_offset=float(offset))


def _section(config: Any) -> dict[str, Any]:
    doc = config.get("fusion") if isinstance(config, dict) else getattr(config, "fusion", None)
    return doc if isinstance(doc, dict) else {}


def _text_config(config: Any) -> Any:
    """The decoder's own config: ``text_config`` of a multimodal one, else the config itself."""
    if isinstance(config, dict):
        return config.get("text_config") or config
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


class FusionRMSNorm(nn.Module):
    """RMSNorm with a ``weight`` (transformers' name), computed in fp32: ``x * (offset + weight)``.

    ``offset`` 0 is Llama's convention (normalise in fp32, cast, multiply), 1 Gemma's (stores ``w`` for
    a scale of ``1 + w``, multiplies in fp32, then casts); a new norm has an effective scale of one.
    The same math as ``fusionsurgery.modules.norm.RMSNorm``, whatever norm the base itself uses
    (GPT-2 and GPT-NeoX have LayerNorms).
    """

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset, fp32_scale=bool(self.offset))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, offset={self.offset}"


class FusionCrossAttention(nn.Module):
    """Grouped-query attention from tokens ``[b, s, dim]`` to encoder keys/values, no RoPE, not causal."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_proj = nn.Linear(spec.dim, spec.num_heads * spec.head_dim, bias=False)
        self.k_proj = nn.Linear(spec.encoder_dim, spec.num_kv_heads * spec.head_dim, bias=False)
        self.v_proj = nn.Linear(spec.encoder_dim, spec.num_kv_heads * spec.head_dim, bias=False)
        self.o_proj = nn.Linear(spec.num_heads * spec.head_dim, spec.dim, bias=False)
        self.q_norm = FusionRMSNorm(spec.head_dim, spec.qk_norm_eps, spec.norm_offset)
        self.k_norm = FusionRMSNorm(spec.head_dim, spec.qk_norm_eps, spec.norm_offset)

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

    def __init__(self, spec: BlockSpec, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.cross_attn = FusionCrossAttention(spec)
        self.input_layernorm = FusionRMSNorm(spec.dim, spec.norm_eps, spec.norm_offset)
        self.post_attention_layernorm = FusionRMSNorm(spec.dim, spec.norm_eps, spec.norm_offset)
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
