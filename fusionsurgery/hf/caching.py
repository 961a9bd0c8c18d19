"""The generation cache as a fused model meets it: where a decoder layer was handed it, and how long it is."""

from __future__ import annotations

from typing import Any

import torch


#: Keyword names under which transformers' decoder layers receive the generation cache.
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def find_cache(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The generation cache a decoder layer was given (by keyword, or positionally like GPT-2's), else None."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    from transformers.cache_utils import Cache

    return next((a for a in args[1:] if isinstance(a, Cache)), None)


def cached_length(cache: Any, inputs: dict[str, Any]) -> int:
    """Tokens a generation cache has seen; a cache of state-space layers alone (Mamba) keeps no length,
    so the position of the step's first token stands for it."""
    try:
        return int(cache.get_seq_length())
    except (ValueError, AttributeError, NotImplementedError):
        position = inputs.get("cache_position")
        return int(position.reshape(-1)[0]) if isinstance(position, torch.Tensor) and position.numel() else 0


__all__ = ["CACHE_KWARGS", "cached_length", "find_cache"]
