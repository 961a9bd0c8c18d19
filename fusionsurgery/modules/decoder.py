"""The decoder stack: embeddings, layers (plain or ``FusionLayer``), final norm, output projection."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..arch.families import Family


class TransformerDecoder(nn.Module):
    """A decoder-only transformer returning logits ``[b, s, vocab]`` for ``tokens [b, s]``.

    Args:
        tok_embeddings: ``nn.Embedding`` or ``FusionEmbedding``.
        layers: the decoder layers, any of which may be a ``FusionLayer``.
        norm: the final RMSNorm.
        output: the output projection, or None to tie it to the token embeddings.
        key_family: the naming family the state dict speaks; modules are named canonically
            (torchtune), and a state-dict hook renames keys to and from the family's names.
        embed_scale: multiplies the token embeddings (Gemma: sqrt of the width), rounded to their dtype.
    """

    def __init__(self, *, tok_embeddings: nn.Module, layers: list[nn.Module] | nn.ModuleList, norm: nn.Module,
                 output: nn.Linear | None, key_family: Family | None = None, embed_scale: float | None = None) -> None:
        super().__init__()
        self.tok_embeddings, self.layers, self.norm, self.output = tok_embeddings, nn.ModuleList(layers), norm, output
        self.embed_scale = embed_scale
        self._pos = 0
        self.key_family = key_family
        if key_family is not None and key_family.name != "torchtune":
            self.register_state_dict_post_hook(_to_family_hook(key_family))
            self.register_load_state_dict_pre_hook(_from_family_hook(key_family))

    # -- caches ------------------------------------------------------------------------
    def setup_cache(self, batch_size: int, dtype: torch.dtype, *, encoder_max_seq_len: int,
                    decoder_max_seq_len: int) -> None:
        """Allocate KV caches in every layer: self-attention ``decoder_max_seq_len`` long,
        cross-attention (fusion layers) ``encoder_max_seq_len`` long."""
        for layer in self.layers:
            layer.setup_cache(batch_size, dtype, encoder_max_seq_len=encoder_max_seq_len,
                              decoder_max_seq_len=decoder_max_seq_len)
        self._pos = 0

    setup_caches = setup_cache

    def reset_cache(self) -> None:
        """Empty every cache and rewind the decoding position."""
        for m in self.modules():
            cache = getattr(m, "kv_cache", None)
            if cache is not None and hasattr(cache, "reset"):
                cache.reset()
        self._pos = 0

    reset_caches = reset_cache

    def _attns(self) -> list[nn.Module]:
        return [m for m in self.modules() if hasattr(m, "kv_cache") and hasattr(m, "cache_enabled")]

    def caches_are_setup(self) -> bool:
        attns = self._attns()
        return bool(attns) and all(a.kv_cache is not None for a in attns)

    @property
    def cache_enabled(self) -> bool:
        return self.caches_are_setup() and all(a.cache_enabled for a in self._attns())

    def caches_are_enabled(self) -> bool:
        return self.cache_enabled

    # -- forward ---------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, encoder_input: torch.Tensor | None = None,
                encoder_mask: torch.Tensor | None = None, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for ``tokens``; text-only when ``encoder_input`` is None (and no cache holds one).

        With caches set up, successive calls continue from the last position unless ``input_pos``
        ``[s]`` says otherwise.
        """
        s = tokens.shape[1]
        caching = self.cache_enabled
        if input_pos is None:
            start = self._pos if caching else 0
            input_pos = torch.arange(start, start + s, device=tokens.device)
        if caching:
            self._pos = int(input_pos.max()) + 1
        h = self.tok_embeddings(tokens)
        if self.embed_scale is not None:
            h = h * torch.tensor(self.embed_scale, dtype=h.dtype, device=h.device)
        kwargs: dict[str, Any] = {"positions": input_pos, "encoder_input": encoder_input, "encoder_mask": encoder_mask}
        for layer in self.layers:
            h = layer(h, **kwargs)
        h = self.norm(h)
        if self.output is None:
            return h @ self.tok_embeddings.weight.t()
        return self.output(h)


def _to_family_hook(family: Family):
    def hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            state_dict[prefix + family.to_family(key[len(prefix):])] = state_dict.pop(key)

    return hook


def _from_family_hook(family: Family):
    def hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            local = key[len(prefix):]
            if family.knows(local):
                state_dict[prefix + family.to_canonical(local)] = state_dict.pop(key)

    return hook
