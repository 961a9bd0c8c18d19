"""``from_pretrained``: a fused directory (or an adapter on its base) through transformers' own loader."""

from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .._requirements import type_floor_problem
from ..arch.config import INFERRED_MARK, family_of_checkpoint, read_fusion_config, read_model_config
from ..arch.discovery import fusion_section_for
from ..arch.families import PASSTHROUGH, typed_family
from ..arch.rope_layout import head_permutation, rotates
from ..errors import CheckpointError, UsageError
from ..io.checkpoint import CONFIG_NAME, INDEX_NAME, Checkpoint
from ..io.writer import write_index, write_json
from ..surgery.adapter import attach_base, is_adapter, made_on
from ..surgery.consistency import is_fusion_name
from .model import FusedCausalLMMixin, fused_class
from .quantization import check_fusion_float, quantization_kwargs


@dataclass(frozen=True)
class FusionSource:
    """Where a model's weights came from: the fused directory (an adapter: and its base), and whether
    symlinks leading outside them are followed (``save_pretrained`` reads the directory again).
    Held in memory only: nothing of it is written into a saved checkpoint."""

    path: Path
    base: Path | None = None
    follow_symlinks: bool = False


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


def model_class(ckpt: Checkpoint) -> type:
    """The fused transformers class for a fused checkpoint (``FusedQwen2ForCausalLM``, ``FusedGPT2LMHeadModel`` ...).

    Raises:
        UsageError: torchtune names of a native type, no fusion section, unknown RoPE settings, or a
            model type transformers has no causal-LM class for.
    """
    doc = ckpt.config
    if doc is None or ("tok_embeddings.weight" in ckpt.key_to_file and typed_family(str(doc.get("model_type")), "hf")
                       is None):
        raise UsageError(f"{ckpt.root} has torchtune tensor names; `fusionsurgery export {ckpt.root} --to hf` "
                         "gives the Hugging Face names (and RoPE layout) that transformers reads")
    if read_fusion_config(doc) is None:
        raise UsageError(f"{ckpt.root} is not a fused checkpoint (no 'fusion' section in config.json); "
                         "`fusionsurgery fuse` makes one")
    if INFERRED_MARK in doc and not any(k in doc for k in ("rope_theta", "rope_parameters", "rope_scaling")):
        raise UsageError(f"{ckpt.root}: RoPE settings are unknown (the config was inferred from tensor shapes); "
                         "fuse again with --config PATH or --rope-defaults NAME")
    return fused_class(base_class(doc, ckpt.root))


def base_class(doc: dict[str, Any], where: Any = "config.json") -> type:
    """transformers' causal-LM class for a config.json: by its ``model_type``, else its ``architectures``.

    Raises:
        UsageError: when the installed transformers has no such class, or is older than the release the
            type needs (``TRANSFORMERS_FOR_TYPE``).
    """
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = doc.get("model_type")
    problem = type_floor_problem(model_type) if isinstance(model_type, str) else None
    if problem is not None:
        raise UsageError(f"{where}: {problem}")
    names = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)] + list(doc.get("architectures") or [])
    for name in names:
        if isinstance(name, str) and hasattr(transformers, name):
            return getattr(transformers, name)
    raise UsageError(f"{where}: transformers {transformers.__version__} has no causal-LM class for model_type "
                     f"{model_type!r} (architectures {doc.get('architectures')}); a newer transformers may")


def from_pretrained(path: str | os.PathLike[str], base: str | os.PathLike[str] | None = None, *,
                    follow_symlinks: bool = False, **kwargs: Any) -> Any:
    """Open a fused checkpoint as the base's own transformers class with fusion blocks attached.

    Every keyword argument goes to transformers' ``from_pretrained`` (``dtype``, ``device_map``,
    ``attn_implementation``, ...). ``base`` is the base checkpoint of an adapter (``fuse
    --adapter-only``); it is refused unless its digests match the adapter's manifest.
    ``follow_symlinks`` follows symlinks leading outside the directories (``io.links``), here and
    when the model is saved.

    Args:
        path: a fused checkpoint directory (or an adapter, with ``base``).
        base: the adapter's base checkpoint.
        follow_symlinks: follow symlinks that lead outside the checkpoint directories.
        **kwargs: transformers' ``from_pretrained`` arguments.

    Returns:
        The base's own ``...ForCausalLM`` class (a subclass with ``.fusion``, the fusion settings),
        or ``(model, loading_info)`` with ``output_loading_info=True``. Its forward takes
        ``cross_attention_states [b, e, encoder_dim]`` and ``cross_attention_mask`` (``[b, e]`` or
        ``[b, s, e]``) besides the base's own arguments.

    Raises:
        UsageError: an adapter without its base; a torchtune-named, unfused or RoPE-less checkpoint;
            a model type transformers has no causal-LM class for.
        CheckpointError: an unreadable checkpoint, or a base that does not match the adapter.
    """
    ckpt = Checkpoint.open(path, follow_symlinks=follow_symlinks)
    manifest = ckpt.read_manifest()
    if base is None and is_adapter(manifest):
        raise UsageError(f"{path} holds only the fusion tensors (fuse --adapter-only): give its base (base=...)"
                         f"{made_on(manifest)}")
    base_ckpt = Checkpoint.open(base, follow_symlinks=follow_symlinks) if base is not None else None
    combined = attach_base(ckpt, base_ckpt)
    loaded = load_checkpoint(combined, [base_ckpt] if base_ckpt is not None else [], **kwargs)
    model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True: (model, info)
    model.fusion_source = FusionSource(Path(path).resolve(), Path(base).resolve() if base is not None else None,
                                       follow_symlinks)
    model.name_or_path = model.config._name_or_path = str(path)  # not the temporary directory it was read through
    return loaded


def load_checkpoint(ckpt: Checkpoint, extra: list[Checkpoint] | None = None, *, fused: bool = True,
                    **kwargs: Any) -> Any:
    """Load an opened fused checkpoint (an adapter already attached to its base, opened in ``extra``) with transformers' ``from_pretrained``; ``kwargs`` go to it.

    Args:
        ckpt (Checkpoint): the fused checkpoint.
        extra (list[Checkpoint] | None): checkpoints whose config and sidecar files come first (an adapter's base).
        fused (bool): the fused class (default), or the base's own class reading the original tensors
            alone (what ``verify`` compares against).

    Returns:
        The model, or ``(model, loading info)`` with ``output_loading_info=True``.
    """
    cls = model_class(ckpt)
    if not fused:
        cls = next(c for c in cls.__mro__[1:] if not issubclass(c, FusedCausalLMMixin))
    renamed = transformers_names(ckpt)
    if renamed is not None:
        if "key_mapping" in kwargs:
            raise UsageError(f"{ckpt.root} is in torchtune's names, which are mapped onto transformers' as it "
                             "loads: key_mapping cannot be given too")
        kwargs["key_mapping"] = renamed.key_mapping
    with _loadable_dir(ckpt, list(extra or []), originals_only=not fused,
                       config=renamed.config if renamed is not None else None) as directory:
        if fused:  # a quantization_config quantizes the base's linears only (hf/quantization.py)
            kwargs = quantization_kwargs(cls, directory, kwargs)
        loaded = cls.from_pretrained(str(directory), **kwargs)
    if fused and kwargs.get("quantization_config") is not None:
        check_fusion_float(loaded[0] if isinstance(loaded, tuple) else loaded)
    if renamed is not None and renamed.to_model:
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        with torch.no_grad():
            for name, order in renamed.to_model.items():
                param = model.get_parameter(name)
                param.copy_(permute_head_rows(param, order))
    return loaded


@contextmanager
def _loadable_dir(ckpt: Checkpoint, extra: list[Checkpoint], originals_only: bool = False,
                  config: dict[str, Any] | None = None) -> Iterator[Path]:
    """A temporary directory that transformers' loader reads as one sharded checkpoint: links to every
    shard under one index, and to the config and sidecar files (an adapter's base's first).

    A fused directory itself will not do: transformers prefers a ``model.safetensors`` to the index,
    and that file holds only the base's tensors. ``originals_only``: the index names the base's tensors alone.
    The link rule of each directory holds (``io.links``): a sidecar leading outside is refused, any other
    such file left out of the view. ``config``: the config.json to write instead of the checkpoint's.
    """
    with tempfile.TemporaryDirectory(prefix="fusion-view-") as tmp:
        view = Path(tmp)
        for source in [*extra, ckpt]:
            source.sidecar_files()  # refuses a sidecar that leads outside its directory
            for f in source.root.iterdir():
                if f.is_file() and f.suffix != ".safetensors" and f.name != INDEX_NAME \
                        and source.link_rule.allows(f):
                    _relink(f, view / f.name)
        if config is not None:
            (view / CONFIG_NAME).unlink(missing_ok=True)
            write_json(view / CONFIG_NAME, config)
        names = {name: f"shard-{i:05d}-of-{len(ckpt.files):05d}.safetensors" for i, name in enumerate(ckpt.files, 1)}
        for name, link in names.items():
            os.symlink(ckpt.path_of(name).resolve(), view / link)
        family = family_of_checkpoint(ckpt) if originals_only else None
        weight_map = {k: names[f] for k, f in ckpt.key_to_file.items()
                      if family is None or not is_fusion_name(family, k)}
        write_index(view / INDEX_NAME, weight_map, sum(ckpt.info(k).nbytes for k in weight_map))
        yield view


def _relink(target: Path, link: Path) -> None:
    if link.is_symlink():
        link.unlink()
    os.symlink(target.resolve(), link)


__all__ = ["FusionSource", "TransformersNames", "base_class", "from_pretrained", "load_checkpoint", "model_class",
           "permute_head_rows", "transformers_names"]
