"""Finding a decoder's parts from its tensor names: the numbered layer list and the token embedding.

A decoder layer does not need to be understood to be wrapped: the layers are the integer-numbered
groups of tensors under one prefix (``model.layers.{i}.``, ``model.language_model.layers.{i}.``,
``gpt_neox.layers.{i}.``, ``transformer.h.{i}.`` ...) that count 0..N-1, N being the config's layer
count. Header-level only.
"""

from __future__ import annotations

import copy
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import CheckpointError
from ..io.checkpoint import Checkpoint
from .families import FUSION_SEGMENT, Family, detect_family, generic_family
from .fields import ConfigFields
from .model_types import is_native
from .quantization import checkpoint_quantization, is_quantized

_NUMBERED = re.compile(r"^(.+?)\.(\d+)\.")
#: Names a token embedding goes by (``<...>.<name>.weight``), most specific first.
EMBEDDING_NAMES = ("embed_tokens", "wte", "embed_in", "word_embeddings", "tok_embeddings", "tokens_embed", "embeddings",
                   "input_embedding", "embedding", "embed", "emb")
#: Names too plain to mean an embedding on their own (CTRL's ``transformer.w``): taken only when the
#: tensor has exactly the config's ``vocab_size`` rows and nothing better is there.
PLAIN_EMBEDDING_NAMES = ("w",)


def numbered_groups(keys: Iterable[str]) -> dict[str, dict[int, int]]:
    """prefix -> {index: tensor count} for every ``<prefix>.<int>.`` at the first integer of a key."""
    groups: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for key in keys:
        m = _NUMBERED.match(key)
        if m:
            groups[m.group(1)][int(m.group(2))] += 1
    return groups


def find_layer_prefix(keys: Iterable[str], num_layers: int) -> str:
    """The prefix under which integer-numbered groups of tensors count 0..``num_layers``-1.

    Raises:
        CheckpointError: no prefix (or, among equals, no single one with the most tensors) fits;
            the message names what was found.
    """
    groups = numbered_groups(keys)
    fits = [p for p, idx in groups.items() if set(idx) == set(range(num_layers))]
    if not fits:
        found = ", ".join(f"{p}.{{0..{max(idx)}}} ({len(idx)} groups)" for p, idx in
                          sorted(groups.items(), key=lambda item: -sum(item[1].values()))[:3]) or "none"
        raise CheckpointError(f"no numbered list of {num_layers} decoder layers (the config's layer count) under any "
                              f"prefix; numbered groups found: {found}")
    chosen = max(fits, key=lambda p: (sum(groups[p].values()), -len(p)))
    parent = chosen.rpartition(".")[0]
    siblings = sorted(p for p in fits if p.rpartition(".")[0] == parent)
    if len(siblings) > 1:
        lists = ", ".join(f"{p}.{{i}}" for p in siblings[:2])
        raise CheckpointError(f"its layers are not modules but {len(siblings)} parallel numbered lists of sub-layers "
                              f"({lists} ...): no decoder layer to wrap")
    return chosen


def find_embedding_key(shapes: Mapping[str, tuple[int, ...]], layer_prefix: str, dim: int,
                       vocab_size: int | None = None) -> str:
    """The token embedding: a 2-D ``[vocab, width]`` tensor outside the layers named like an embedding.

    One as wide as the decoder (``dim``) wins; else a factorised one (ELECTRA, RemBERT: narrower or
    wider, projected to the width by the base) with exactly ``vocab_size`` rows; a plainly named one
    (``PLAIN_EMBEDDING_NAMES``) only with ``vocab_size`` rows too.

    Raises:
        CheckpointError: none found (the message names the names looked for).
    """
    candidates = []
    for key, shape in shapes.items():
        parts = key.split(".")
        if (len(parts) < 2 or parts[-1] != "weight" or key.startswith(layer_prefix + ".")
                or f".{FUSION_SEGMENT}." in key or "fusion_embedding" in key or len(shape) != 2):
            continue
        vocab_rows = vocab_size is not None and shape[0] == vocab_size
        if parts[-2] in EMBEDDING_NAMES and (shape[1] == dim or vocab_rows):
            rank = (shape[1] != dim, EMBEDDING_NAMES.index(parts[-2]), not vocab_rows, len(key))
        elif parts[-2] in PLAIN_EMBEDDING_NAMES and vocab_rows:
            rank = (shape[1] != dim, len(EMBEDDING_NAMES), False, len(key))
        else:
            continue
        candidates.append((rank, key))
    if not candidates:
        names = ", ".join(f"*.{n}.weight" for n in EMBEDDING_NAMES[:4])
        raise CheckpointError(f"no token embedding of width {dim} found (looked for {names} ... outside "
                              f"{layer_prefix}.N.)")
    return min(candidates)[1]


def family_of_checkpoint(ckpt: Checkpoint) -> Family:
    """The naming family of ``ckpt``: a native one (hf, torchtune) for the types the native modules
    implement (unquantized) or when there is no config, else the pass-through family of its discovered layout
    (recorded in the fusion section of a fused checkpoint, found from the tensors otherwise)."""
    doc = ckpt.config
    model_type = doc.get("model_type") if isinstance(doc, dict) else None
    if model_type is not None and (not isinstance(model_type, str) or not model_type):
        raise CheckpointError(f"{ckpt.config_path or 'config.json'}: model_type is {model_type!r}, expected the name "
                              "of a model type (\"llama\", \"gemma3_text\", \"gpt2\" ...)")
    if doc is None:
        try:
            return detect_family(ckpt.keys())
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}; without a config.json only Llama-recipe checkpoints are read: any other "
                                  "decoder needs its config.json (beside the weights, or `config` PATH)") from None
    if not isinstance(model_type, str) or (is_native(model_type) and not is_quantized(doc)):
        keys = ckpt.keys()
        checkpoint_quantization(doc, keys, {k: ckpt.info(k).dtype for k in keys},  # quantized, no config: refused
                                str(ckpt.config_path or "config.json"))
        return detect_family(keys)
    # a quantized base of a native type too: its layers are wrapped as they are, their forward is transformers'
    fusion = doc.get("fusion")
    if isinstance(fusion, dict) and isinstance(fusion.get("layer_prefix"), str) and fusion.get("layer_prefix") \
            and isinstance(fusion.get("embedding_key"), str) and fusion.get("embedding_key"):
        return generic_family(fusion["layer_prefix"], fusion["embedding_key"], model_type)
    layer_prefix, embedding_key = discover_layout(ckpt)
    return generic_family(layer_prefix, embedding_key, model_type)


def discover_layout(ckpt: Checkpoint) -> tuple[str, str]:
    """(layer prefix, token embedding key) of ``ckpt``, found from its tensors and its config."""
    where = str(ckpt.config_path or "config.json")
    fields = ConfigFields(ckpt.config or {}, where)
    num_layers = fields.int_of("num_layers", required=True)
    dim = fields.int_of("dim", required=True)
    assert num_layers is not None and dim is not None
    layer_prefix = find_layer_prefix(ckpt.keys(), num_layers)
    shapes = {k: ckpt.info(k).shape for k in ckpt.keys()}
    return layer_prefix, find_embedding_key(shapes, layer_prefix, dim, fields.int_of("vocab_size"))


def fusion_section_for(doc: dict[str, Any], family: Family) -> dict[str, Any]:
    """``doc`` (a config.json or a fusion manifest) with its ``fusion`` section's layer prefix and
    embedding key, by which a decoder without native modules is found, in ``family``'s names; ``doc``
    itself when the section records none (a native type's).

    Args:
        doc: the document; not changed.
        family: the naming family the tensors are (or will be) in.

    Returns:
        dict: a copy with the two fields renamed, or ``doc``.
    """
    fusion = doc.get("fusion")
    if not isinstance(fusion, dict) or not fusion.get("layer_prefix"):
        return doc
    out = copy.deepcopy(doc)
    out["fusion"]["layer_prefix"] = family.layer_prefix.removesuffix(".{i}.")
    out["fusion"]["embedding_key"] = family.global_key("tok_embeddings.weight")
    return out
