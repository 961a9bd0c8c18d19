"""torchtune's KV-cache protocol in both of its spellings, for our modules and for anyone's.

torchtune's first ``model_fusion`` release spoke of ``setup_cache``, ``reset_cache`` and a
``cache_enabled`` property; later releases of ``setup_caches``, ``reset_caches``,
``caches_are_setup()`` and ``caches_are_enabled()``. ``CacheMethods`` gives a module both spellings
on top of four hooks; the ``*_of`` functions ask *any* module, whichever spelling it implements.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_SETUP = ("setup_caches", "setup_cache")
_RESET = ("reset_caches", "reset_cache")
LENGTHS = ("encoder_max_seq_len", "decoder_max_seq_len")


def given_lengths(encoder_max_seq_len: int | None, decoder_max_seq_len: int | None) -> dict[str, int]:
    """The cache lengths the caller gave, as keyword arguments (a module that takes none gets none)."""
    pairs = zip(LENGTHS, (encoder_max_seq_len, decoder_max_seq_len))
    return {name: value for name, value in pairs if value is not None}


def required_length(lengths: dict[str, int], name: str, owner: nn.Module) -> int:
    if name not in lengths:
        raise ValueError(f"{type(owner).__name__}.setup_caches needs {name}= (the length of its KV cache)")
    return lengths[name]


def _method(module: nn.Module, names: tuple[str, ...]) -> Any:
    for name in names:
        fn = getattr(module, name, None)
        if callable(fn):
            return fn
    raise TypeError(f"{type(module).__name__} has no {' or '.join(names)} method "
                    "(cache calls are forwarded to the wrapped modules' own methods)")


def setup_caches_of(module: nn.Module, batch_size: int, dtype: torch.dtype, lengths: dict[str, int]) -> None:
    """``module.setup_caches(...)`` or ``module.setup_cache(...)``, passing only the lengths given."""
    _method(module, _SETUP)(batch_size, dtype, **lengths)


def reset_caches_of(module: nn.Module) -> None:
    """``module.reset_caches()`` or ``module.reset_cache()``."""
    _method(module, _RESET)()


def caches_are_enabled_of(module: nn.Module) -> bool:
    """``caches_are_enabled()``, else the ``cache_enabled`` property or attribute, else ``caches_are_setup()``."""
    fn = getattr(module, "caches_are_enabled", None)
    if callable(fn):
        return bool(fn())
    flag = getattr(module, "cache_enabled", None)
    if flag is not None:
        return bool(flag)
    fn = getattr(module, "caches_are_setup", None)
    if callable(fn):
        return bool(fn())
    raise TypeError(f"{type(module).__name__} has no caches_are_enabled, cache_enabled or caches_are_setup")


def caches_are_setup_of(module: nn.Module) -> bool:
    """``caches_are_setup()``; a seed-era module, which has none, answers through ``cache_enabled``."""
    fn = getattr(module, "caches_are_setup", None)
    if callable(fn):
        return bool(fn())
    return caches_are_enabled_of(module)


class CacheMethods:
    """Both spellings of the cache API over four hooks that a module defines.

    Hooks: ``_setup_caches(batch_size, dtype, lengths)`` (``lengths``: the ``*_max_seq_len``
    keyword arguments given), ``_reset_caches()``, ``_caches_are_setup()``, ``_caches_are_enabled()``.
    """

    def setup_caches(self, batch_size: int, dtype: torch.dtype, *, encoder_max_seq_len: int | None = None,
                     decoder_max_seq_len: int | None = None) -> None:
        """Allocate KV caches: self-attention ``decoder_max_seq_len`` long, cross-attention
        (holding encoder keys/values) ``encoder_max_seq_len`` long."""
        self._setup_caches(batch_size, dtype, given_lengths(encoder_max_seq_len, decoder_max_seq_len))

    setup_cache = setup_caches

    def reset_caches(self) -> None:
        """Empty the caches (they stay allocated) and rewind to position zero."""
        self._reset_caches()

    reset_cache = reset_caches

    def caches_are_setup(self) -> bool:
        """Whether ``setup_caches`` has allocated the caches."""
        return self._caches_are_setup()

    def caches_are_enabled(self) -> bool:
        """Whether forward passes read and update the caches."""
        return self._caches_are_enabled()

    @property
    def cache_enabled(self) -> bool:
        """The seed-era spelling of ``caches_are_enabled()``."""
        return self._caches_are_enabled()

    def _setup_caches(self, batch_size: int, dtype: torch.dtype, lengths: dict[str, int]) -> None:
        raise NotImplementedError

    def _reset_caches(self) -> None:
        raise NotImplementedError

    def _caches_are_setup(self) -> bool:
        raise NotImplementedError

    def _caches_are_enabled(self) -> bool:
        raise NotImplementedError


class AttentionCaches(CacheMethods):
    """The cache hooks of a layer whose one cached attention is ``self.attn``; ``_length`` names
    which ``*_max_seq_len`` sizes its cache."""

    _length = "decoder_max_seq_len"

    def _setup_caches(self, batch_size: int, dtype: torch.dtype, lengths: dict[str, int]) -> None:
        self.attn.setup_cache(batch_size, dtype, required_length(lengths, self._length, self))

    def _reset_caches(self) -> None:
        if self.attn.kv_cache is not None:
            self.attn.kv_cache.reset()

    def _caches_are_setup(self) -> bool:
        return self.attn.kv_cache is not None

    def _caches_are_enabled(self) -> bool:
        return self.attn.kv_cache is not None and bool(self.attn.cache_enabled)


def remove_caches(module: nn.Module) -> None:
    """Free every KV cache ``setup_caches`` allocated under ``module`` and turn caching off again
    (torchtune's ``delete_kv_caches``): forward passes then run on the whole sequence as before."""
    for m in module.modules():
        if hasattr(m, "kv_cache") and hasattr(m, "cache_enabled"):
            m.kv_cache, m.cache_enabled = None, False
        if isinstance(getattr(m, "_pos", None), int):
            m._pos = 0
