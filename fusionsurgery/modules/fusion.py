"""Deep fusion modules: ``FusionLayer`` and ``FusionEmbedding`` (torchtune's contract).

Both keep the wrapped module's tensors under their *original* state-dict keys, so a base
checkpoint loads into the fused model with ``strict=False`` and the fused state dict minus the
fusion keys is the base state dict. Note that ``named_parameters()`` still shows the wrapper's
``layer.`` / ``embedding.`` segment: parameter names and state-dict keys differ by it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_WRAPPED = "layer."
_FUSION = "fusion_layer."


class FusionLayer(nn.Module):
    """Runs ``fusion_layer`` before (``fusion_first``) or after an original decoder ``layer``.

    Shapes: ``forward(x [b, s, dim], **kwargs) -> [b, s, dim]``; every keyword argument goes to both.
    State-dict keys: the original layer's keep their names (no ``layer.`` segment); the new ones
    live under ``fusion_layer.``.
    """

    def __init__(self, layer: nn.Module, fusion_layer: nn.Module, fusion_first: bool = True) -> None:
        super().__init__()
        self.layer, self.fusion_layer, self.fusion_first = layer, fusion_layer, fusion_first
        self.register_state_dict_post_hook(_strip_prefix_hook(_WRAPPED))
        self.register_load_state_dict_pre_hook(_add_prefix_hook(_WRAPPED, keep=_FUSION))

    # -- caches (both the original names and later torchtune's) --------------------------
    def setup_cache(self, batch_size: int, dtype: torch.dtype, *, encoder_max_seq_len: int,
                    decoder_max_seq_len: int) -> None:
        """Set up the KV caches of both layers (the fusion layer's holds encoder keys/values)."""
        for m in (self.layer, self.fusion_layer):
            m.setup_cache(batch_size, dtype, encoder_max_seq_len=encoder_max_seq_len,
                          decoder_max_seq_len=decoder_max_seq_len)

    setup_caches = setup_cache

    def reset_cache(self) -> None:
        """Empty both layers' caches (they stay allocated)."""
        for cache in _caches(self):
            cache.reset()

    reset_caches = reset_cache

    def caches_are_setup(self) -> bool:
        return bool(_attns(self)) and all(a.kv_cache is not None for a in _attns(self))

    @property
    def cache_enabled(self) -> bool:
        return self.caches_are_setup() and all(a.cache_enabled for a in _attns(self))

    def caches_are_enabled(self) -> bool:
        return self.cache_enabled

    def fusion_params(self) -> list[str]:
        """Names (relative to this module) of the fusion layer's parameters."""
        return [f"{_FUSION}{name}" for name, _ in self.fusion_layer.named_parameters()]

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.fusion_first:
            return self.layer(self.fusion_layer(x, **kwargs), **kwargs)
        return self.fusion_layer(self.layer(x, **kwargs), **kwargs)


class FusionEmbedding(nn.Module):
    """Token embedding with ``fusion_vocab_size`` extra learnable rows for ids ``>= vocab_size``.

    The original table keeps its key (``<prefix>.weight``); the new one is
    ``<prefix>.fusion_embedding.weight``. Shapes: ``tokens [b, s] -> [b, s, dim]``.
    """

    def __init__(self, vocab_size: int, fusion_vocab_size: int, embed_dim: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.fusion_embedding = nn.Embedding(fusion_vocab_size, embed_dim)
        self.register_state_dict_post_hook(_strip_prefix_hook("embedding."))
        self.register_load_state_dict_pre_hook(_add_prefix_hook("embedding.", keep="fusion_embedding."))

    @property
    def weight(self) -> torch.Tensor:
        """The original table (what a tied output projection reads)."""
        return self.embedding.weight

    def fusion_params(self) -> list[str]:
        return ["fusion_embedding.weight"]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        extra = tokens >= self.vocab_size
        base = self.embedding(tokens.clamp(max=self.vocab_size - 1))
        fused = self.fusion_embedding((tokens - self.vocab_size).clamp(min=0, max=self.fusion_embedding.num_embeddings - 1))
        return torch.where(extra[..., None], fused, base)


def get_fusion_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{parameter name: parameter}`` for every parameter that fusion added to ``model``."""
    params = dict(model.named_parameters())
    out: dict[str, nn.Parameter] = {}
    for prefix, module in model.named_modules():
        if hasattr(module, "fusion_params"):
            for name in module.fusion_params():
                full = f"{prefix}.{name}" if prefix else name
                out[full] = params[full]
    return out


def set_trainable_params(model: nn.Module, names: set[str] | dict[str, Any]) -> None:
    """Freeze every parameter of ``model`` except those named (e.g. ``get_fusion_params(model)``)."""
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)


def _attns(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if hasattr(m, "kv_cache") and hasattr(m, "cache_enabled")]


def _caches(module: nn.Module) -> list[Any]:
    return [a.kv_cache for a in _attns(module) if a.kv_cache is not None]


def _strip_prefix_hook(segment: str):
    """A state-dict post-hook removing the *leading* ``segment`` of this module's local keys."""

    def hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for key in [k for k in state_dict if k.startswith(prefix + segment)]:
            state_dict[prefix + key[len(prefix) + len(segment):]] = state_dict.pop(key)

    return hook


def _add_prefix_hook(segment: str, keep: str):
    """A load pre-hook adding ``segment`` to this module's local keys, except those under ``keep``."""

    def hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            local = key[len(prefix):]
            if not local.startswith(keep):
                state_dict[prefix + segment + local] = state_dict.pop(key)

    return hook
