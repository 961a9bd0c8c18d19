"""``from_pretrained``: a fused directory (or an adapter on its base) through transformers' own loader."""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterator

import torch

from .._requirements import type_floor_problem
from ..arch.config import INFERRED_MARK, family_of_checkpoint, read_fusion_config, read_model_config
from ..arch.families import typed_family
from ..arch.quantization import missing_library, read_quantization
from ..errors import CheckpointError, UsageError, listed
from ..io.checkpoint import CONFIG_NAME, INDEX_NAME, Checkpoint
from ..io.json_files import write_index, write_json
from ..surgery.adapter import attach_base, is_adapter, made_on
from ..surgery.consistency import is_fusion_name, require_consistent
from ..surgery.quantized import quantization_problems
from .model import FusedCausalLMMixin, fused_class
from .names import TransformersNames, permute_head_rows, transformers_names
from .quantization import check_fusion_float, quantization_kwargs


@dataclass(frozen=True)
class FusionSource:
    """Where a model's weights came from: the fused directory (an adapter: and its base), and whether
    symlinks leading outside them are followed (``save_pretrained`` reads the directory again).
    Held in memory only: nothing of it is written into a saved checkpoint."""

    path: Path
    base: Path | None = None
    follow_symlinks: bool = False


def require_quantization_library(doc: dict[str, Any] | None) -> None:
    """Refuse, in one line, a quantized checkpoint whose format needs a library that is not installed.

    Raises:
        UsageError: names the package(s) to install (``arch.quantization.missing_library``).
    """
    quant = read_quantization(doc)
    problem = missing_library(quant) if quant is not None else None
    if problem is not None:
        raise UsageError(problem)


def require_skipped_fusion(ckpt: Checkpoint) -> None:
    """Refuse a quantized fused checkpoint whose ``quantization_config`` would let the loader quantize the fusion
    blocks (on a GPU that runs the format they would become quantized layers without scales).

    Raises:
        CheckpointError: names the blocks and the list (``surgery.quantized.quantization_problems``).
    """
    if read_quantization(ckpt.config) is None:
        return
    fusion = read_fusion_config(ckpt.config)
    assert fusion is not None  # model_class refused a checkpoint without one
    block = fusion.block(read_model_config(ckpt))
    problems = quantization_problems(ckpt.config, block, block.layer_prefix, block.embedding_key)
    if problems:
        raise CheckpointError(f"{ckpt.root}: {problems[0]}")


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
    """transformers' causal-LM class for a config.json: the generative class its ``architectures`` names
    (the class it was saved from: a multimodal wrapper's ``*ForConditionalGeneration``, whose config
    holds the ``fusion`` section beside its ``text_config``), else its ``model_type``'s causal LM, else
    any class ``architectures`` names.

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
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    saved = list(doc.get("architectures") or [])
    generative = {*MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values(), *MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values()}
    names = [n for n in saved if n in generative] + [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)] + saved
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

    Example:
        >>> from fusionsurgery import hf
        >>> model = hf.from_pretrained("/tmp/tiny-fused", dtype=torch.float32)  # a FusedLlamaForCausalLM
        >>> out = model(torch.randint(0, 2048, (1, 8)), cross_attention_states=torch.randn(1, 4, 128))
        >>> out.logits.shape
        torch.Size([1, 8, 2048])
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

    Before transformers reads a byte, the checkpoint's headers are checked the way every reader of a
    fused checkpoint checks them (``surgery.consistency.require_consistent``: the fusion tensors the
    fusion section implies, the original tensors the manifest lists, their shapes and dtypes); after,
    transformers' own account of what it loaded must be empty (no key missing, unexpected or
    misshaped), so no parameter is left to transformers' random or uninitialised values.

    Returns:
        The model, or ``(model, loading info)`` with ``output_loading_info=True``.

    Raises:
        CheckpointError: a fusion or original tensor missing, unexpected or of another shape (named, one line).
    """
    cls = model_class(ckpt)
    if fused:
        require_skipped_fusion(ckpt)
    require_quantization_library(ckpt.config)
    require_consistent(ckpt, read_model_config(ckpt), read_fusion_config(ckpt.config), quantized=False)
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
        loaded = _load_strictly(cls, directory, ckpt.root, kwargs,
                                set() if fused else _fusion_keys(ckpt, renamed))
    if fused and kwargs.get("quantization_config") is not None:
        check_fusion_float(loaded[0] if isinstance(loaded, tuple) else loaded)
    if renamed is not None and renamed.to_model:
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        with torch.no_grad():
            for name, order in renamed.to_model.items():
                param = model.get_parameter(name)
                param.copy_(permute_head_rows(param, order))
    return loaded


def _fusion_keys(ckpt: Checkpoint, renamed: TransformersNames | None) -> set[str]:
    """The checkpoint's fusion tensors, by their names on disk and (torchtune-named) transformers' names:
    the base's own class reading a shard that holds them too finds them unexpected, as it should."""
    family = family_of_checkpoint(ckpt)
    keys = {k for k in ckpt.keys() if is_fusion_name(family, k)}
    return keys | {renamed.names[k] for k in keys} if renamed is not None else keys


def _load_strictly(cls: type, directory: Path, where: Path, kwargs: dict[str, Any],
                   not_loaded: Collection[str] = ()) -> Any:
    """``cls.from_pretrained(directory, **kwargs)``, refused in one line when transformers reports a key
    missing, unexpected (other than ``not_loaded``, the fusion tensors the base's own class leaves out)
    or of another shape.

    transformers' own report of such keys (a multi-line table, and for a misshaped one a RuntimeError
    advising ``ignore_mismatched_sizes``) is held back and replaced by the refusal; a report that
    names none of them is logged as transformers would.

    Raises:
        CheckpointError: naming the tensors (``listed``) and what is wrong with each group.
    """
    wants_info = bool(kwargs.pop("output_loading_info", False))
    kwargs["ignore_mismatched_sizes"] = True  # misshaped keys land in the loading info, refused below
    held = _HeldReport()
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(held)
    try:
        model, info = cls.from_pretrained(str(directory), output_loading_info=True, **kwargs)
    finally:
        logger.removeFilter(held)
    problems = loading_problems(dict(info, unexpected_keys=[k for k in info.get("unexpected_keys") or ()
                                                            if k not in not_loaded]))
    if problems:
        base = next(c for c in cls.__mro__ if not issubclass(c, FusedCausalLMMixin)).__name__
        raise CheckpointError(f"{where}: the tensors do not fill transformers' {base}: {'; '.join(problems)}")
    for record in held.records:
        logger.handle(record)
    return (model, info) if wants_info else model


def loading_problems(info: dict[str, Any]) -> list[str]:
    """What transformers' loading info (``output_loading_info=True``) says is wrong, one phrase per kind.

    Args:
        info: ``missing_keys``, ``unexpected_keys``, ``mismatched_keys`` (key, checkpoint shape, model
            shape) and ``error_msgs``, as transformers returns them.

    Returns:
        ``N missing: a, b (+M more)``-style phrases; empty when every tensor loaded into its parameter.
    """
    problems = []
    for name, words in (("missing_keys", "missing (transformers would leave them random)"),
                        ("unexpected_keys", "unexpected (the model has no such parameter)")):
        keys = sorted(info.get(name) or ())
        if keys:
            problems.append(f"{len(keys)} tensor(s) {words}: {listed(keys)}")
    shapes = sorted(info.get("mismatched_keys") or ())
    if shapes:
        shown = [f"{key} is {list(found)}, the model expects {list(wanted)}" for key, found, wanted in shapes]
        problems.append(f"{len(shown)} tensor(s) of another shape: {listed(shown)}")
    errors = [str(e).splitlines()[0] for e in info.get("error_msgs") or () if str(e).strip()]
    if errors:
        problems.append(f"transformers: {listed(errors, 1)}")
    return problems


class _HeldReport(logging.Filter):
    """Holds back transformers' multi-line load report (its ``LOAD REPORT`` record) while a load runs."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.records.append(record)
            return False
        return True


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


__all__ = ["FusionSource", "base_class", "from_pretrained", "load_checkpoint", "loading_problems", "model_class"]
