"""``save_pretrained`` of a fused transformers model: fusionsurgery's layout, the source's manifest.

The output has the files of the directory the model was loaded from, with the same names, keys,
dtypes and shapes: the base's shards (each tensor written from the model, so an untouched original
keeps its exact bytes), the ``fusion-*.safetensors`` shards, the index, ``config.json`` and the
sidecar files. ``fusion_manifest.json`` is the source's, digests unchanged: ``verify`` then finds
the originals bit-identical (when they were frozen) and reports the fusion tensors as trained. A
``history`` entry records the save and how many tensors changed. An ``import`` (or a graft of an
imported adapter) keeps its ``vision/`` parts: they are copied byte for byte, so ``export --to
mllama`` of the saved directory still rebuilds an ``MllamaForConditionalGeneration``.
"""

from __future__ import annotations

import copy
import datetime as _dt
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from ..io.checkpoint import CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, Checkpoint
from ..io.digest import algorithm_of
from ..io.identity import public_config, public_manifest
from ..io.torch_dtypes import TORCH_DTYPES, tensor_bytes
from ..io.atomic import AtomicDirectory
from ..io.json_files import write_index, write_json
from ..io.writer import SafetensorsWriter
from ..surgery.manifest import changed_since_fusion
from ..arch.mllama_layouts import ORIGIN_KEY, VISION_DIR, copy_vision, read_origin
from ..version import __version__
from .names import permute_head_rows, transformers_names
from .prequantized import with_source_quantization
from .quantization import with_original_placeholders
from .training import unwrap_peft

#: Segments PEFT adds to parameter names, and what they stand for in the checkpoint.
_PEFT_PREFIX = "base_model.model."


def checkpoint_tensors(model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None,
                       keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """``{checkpoint key: tensor}`` of a model, a PEFT model wrapping one, or a given state dict.

    LoRA keeps the base weight under ``.base_layer`` (unchanged: LoRA's own tensors are PEFT's to
    save); a ``modules_to_save`` copy stands for the module it copies. ``keys``: the checkpoint's keys;
    model names that are not among them are mapped back through transformers' key conversions.
    """
    inner = unwrap_peft(model)
    if state_dict is None:
        state_dict = inner.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.startswith(_PEFT_PREFIX):
            key = key[len(_PEFT_PREFIX):]
        if ".lora_" in key or ".original_module." in key:
            continue
        key = key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        out[key] = tensor
    if keys is None or set(out) <= keys:
        return out
    own = {k: t for k, t in out.items() if k in keys}
    # fusion tensors: the checkpoint's key with the same layer and name (the base's key conversions
    # would rename inside the fusion block too: Exaone's input_layernorm is ln_1 on disk)
    on_disk = {_fusion_part(k): k for k in keys if _fusion_part(k) is not None}
    rest = {}
    for key, tensor in out.items():
        if key in own:
            continue
        part = _fusion_part(key)
        if part is not None and part in on_disk:
            own[on_disk[part]] = tensor
        else:
            rest[key] = tensor
    return dict(own, **_checkpoint_names(inner, rest))


def _fusion_part(key: str) -> tuple[str | None, str] | None:
    """(layer index, name from the fusion segment on) of a fusion tensor's key; None for other keys."""
    for marker in (".fusion_layer.", ".fusion_embedding."):
        if marker in key:
            head, tail = key.split(marker, 1)
            return (head.rsplit(".", 1)[-1] if marker == ".fusion_layer." else None), marker + tail
    return None


def _checkpoint_names(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` under the names the checkpoint stores them by: transformers' load-time key
    conversions of the model's class reverted (GPT-NeoX's ``lm_head`` is ``embed_out`` on disk)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # older transformers: no key conversions
        return tensors
    return dict(revert_weight_conversion(model, tensors))


def save_fused(model: torch.nn.Module, out: str | os.PathLike[str], *,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (loaded with ``fusionsurgery.hf.from_pretrained``) as a fused directory at ``out``.

    ``out`` may exist (transformers' ``Trainer`` creates it first): the files written replace theirs
    and stale weight files are removed; other files stay.

    Args:
        model: the model, or a PEFT model wrapping it (its LoRA weights are PEFT's to save).
        out: the output directory.
        state_dict: the weights to write instead of ``model``'s (e.g. gathered from FSDP ranks).

    Returns:
        Path: ``out``, a fused directory: originals untouched keep their bytes, and the manifest's
        ``history`` says what changed since fusion.

    Raises:
        UsageError: a model not loaded with ``from_pretrained``, a source without a manifest, weights
            missing or of another shape than the source's, an ``out`` that is a file.
    """
    inner = unwrap_peft(model)
    source = getattr(inner, "fusion_source", None)
    if source is None:
        raise UsageError("this model was not loaded from a fused checkpoint (fusionsurgery.hf.from_pretrained): "
                         "there is no layout or manifest to save it in")
    src = Checkpoint.open(source.path, follow_symlinks=source.follow_symlinks)
    manifest = src.read_manifest()
    if manifest is None:
        raise UsageError(f"{source.path} has no {MANIFEST_NAME}: nothing to verify the saved checkpoint against")
    renamed = transformers_names(src)
    state_dict = with_original_placeholders(inner, state_dict)  # a quantized base: its weights from src (meta here)
    if renamed is None:
        tensors = checkpoint_tensors(model, state_dict, set(src.keys()))
    else:  # the source is in torchtune's names: each tensor back under its key, q/k rows in its RoPE layout
        by_name = checkpoint_tensors(model, state_dict, set(renamed.names.values()))
        tensors = {key: permute_head_rows(by_name[name], renamed.to_checkpoint[name])
                   if name in renamed.to_checkpoint else by_name[name]
                   for key, name in renamed.names.items() if name in by_name}
    tensors = with_source_quantization(src, tensors)  # a block-FP8 source loaded dequantized: its own bytes
    missing = [k for k in src.keys() if k not in tensors]
    if missing:
        raise UsageError(f"the model has no tensor for {len(missing)} checkpoint key(s), e.g. {missing[0]}")
    out_path = Path(out)
    algorithm = algorithm_of(manifest)
    with AtomicDirectory(_staging_target(out_path), force=False) as staging:
        digests: dict[str, str] = {}
        for name, header in src.files.items():
            digests.update(_write_file(staging.tmp / name, header, tensors, algorithm, src))
        if src.has_index:
            write_index(staging.tmp / INDEX_NAME, dict(src.key_to_file), sum(src.info(k).nbytes for k in src.keys()))
        write_json(staging.tmp / CONFIG_NAME, public_config(src.config) or {})
        doc = _with_history(manifest, digests)
        vision = copy_vision(read_origin(src, manifest), staging.tmp, algorithm)  # the import's vision parts, as they are
        if vision is not None:
            doc[ORIGIN_KEY] = dict(doc[ORIGIN_KEY], vision=vision)
        write_json(staging.tmp / MANIFEST_NAME, public_manifest(doc))
        for sidecar in src.sidecar_files():
            shutil.copyfile(sidecar, staging.tmp / sidecar.name)
        if out_path.exists():
            _move_into(staging.tmp, out_path)
        else:
            staging.commit()
    return out_path


def _staging_target(out: Path) -> Path:
    """Where to build the output: ``out`` itself when new, else a temporary name beside it."""
    if not out.exists():
        return out
    if not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    return out.parent / f".{out.name}.save-{uuid.uuid4().hex[:8]}"


def _write_file(path: Path, header: Any, tensors: dict[str, torch.Tensor], algorithm: str,
                src: Checkpoint) -> dict[str, str]:
    """One safetensors file with ``header``'s keys, dtypes, shapes and metadata, from ``tensors``; a meta
    tensor (a weight the model holds quantized) stands for ``src``'s bytes of that key."""
    entries = [(k, info.dtype, info.shape) for k, info in sorted(header.tensors.items(), key=lambda kv: kv[1].start)]
    digests: dict[str, str] = {}
    with SafetensorsWriter(path, entries, header.metadata or None, algorithm) as writer:
        for key, dtype, shape in entries:
            t = tensors[key]
            if hasattr(t, "full_tensor"):  # a DTensor (FSDP2): every rank must save together
                t = t.full_tensor()
            if tuple(t.shape) != tuple(shape):
                raise UsageError(f"{key}: the model's tensor is {list(t.shape)}, the checkpoint's {list(shape)}")
            if t.is_meta:
                digests[key] = writer.write(key, [src.read_bytes(key)])
            else:
                digests[key] = writer.write(key, [tensor_bytes(t.detach().to(TORCH_DTYPES[dtype]))])
    return digests


def _with_history(manifest: dict[str, Any], digests: dict[str, str]) -> dict[str, Any]:
    """The source manifest plus a ``history`` entry saying what this save changed (digests are kept)."""
    doc = copy.deepcopy(manifest)
    originals, fusion = changed_since_fusion(doc, digests)
    doc.setdefault("history", []).append({
        "event": "save_pretrained", "tool": {"name": "fusionsurgery.hf", "version": __version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "changed_fusion_tensors": len(fusion),
        "changed_original_tensors": sorted(originals),
    })
    return doc


def _move_into(tmp: Path, out: Path) -> None:
    """Replace ``out``'s weight files, index, vision parts, config and manifest with those in ``tmp``."""
    ours = {f.name for f in tmp.iterdir()}
    for stale in list(out.glob("*.safetensors")) + [out / INDEX_NAME]:
        if stale.name not in ours and stale.exists():
            stale.unlink()
    vision = out / VISION_DIR
    if vision.is_dir() and not vision.is_symlink():
        shutil.rmtree(vision)  # an earlier save's, replaced as a whole (or gone when tmp has none)
    for name in ours:
        os.replace(tmp / name, out / name)
