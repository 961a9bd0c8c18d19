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

from ..errors import CheckpointError, UsageError
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


def find_layer_prefix(keys: Iterable[str], num_layers: int, *, shapes: Mapping[str, tuple[int, ...]] | None = None,
                      dim: int | None = None, vocab_size: int | None = None, chosen: str | None = None) -> str:
    """The prefix of the text decoder's layers: integer-numbered groups of tensors counting 0..``num_layers``-1.

    A multimodal checkpoint numbers other lists too (a vision or audio tower's layers, as deep as the
    decoder or not): the list is decided from the config's text part, never by the order lists are
    found in. Of the lists of the text layer count, those whose layers hold a tensor of the text width
    ``dim`` (when ``shapes`` are given), and of these the one nearest the token embedding (the
    language-model part of a wrapper: ``language_model.model.layers`` beside
    ``language_model.model.embed_tokens``, not ``vision_tower.encoder.layers``).

    Args:
        keys: the checkpoint's tensor names.
        num_layers: the text config's layer count.
        shapes: name -> shape of every tensor (for the width and the token embedding).
        dim: the text config's width.
        vocab_size: the text config's vocabulary size (for a factorised embedding).
        chosen: the prefix a user named (``layer_prefix``): taken when it is one of the lists the
            text part cannot tell apart (or the one it decides).

    Returns:
        str: the dotted prefix, without a trailing dot (``model.layers``).

    Raises:
        CheckpointError: no list fits, two still fit (the message names both and ``layer_prefix``),
            or the list is parallel lists of sub-layers (XLM).
        UsageError: ``chosen`` is not a list the text part allows.
    """
    keys = list(keys)
    groups = numbered_groups(keys)
    fits = [p for p, idx in groups.items() if set(idx) == set(range(num_layers))]
    if not fits:
        found = ", ".join(f"{p}.{{0..{max(idx)}}} ({len(idx)} groups)" for p, idx in
                          sorted(groups.items(), key=lambda item: -sum(item[1].values()))[:3]) or "none"
        raise CheckpointError(f"no numbered list of {num_layers} decoder layers (the config's layer count) under any "
                              f"prefix; numbered groups found: {found}")
    best, why = text_decoder_lists(fits, shapes, dim, vocab_size)
    if chosen is not None:
        chosen = chosen.strip().removesuffix(".")
        if chosen not in best:
            allowed = " or ".join(f"{p}" for p in best)
            what = "is not a numbered list of the text decoder's layers" if chosen not in fits else \
                f"is not the text decoder's layer list ({why})"
            raise UsageError(f"`layer_prefix` {chosen!r} {what}: {allowed} is")
        best = [chosen]
    if len(best) > 1 and len({p.rpartition(".")[0] for p in best}) > 1:
        raise CheckpointError(f"two numbered lists could be the text decoder's {num_layers} layers ({why}): "
                              f"{best[0]}.N and {best[1]}.N; name one with `layer_prefix`")
    return _not_sub_layers(best[0], fits)


def text_decoder_lists(fits: list[str], shapes: Mapping[str, tuple[int, ...]] | None, dim: int | None,
                       vocab_size: int | None) -> tuple[list[str], str]:
    """Of the numbered lists ``fits`` (each of the text layer count), those the config's text part
    cannot tell apart, best first, and what told them from the rest (for messages).

    The width first: lists with a tensor of the text width ``dim`` in their layer 0. Then the
    nearest to the token embedding: the deepest common ancestor, then the fewest steps below it.

    Args:
        fits: the prefixes of the numbered lists of the text layer count.
        shapes: name -> shape of every tensor (None: no evidence but the count).
        dim: the text width (None: likewise).
        vocab_size: the text vocabulary, for a factorised embedding.

    Returns:
        tuple[list[str], str]: the lists still fitting, sorted, and the evidence used (for messages).
    """
    said = ["the text layer count"]
    best = sorted(fits)
    if shapes is None or dim is None or len(best) == 1:
        return best, said[0]
    wide = [p for p in best if any(dim in shape for key, shape in shapes.items() if key.startswith(f"{p}.0."))]
    if wide and len(wide) < len(best):
        best, said = wide, said + [f"width {dim}"]
    if len(best) == 1:
        return best, ", ".join(said)
    try:
        embedding = find_embedding_key(shapes, tuple(fits), dim, vocab_size)
    except CheckpointError:
        return best, ", ".join(said)
    where = embedding.split(".")[:-2]  # the module holding the embedding module

    def nearness(prefix: str) -> tuple[int, int]:
        parts = prefix.split(".")
        common = 0
        while common < min(len(parts), len(where)) and parts[common] == where[common]:
            common += 1
        return common, -(len(parts) - common)

    top = max(nearness(p) for p in best)
    near = [p for p in best if nearness(p) == top]
    if len(near) < len(best):
        said.append(f"beside the token embedding {embedding}")
    return near, ", ".join(said)


def _not_sub_layers(chosen: str, fits: list[str]) -> str:
    """``chosen``, unless it is one of several sibling lists of the count (XLM's attention, FFN and
    norm lists: parts of layers, no layer module to wrap)."""
    parent = chosen.rpartition(".")[0]
    siblings = sorted(p for p in fits if p.rpartition(".")[0] == parent)
    if len(siblings) > 1:
        lists = ", ".join(f"{p}.{{i}}" for p in siblings[:2])
        raise CheckpointError(f"its layers are not modules but {len(siblings)} parallel numbered lists of sub-layers "
                              f"({lists} ...): no decoder layer to wrap")
    return chosen


def find_embedding_key(shapes: Mapping[str, tuple[int, ...]], layer_prefix: str | tuple[str, ...], dim: int,
                       vocab_size: int | None = None) -> str:
    """The token embedding: a 2-D ``[vocab, width]`` tensor outside the layers named like an embedding.

    One as wide as the decoder (``dim``) wins; else a factorised one (ELECTRA, RemBERT: narrower or
    wider, projected to the width by the base) with exactly ``vocab_size`` rows; a plainly named one
    (``PLAIN_EMBEDDING_NAMES``) only with ``vocab_size`` rows too.

    ``layer_prefix``: the layer list (or lists) whose tensors are not looked at.

    Raises:
        CheckpointError: none found (the message names the names looked for).
    """
    inside = tuple(f"{p}." for p in ((layer_prefix,) if isinstance(layer_prefix, str) else layer_prefix))
    candidates = []
    for key, shape in shapes.items():
        parts = key.split(".")
        if (len(parts) < 2 or parts[-1] != "weight" or key.startswith(inside)
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
                              f"{', '.join(p + 'N.' for p in inside)})")
    return min(candidates)[1]


def family_of_checkpoint(ckpt: Checkpoint, layer_prefix: str | None = None) -> Family:
    """The naming family of ``ckpt``: a native one (hf, torchtune) for the types the native modules
    implement (unquantized) or when there is no config, else the pass-through family of its discovered layout
    (recorded in the fusion section of a fused checkpoint, found from the tensors otherwise).

    Args:
        ckpt: the checkpoint.
        layer_prefix: the decoder's layer list as a user named it (``fuse``'s ``layer_prefix``), for
            a checkpoint whose config's text part cannot tell its lists apart.

    Raises:
        CheckpointError: an unreadable config or no decoder layout.
        UsageError: ``layer_prefix`` names no list the config's text part allows.
    """
    doc = ckpt.config
    model_type = doc.get("model_type") if isinstance(doc, dict) else None
    if model_type is not None and (not isinstance(model_type, str) or not model_type):
        raise CheckpointError(f"{ckpt.config_path or 'config.json'}: model_type is {model_type!r}, expected the name "
                              "of a model type (\"llama\", \"gemma3_text\", \"gpt2\" ...)")
    if doc is None or not isinstance(model_type, str) or (is_native(model_type) and not is_quantized(doc)):
        if doc is not None:
            keys = ckpt.keys()
            checkpoint_quantization(doc, keys, {k: ckpt.info(k).dtype for k in keys},  # quantized, no config: refused
                                    str(ckpt.config_path or "config.json"))
        family = _native_family(ckpt, doc is None)
        if layer_prefix is not None and layer_prefix.strip().removesuffix(".") + ".{i}." != family.layer_prefix:
            raise UsageError(f"`layer_prefix` {layer_prefix!r}: this checkpoint's layers are "
                             f"{family.layer_prefix.removesuffix('.{i}.')} ({family.name} names)")
        return family
    # a quantized base of a native type too: its layers are wrapped as they are, their forward is transformers'
    fusion = doc.get("fusion")
    if isinstance(fusion, dict) and isinstance(fusion.get("layer_prefix"), str) and fusion.get("layer_prefix") \
            and isinstance(fusion.get("embedding_key"), str) and fusion.get("embedding_key"):
        return generic_family(fusion["layer_prefix"], fusion["embedding_key"], model_type)
    found, embedding_key = discover_layout(ckpt, layer_prefix)
    return generic_family(found, embedding_key, model_type)


def _native_family(ckpt: Checkpoint, no_config: bool) -> Family:
    if not no_config:
        return detect_family(ckpt.keys())
    try:
        return detect_family(ckpt.keys())
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; without a config.json only Llama-recipe checkpoints are read: any other "
                              "decoder needs its config.json (beside the weights, or `config` PATH)") from None


def discover_layout(ckpt: Checkpoint, layer_prefix: str | None = None) -> tuple[str, str]:
    """(layer prefix, token embedding key) of ``ckpt``, found from its tensors and its config's text part.

    Args:
        ckpt: the checkpoint (fusion tensors of a fused one are left out).
        layer_prefix: the layer list a user named (see ``find_layer_prefix``'s ``chosen``).

    Raises:
        CheckpointError: the config lacks the text part's layer count or width, or no list (or two) fit.
        UsageError: ``layer_prefix`` names no list the config's text part allows.
    """
    where = str(ckpt.config_path or "config.json")
    fields = ConfigFields(ckpt.config or {}, where)
    num_layers = fields.int_of("num_layers", required=True)
    dim = fields.int_of("dim", required=True)
    assert num_layers is not None and dim is not None
    shapes = {k: ckpt.info(k).shape for k in ckpt.keys()
              if f".{FUSION_SEGMENT}." not in k and "fusion_embedding" not in k}
    vocab = fields.int_of("vocab_size")
    found = find_layer_prefix(shapes, num_layers, shapes=shapes, dim=dim, vocab_size=vocab, chosen=layer_prefix)
    return found, find_embedding_key(shapes, found, dim, vocab)


def text_decoder_problem(ckpt: Checkpoint, layer_prefix: str) -> str | None:
    """Why ``layer_prefix`` (a fusion section's) is not the text decoder's layer list of ``ckpt``, or None.

    The same decision as ``fuse``'s (``find_layer_prefix``), with the section's prefix as the chosen one.
    """
    try:
        discover_layout(ckpt, layer_prefix)
    except (CheckpointError, UsageError) as exc:
        return str(exc).replace("`layer_prefix` ", "layer_prefix ", 1)
    return None


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
