"""Deep fusion modules: ``FusionLayer``, ``FusionEmbedding``, fusion parameters (torchtune's contract).

Both keep the wrapped module's tensors under their *original* state-dict keys, so a base
checkpoint loads into the fused model with ``strict=False`` and the fused state dict minus the
fusion keys is the base state dict. Note that ``named_parameters()`` still shows the wrapper's
``layer.`` / ``embedding.`` segment: parameter names and state-dict keys differ by it.

Deep fusion as in Flamingo (Alayrac et al., 2022, https://arxiv.org/abs/2204.14198: gated
cross-attention blocks interleaved with a frozen language model's layers) and Llama 3.2 Vision
(the Llama 3 report, https://arxiv.org/abs/2407.21783: cross-attention layers after every
fourth self-attention layer of the text model); the module contract is torchtune's ``model_fusion``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from .caches import CacheMethods, caches_are_enabled_of, caches_are_setup_of, reset_caches_of, setup_caches_of

_WRAPPED = "layer."
_FUSION = "fusion_layer."


class FusionLayer(CacheMethods, nn.Module):
    """Runs ``fusion_layer`` before (``fusion_first``) or after an original decoder ``layer``.

    Wraps *any* pair of modules. Shapes: ``forward(x [b, s, dim], **kwargs) -> [b, s, dim]``; every
    keyword argument goes to both. State-dict keys: the original layer's keep their names (no
    ``layer.`` segment); the new ones live under ``fusion_layer.``. Cache calls, in either torchtune
    spelling, go to both wrapped modules' own methods in whichever spelling each implements;
    ``cache_enabled`` / ``caches_are_enabled()`` / ``caches_are_setup()`` are the original layer's.

    Args:
        layer: the original decoder layer.
        fusion_layer: the new layer (e.g. a ``GatedCrossAttentionLayer``).
        fusion_first: run ``fusion_layer`` before ``layer`` (Flamingo, Llama 3.2 Vision), else after.
    """

    def __init__(self, layer: nn.Module, fusion_layer: nn.Module, fusion_first: bool = True) -> None:
        super().__init__()
        self.layer, self.fusion_layer, self.fusion_first = layer, fusion_layer, fusion_first
        self.register_state_dict_post_hook(_strip_prefix_hook(_WRAPPED))
        self.register_load_state_dict_pre_hook(_add_prefix_hook(_WRAPPED, keep=_FUSION))

    # -- caches: forwarded to the wrapped modules ------------------------------------------
    def _setup_caches(self, batch_size: int, dtype: torch.dtype, lengths: dict[str, int]) -> None:
        for m in (self.layer, self.fusion_layer):
            setup_caches_of(m, batch_size, dtype, lengths)

    def _reset_caches(self) -> None:
        for m in (self.layer, self.fusion_layer):
            reset_caches_of(m)

    def _caches_are_setup(self) -> bool:
        return caches_are_setup_of(self.layer)

    def _caches_are_enabled(self) -> bool:
        return caches_are_enabled_of(self.layer)

    def fusion_params(self) -> list[str]:
        """Names (relative to this module) of the fusion layer's parameters."""
        return [f"{_FUSION}{name}" for name, _ in self.fusion_layer.named_parameters()]

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Both layers, in order.

        Args:
            x: hidden states ``[b, s, dim]``.
            **kwargs: given to both layers (``encoder_input``, ``encoder_mask``, ``mask``, ``input_pos`` ...).

        Returns:
            torch.Tensor: ``[b, s, dim]``.
        """
        if self.fusion_first:
            return self.layer(self.fusion_layer(x, **kwargs), **kwargs)
        return self.fusion_layer(self.layer(x, **kwargs), **kwargs)


class FusionEmbedding(nn.Module):
    """Token embedding with ``fusion_vocab_size`` extra learnable rows for ids ``>= vocab_size``.

    The original table keeps its key (``<prefix>.weight``); the new one is
    ``<prefix>.fusion_embedding.weight``. Shapes: ``tokens [b, s] -> [b, s, dim]``.

    Args:
        vocab_size: rows of the original table.
        fusion_vocab_size: extra learnable rows, for ids ``vocab_size .. vocab_size + fusion_vocab_size - 1``.
        embed_dim: the embedding width.
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


def register_fusion_module(module: nn.Module) -> nn.Module:
    """Mark every parameter of ``module`` (e.g. an encoder's projection head) as a fusion parameter.

    Args:
        module: any module; it gets a ``fusion_params()`` naming all its parameters.

    Returns:
        nn.Module: ``module`` itself.
    """
    module.fusion_params = _AllParameterNames(module)
    return module


class _AllParameterNames:
    """A picklable ``fusion_params`` for ``register_fusion_module``: every parameter of its module."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self) -> list[str]:
        return [name for name, _ in self.module.named_parameters()]


def get_fusion_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter that a module of ``model`` declares through ``fusion_params()``.

    Args:
        model: any module (``FusionLayer``, ``FusionEmbedding`` and ``register_fusion_module`` declare).

    Returns:
        dict[str, nn.Parameter]: ``{parameter name in model: parameter}``.

    Raises:
        ValueError: a ``fusion_params()`` names a parameter its module does not have.

    Example:
        >>> model = fs.load_fused("/tmp/tiny-fused")
        >>> sorted(fs.get_fusion_params(model))[0]
        'layers.3.fusion_layer.attn.k_norm.scale'
    """
    out: dict[str, nn.Parameter] = {}
    for prefix, module in model.named_modules():
        declared = getattr(module, "fusion_params", None)
        if not callable(declared):
            continue
        names = set(declared())
        params = dict(module.named_parameters())
        unknown = sorted(names - set(params))
        if unknown:
            raise ValueError(f"{prefix or type(module).__name__}: fusion_params() names no parameter {unknown[0]!r}")
        for name in names:
            out[f"{prefix}.{name}" if prefix else name] = params[name]
    return out


def set_trainable_params(model: nn.Module, names: set[str] | dict[str, Any]) -> None:
    """Freeze every parameter of ``model`` except those named.

    Args:
        model: any module.
        names: parameter names to keep trainable (e.g. ``get_fusion_params(model)``).
    """
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)


def _strip_prefix_hook(segment: str):
    """A state-dict post-hook removing the *leading* ``segment`` of this module's local keys
    (a partial of a module-level function, so the module still pickles)."""
    return partial(_strip_prefix, segment)


def _strip_prefix(segment: str, module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + segment)]:
        state_dict[prefix + key[len(prefix) + len(segment):]] = state_dict.pop(key)


def _add_prefix_hook(segment: str, keep: str):
    """A load pre-hook adding ``segment`` to this module's local keys, except those under ``keep``."""
    return partial(_add_prefix, segment, keep)


def _add_prefix(segment: str, keep: str, module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        local = key[len(prefix):]
        if not local.startswith(keep):
            state_dict[prefix + segment + local] = state_dict.pop(key)
