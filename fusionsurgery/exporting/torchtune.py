"""Exports that rename a checkpoint into another naming family: ``torchtune`` (and back to ``hf``).

Every tensor keeps its dtype, shape and bytes under its new name, except the self-attention q/k rows,
which are permuted per head when the RoPE layout of the two namings differs (``rope.py``). The
fusion layers' cross-attention has no RoPE and is never permuted. The output is still a fused
checkpoint of this tool (config.json with its ``fusion`` section, ``fusion_manifest.json`` in the
new names), so ``load_fused``, ``verify``, ``inspect`` and ``unfuse`` read it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ..arch.families import FAMILIES, Family
from ..errors import UsageError
from ..io.checkpoint import CONFIG_NAME, INDEX_NAME, MANIFEST_NAME
from ..io.identity import public_config, public_manifest
from ..io.writer import AtomicDirectory
from .common import (EXPORT_MANIFEST_NAME, ExportResult, Source, copy_sidecars, export_manifest, listed_files,
                     source_name, tensor_entries, write_json, write_source_tensors)
from ..arch.mllama_layouts import ORIGIN_KEY, VISION_DIR, copy_vision, read_origin
from .rope import describe, head_permutation, rotates
from .tensors import OutTensor, Progress, index_doc, same

#: Architectures whose torchtune builders use torchtune's interleaved RoPE with the standard q/k
#: permutation (torchtune's Qwen and Phi-3 builders rotate halves and would not compute the same).
TORCHTUNE_MODEL_TYPES = ("llama", "mistral")


def plan_renamed(src: Source, target: Family) -> tuple[list[OutTensor], dict[str, str]]:
    """Every tensor of ``src`` under ``target``'s names; returns (tensors, old key -> new key)."""
    family = src.cfg.family_obj
    perm = head_permutation(src.cfg.head_dim, family.rope_layout, target.rope_layout)
    moved = perm != tuple(range(src.cfg.head_dim))
    out: list[OutTensor] = []
    rename: dict[str, str] = {}
    for _, info in src.ckpt.tensors():
        canonical = family.to_canonical(info.name)
        key = target.to_family(canonical)
        rename[info.name] = key
        if moved and rotates(canonical):
            heads = info.shape[0] // src.cfg.head_dim
            out.append(same(src.ckpt, info.name, key, head_perm=perm,
                            transform=describe(family.rope_layout, target.rope_layout, heads, src.cfg.head_dim)))
        else:
            out.append(same(src.ckpt, info.name, key))
    return out, rename


def translate_fusion_manifest(doc: dict[str, Any], rename: dict[str, str], files: dict[str, str],
                              digests: dict[str, str], src: Source, target: Family) -> dict[str, Any] | None:
    """The source's ``fusion_manifest.json`` in the new names, with the digests of the bytes written."""
    doc = copy.deepcopy(doc)
    entries = list(doc.get("new_tensors", [])) + list(doc.get("original_tensors", []))
    if not entries or any(e.get("name") not in rename for e in entries):
        return None
    for entry in entries:
        entry["name"] = rename[entry["name"]]
        entry["file"] = files[entry["name"]]
        entry["digest"] = digests[entry["name"]]
    for entry in doc.get("new_tensors", []):
        if isinstance(entry.get("init"), str) and entry["init"].startswith("copy("):
            entry["init"] += f" (source named in the {src.cfg.family} family)"
    doc.pop("layout", None)  # an export holds every tensor, whatever the source's layout
    doc["export"] = {
        "from": source_name(src), "from_family": src.cfg.family, "to_family": target.name,
        "note": f"names and digests describe this export (see {EXPORT_MANIFEST_NAME}); "
                "'base' describes the checkpoint that was fused",
    }
    return doc


def export_family(src: Source, out: Path, target_name: str, *, force: bool = False,
                  progress: Progress | None = None) -> ExportResult:
    """Write ``src`` renamed into the ``target_name`` family (``torchtune`` or ``hf``) at ``out``."""
    target = FAMILIES[target_name]
    cfg = src.cfg
    if not cfg.native:
        raise UsageError(
            f"--to {target_name} renames a native family's tensors; this {cfg.model_type} checkpoint is "
            + ("already in transformers' own names (fusionsurgery.hf loads it as it is)" if target_name == "hf" else
               f"of a type torchtune has no builders for (supported: {', '.join(TORCHTUNE_MODEL_TYPES)})"))
    if target_name == "torchtune" and cfg.model_type not in TORCHTUNE_MODEL_TYPES:
        raise UsageError(
            f"`to` torchtune supports {', '.join(TORCHTUNE_MODEL_TYPES)} checkpoints (torchtune's Llama builders, "
            f"interleaved RoPE); this one is {cfg.model_type}, whose torchtune builders name and rotate "
            "differently"
        )
    notes: list[str] = []
    if cfg.family == target.name:
        notes.append(f"the source already uses {target.name} names: tensors are copied unchanged")
    if cfg.rope_theta is None:
        notes.append("RoPE theta and scaling are unknown (no config): readers need --config or --rope-defaults")
    tensors, rename = plan_renamed(src, target)
    if any(t.transform for t in tensors):
        notes.append(f"self-attention q/k rows permuted per head for {target.rope_layout} RoPE "
                     f"({cfg.family_obj.rope_layout} before); every other tensor keeps its bytes")
    if target.name == "torchtune" and cfg.tie_embeddings:
        notes.append("tied embeddings stay tied (no output.weight): build the torchtune decoder with a tied output")
    result = ExportResult(out, target_name, cfg.family, notes=notes)
    with AtomicDirectory(out, force=force) as staging:
        tmp = staging.tmp
        files, digests = write_source_tensors(src, tensors, tmp, notes, progress)
        if len(set(files.values())) > 1:
            write_json(tmp / INDEX_NAME, index_doc(files, tensors))
        if src.ckpt.config is not None:
            write_json(tmp / CONFIG_NAME, public_config(src.ckpt.config))
        copy_sidecars(src.ckpt, tmp)
        source_manifest = src.manifest
        if source_manifest is not None:
            translated = translate_fusion_manifest(source_manifest, rename, files, digests, src, target)
            if translated is not None:
                vision = copy_vision(read_origin(src.ckpt, src.manifest), tmp, src.digest)
                if vision is not None:
                    translated[ORIGIN_KEY]["vision"] = vision
                    notes.append(f"the imported vision tower and projector are carried in {VISION_DIR}/ under their "
                                 "Hugging Face names (export --to mllama puts them back)")
                write_json(tmp / MANIFEST_NAME, public_manifest(translated))
            else:
                notes.append(f"the source's {MANIFEST_NAME} does not match its tensors; not carried over")
        entries = tensor_entries(tensors, files, digests)
        write_json(tmp / EXPORT_MANIFEST_NAME, export_manifest(src, target_name, entries, notes))
        result.tensors = entries
        result.files = listed_files(tmp)
        staging.commit()
    return result
