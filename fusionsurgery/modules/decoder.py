"""The decoder stack: embeddings, layers (plain or ``FusionLayer``), final norm, output projection."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from ..arch.families import Family
from .attention import CrossAttention
from .caches import CacheMethods, caches_are_enabled_of, caches_are_setup_of, reset_caches_of, setup_caches_of
from .masks import rows_for_positions


class TransformerDecoder(CacheMethods, nn.Module):
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

    # -- caches: each layer's own, in whichever torchtune spelling it speaks ---------------------
    def _setup_caches(self, batch_size: int, dtype: torch.dtype, lengths: dict[str, int]) -> None:
        for layer in self.layers:
            setup_caches_of(layer, batch_size, dtype, lengths)
        self._pos = 0

    def _reset_caches(self) -> None:
        for layer in self.layers:
            reset_caches_of(layer)
        self._pos = 0

    def _caches_are_setup(self) -> bool:
        return len(self.layers) > 0 and all(caches_are_setup_of(layer) for layer in self.layers)

    def _caches_are_enabled(self) -> bool:
        return len(self.layers) > 0 and all(caches_are_enabled_of(layer) for layer in self.layers)

    @property
    def encoder_dim(self) -> int | None:
        """The width of the encoder states its cross-attention reads (None without fusion layers)."""
        for m in self.modules():
            if isinstance(m, CrossAttention):
                return m.k_proj.in_features
        return None

    # -- forward ---------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, encoder_input: torch.Tensor | None = None,
                encoder_mask: torch.Tensor | None = None, input_pos: torch.Tensor | None = None, *,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[b, s, vocab]`` for ``tokens [b, s]``; text-only when ``encoder_input`` is None
        (and no cache holds one). torchtune's keywords: ``mask [b, s, s]`` (True: may attend;
        default causal), ``encoder_input [b, e, encoder_dim]``, ``encoder_mask [b, s, e]`` (or the
        whole sequence's ``[b, S, e]``, then sliced by ``input_pos``), ``input_pos [s]``.

        With caches set up, successive calls continue from the last position unless ``input_pos``
        says otherwise.
        """
        s = tokens.shape[1]
        try:
            caching = self.caches_are_enabled()
        except TypeError:  # a layer without cache methods: it cannot decode through a cache
            caching = False
        if input_pos is None:
            start = self._pos if caching else 0
            input_pos = torch.arange(start, start + s, device=tokens.device)
        if caching:
            self._pos = int(input_pos.max()) + 1
        encoder_mask = rows_for_positions(encoder_mask, input_pos, s)
        h = self.tok_embeddings(tokens)
        if self.embed_scale is not None:
            h = h * torch.tensor(self.embed_scale, dtype=h.dtype, device=h.device)
        kwargs: dict[str, Any] = {"input_pos": input_pos, "mask": mask, "encoder_input": encoder_input,
                                  "encoder_mask": encoder_mask}
        for layer in self.layers:
            h = layer(h, **kwargs)
        h = self.norm(h)
        if self.output is None:
            return h @ self.tok_embeddings.weight.t()
        return self.output(h)


def _to_family_hook(family: Family):
    """A state-dict post-hook renaming canonical keys to ``family``'s (picklable, like the module)."""
    return partial(_to_family, family)


def _to_family(family: Family, module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[prefix + family.to_family(key[len(prefix):])] = state_dict.pop(key)


def _from_family_hook(family: Family):
    """A load pre-hook renaming ``family``'s keys to the canonical ones."""
    return partial(_from_family, family)


def _from_family(family: Family, module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        local = key[len(prefix):]
        if family.knows(local):
            state_dict[prefix + family.to_canonical(local)] = state_dict.pop(key)
