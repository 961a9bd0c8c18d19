"""``FuseOptions``: what to fuse and how, the one list of ``fuse``'s options that the CLI shares."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from ..errors import UsageError
from ..io.digest import ALGORITHMS, DEFAULT_ALGORITHM
from .plan import INIT_CHOICES

#: ``dtype`` choices and the safetensors dtype each gives the new weights (None: the base's).
DTYPE_CHOICES = {"same": None, "bf16": "BF16", "fp16": "F16", "fp32": "F32"}


@dataclass(frozen=True)
class FuseOptions:
    """Every option of ``fuse`` but where the output goes; ``fusionsurgery fuse`` has a flag for each.

    Args:
        every: fuse layers ``i`` with ``(i + 1) % every == 0`` (torchtune's ``fusion_interval``).
        layers: explicit layers instead: indices and slices, ``"3,7,-1"``, ``"3:32:4"``, ``"0::4"``.
        fusion_after: run each fusion layer after its original layer (default: before).
        encoder_dim: width of the encoder states the cross-attention reads (default: the decoder width).
        fusion_vocab: extra learnable token embeddings for ids ``>= vocab_size``.
        init: ``normal``, ``xavier`` or ``copy`` (the wrapped layer's own weights).
        init_std: standard deviation for ``init="normal"``.
        seed: seed of the new weights (same seed, same bytes).
        dtype: ``same`` (the base's), ``bf16``, ``fp16`` or ``fp32``, for the new weights.
        config: a config.json to use instead of the one beside the base.
        num_heads: attention heads, when there is no config and shapes cannot tell.
        num_kv_heads: key/value heads, likewise.
        rope_defaults: RoPE settings to write when the base has no config (``"llama3"``).
        link: hard-link the base's shard files instead of copying them.
        adapter_only: write only the new tensors, the config and the manifest.
        digest: ``blake3`` or ``sha256``, for the manifest's digests.
        follow_symlinks: follow links in the base that lead outside it (``io.links``), as ``cp -L``.
        layer_prefix: the decoder's layer list (``model.language_model.layers``), for a multimodal base
            whose config's text part cannot tell it from another list (a tower as deep and as wide).
    """

    every: int | None = None
    layers: str | None = None
    fusion_after: bool = False
    encoder_dim: int | None = None
    fusion_vocab: int = 0
    init: str = "normal"
    init_std: float = 0.02
    seed: int = 0
    dtype: str = "same"
    config: str | os.PathLike[str] | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    rope_defaults: str | None = None
    link: bool = False
    adapter_only: bool = False
    digest: str = DEFAULT_ALGORITHM
    follow_symlinks: bool = False
    layer_prefix: str | None = None

    @classmethod
    def pick(cls, values: Mapping[str, Any]) -> "FuseOptions":
        """The options among ``values`` (e.g. a command's parameters, named like the fields).

        Args:
            values: a mapping holding every field's name.

        Returns:
            FuseOptions: the fields' values taken from ``values``.
        """
        return cls(**{f.name: values[f.name] for f in fields(cls)})

    def with_settings(self, settings: Mapping[str, Any]) -> "FuseOptions":
        """A copy with ``settings`` (field names) replaced.

        Raises:
            TypeError: a name that is not an option of ``fuse``.
        """
        return replace(self, **settings) if settings else self

    def check(self) -> None:
        """Refuse options that cannot be honoured, before anything is read.

        Raises:
            UsageError: the first bad option, named in the library's terms (`` `encoder_dim` ``).
        """
        if self.link and self.adapter_only:
            raise UsageError("`link` and `adapter_only` exclude each other")
        if self.digest not in ALGORITHMS:
            raise UsageError(f"`digest` must be one of {', '.join(ALGORITHMS)}, got {self.digest!r}")
        if self.encoder_dim is not None and self.encoder_dim <= 0:
            raise UsageError(f"`encoder_dim` must be positive, got {self.encoder_dim}")
        if self.fusion_vocab < 0:
            raise UsageError(f"`fusion_vocab` must be 0 or more, got {self.fusion_vocab}")
        if self.init not in INIT_CHOICES:
            raise UsageError(f"`init` must be one of {', '.join(INIT_CHOICES)}, got {self.init!r}")
        if not (0 < self.init_std and math.isfinite(self.init_std)):
            raise UsageError(f"`init_std` must be positive and finite, got {self.init_std}")
        if self.layer_prefix is not None and not self.layer_prefix.strip(" ."):
            raise UsageError("`layer_prefix` must name a list of layers (\"model.language_model.layers\"), "
                             "got an empty one")
        if self.dtype not in DTYPE_CHOICES:
            raise UsageError(f"`dtype` must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
