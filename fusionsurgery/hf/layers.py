"""Where a transformers model keeps its decoder layers: the list the ``fusion`` section's ``layer_prefix`` names.

Found by module path or by the name transformers saves the list under; where several lists have the
config's layer count (a vision tower as deep as the decoder), the named one must be the text decoder's,
decided as ``fuse`` decides it (``arch.discovery.find_layer_prefix``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..arch.discovery import find_layer_prefix
from ..errors import CheckpointError, FusionSurgeryError


def _layer_count(config: Any) -> int | None:
    """The decoder's layer count in the config's text part, or None."""
    return _int_field(_text_config_of(config), "num_hidden_layers", "n_layer", "num_layers")


def decoder_layer_path(model: nn.Module) -> str:
    """The dotted module path of a transformers model's decoder layer list (``model.layers``, ``transformer.h``).

    The list the ``fusion`` section's ``layer_prefix`` names: by its module path, or by the checkpoint
    name transformers saves it under (``language_model.model.layers`` for Gemma 3's
    ``model.language_model.layers``). Where several lists have the config's layer count (a vision tower
    as deep as the decoder), the named one must be the text decoder's, as ``fuse`` decides it
    (``arch.discovery.find_layer_prefix``): blocks are never attached elsewhere than the section says.
    Without a section, the shallowest list of the count.

    Raises:
        CheckpointError: the section names no list of the model, or one that is not the text decoder's.
        ValueError: when the model has no list of the config's layer count.
    """
    config = getattr(model, "config", None)
    prefix = (getattr(config, "fusion", None) or {}).get("layer_prefix") if config is not None else None
    count = _layer_count(config) if config is not None else None
    lists = sorted((name.count("."), name) for name, m in model.named_modules()
                   if isinstance(m, nn.ModuleList) and len(m) > 0 and (count is None or len(m) == count)
                   and not name.endswith("fusion_layer"))
    if prefix:
        try:
            if isinstance(model.get_submodule(prefix), nn.ModuleList):
                lists = sorted(set(lists) | {(prefix.count("."), prefix)})
        except AttributeError:
            pass
    names = [name for _, name in lists]
    if not names:
        raise ValueError(f"{type(model).__name__} has no list of {count} decoder layers"
                         + (f" at {prefix!r}" if prefix else ""))
    if not prefix:
        return names[0]  # the shallowest (a fused model always has a section)
    matches = [n for n in names if n == prefix] or [n for n in names if _saved_prefix(model, n) == prefix]
    if len(matches) != 1:
        raise CheckpointError(f"the fusion section's layer_prefix {prefix!r} is none of {type(model).__name__}'s "
                              f"lists of {count} layers ({', '.join(names)})")
    if len(names) > 1 and count:
        try:
            _text_decoder(model, names, count, matches[0])
        except FusionSurgeryError as exc:
            where = "" if matches[0] == prefix else f" ({matches[0]} in {type(model).__name__})"
            raise CheckpointError(f"the fusion section's layers, {prefix}{where}, are not the text decoder's: "
                                  f"{str(exc).replace('`layer_prefix` ', 'layer_prefix ', 1)}") from None
    return matches[0]


def _text_decoder(model: nn.Module, names: list[str], count: int, chosen: str | None) -> str:
    """The text decoder's list among ``names`` as ``fuse`` decides it from the config's text part;
    ``chosen`` (the section's) must be it, or one the text part cannot tell from it.

    Raises:
        CheckpointError, UsageError: as ``arch.discovery.find_layer_prefix``.
    """
    text = _text_config_of(model.config)
    dim = _int_field(text, "hidden_size", "n_embd", "d_model")
    vocab = _int_field(text, "vocab_size")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    table = getattr(embedding, "weight", None)
    keys = [n for n, p in model.named_parameters() if any(n.startswith(f"{name}.") for name in names) or
            (table is not None and p is table)]
    return find_layer_prefix(keys, count, shapes={k: shapes[k] for k in keys}, dim=dim, vocab_size=vocab, chosen=chosen)


def _saved_prefix(model: nn.Module, path: str) -> str | None:
    """The prefix transformers saves the layers of module list ``path`` under (its key conversions
    reverted: ``model.language_model.layers`` -> ``language_model.model.layers``), or None."""
    try:
        from transformers.core_model_loading import revert_weight_conversion

        name, param = next((f"{path}.{n}", p) for n, p in model.get_submodule(path)[0].named_parameters(prefix="0"))
        saved = next(iter(revert_weight_conversion(model, {name: param})))
    except Exception:  # noqa: BLE001 - no conversions (an older transformers) or none that apply
        return None
    head = saved.split(".0.", 1)[0] if ".0." in saved else None
    return head


def _text_config_of(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _int_field(config: Any, *names: str) -> int | None:
    for name in names:
        try:
            value = getattr(config, name, None)
        except Exception:  # noqa: BLE001 - a per-layer attribute transformers refuses to read globally
            value = None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def decoder_layer_list(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a transformers model (see ``decoder_layer_path``)."""
    return model.get_submodule(decoder_layer_path(model))


__all__ = ["decoder_layer_list", "decoder_layer_path"]
