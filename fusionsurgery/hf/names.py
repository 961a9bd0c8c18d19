"""How transformers reads a checkpoint kept in torchtune's names (a Gemma 2 ``export --to torchtune``).

Each key's transformers name, and the q/k rows that move per head between the two RoPE layouts; the
loader maps the names as the weights load and ``saving`` maps them back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ..arch.config import family_of_checkpoint, read_model_config
from ..arch.discovery import fusion_section_for
from ..arch.families import PASSTHROUGH, typed_family
from ..arch.rope_layout import head_permutation, rotates
from ..errors import CheckpointError
from ..io.checkpoint import Checkpoint


@dataclass(frozen=True)
class TransformersNames:
    """How transformers reads a checkpoint stored in torchtune's names of a type without native modules
    here (a Gemma 2 ``export --to torchtune``): each key's transformers name, and the q/k rows that move
    per head between the two RoPE layouts (exactly: rows are moved, no value changes)."""

    names: dict[str, str]  # checkpoint key -> transformers' key
    to_model: dict[str, tuple[int, ...]]  # transformers' key -> per-head row order, checkpoint -> model
    to_checkpoint: dict[str, tuple[int, ...]]  # transformers' key -> per-head row order, model -> checkpoint
    config: dict[str, Any]  # config.json with its fusion section in transformers' names

    @property
    def key_mapping(self) -> dict[str, str]:
        """transformers' ``from_pretrained(key_mapping=...)``: one anchored pattern per key."""
        return {f"^{re.escape(key)}$": name for key, name in self.names.items()}


def transformers_names(ckpt: Checkpoint) -> TransformersNames | None:
    """How transformers reads ``ckpt`` when its names are torchtune's (a type with torchtune rows,
    ``model_types.TORCHTUNE_NAMES``); None when they are transformers' own.

    Raises:
        CheckpointError: a tensor the type's rows do not name.
    """
    doc = ckpt.config
    model_type = doc.get("model_type") if doc is not None else None
    target = typed_family(model_type, "hf") if isinstance(model_type, str) else None
    if target is None:  # transformers' own names (a native type in torchtune's: model_class refuses it)
        return None
    family = family_of_checkpoint(ckpt)
    if family.transformers_names:
        return None
    names: dict[str, str] = {}
    rotating: list[str] = []
    for key in ckpt.keys():
        canonical = family.to_canonical(key)
        if canonical.startswith(PASSTHROUGH):
            raise CheckpointError(f"{ckpt.root}: tensor {key!r} has no name in transformers' {model_type} "
                                  f"(not one of the {model_type} tensors torchtune names)")
        names[key] = target.to_family(canonical)
        if rotates(canonical):
            rotating.append(names[key])
    to_model: dict[str, tuple[int, ...]] = {}
    to_checkpoint: dict[str, tuple[int, ...]] = {}
    if rotating and family.rope_layout != target.rope_layout:  # an adapter alone holds none
        head_dim = read_model_config(ckpt).head_dim
        forward = head_permutation(head_dim, family.rope_layout, target.rope_layout)
        back = head_permutation(head_dim, target.rope_layout, family.rope_layout)
        to_model, to_checkpoint = dict.fromkeys(rotating, forward), dict.fromkeys(rotating, back)
    return TransformersNames(names, to_model, to_checkpoint, fusion_section_for(doc, target))


def permute_head_rows(tensor: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """``tensor`` with the rows of every head (``len(order)`` rows each) in ``order``."""
    heads = tensor.shape[0] // len(order)
    index = torch.tensor([h * len(order) + r for h in range(heads) for r in order], device=tensor.device)
    return tensor.index_select(0, index)


__all__ = ["TransformersNames", "permute_head_rows", "transformers_names"]
