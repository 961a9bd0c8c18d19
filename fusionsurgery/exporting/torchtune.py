"""Exports that rename a checkpoint into another naming family: ``torchtune`` (and back to ``hf``).

Every tensor keeps its dtype, shape and bytes under its new name, except two documented moves of
bytes: the self-attention q/k rows are permuted per head where the RoPE layouts of the two namings
differ for the type (``arch/rope_layout.py``; Llama, Mistral, Gemma, Gemma 2), and a fused projection is split into the
parts torchtune names (Phi-3's ``qkv_proj`` and ``gate_up_proj``), or joined again going back. The
fusion layers' cross-attention has no RoPE and is never permuted. The output is still a fused
checkpoint of this tool (config.json with its ``fusion`` section, ``fusion_manifest.json`` in the
new names), so ``load_fused``, ``verify``, ``inspect`` and ``unfuse`` read it.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, NamedTuple

from ..arch.quantization import read_quantization
from ..arch.config import ModelConfig
from ..arch.discovery import fusion_section_for
from ..arch.families import FAMILIES, FUSION_SEGMENT, PASSTHROUGH, Family, typed_family
from ..arch.model_types import TORCHTUNE_NAMES, fused_projections, rope_layout_of
from ..errors import CheckpointError, UsageError, listed
from ..io.checkpoint import CONFIG_NAME, INDEX_NAME, MANIFEST_NAME
from ..io.identity import public_config, public_manifest
from ..io.atomic import AtomicDirectory
from .common import (EXPORT_MANIFEST_NAME, ExportResult, Source, copy_sidecars, export_manifest, listed_files,
                     source_name, tensor_entries, write_json, write_source_tensors)
from ..arch.mllama_layouts import ORIGIN_KEY, VISION_DIR, copy_vision, read_origin
from ..arch.rope_layout import describe, head_permutation, rotates
from .tensors import OutTensor, Part, Progress, index_doc, same

#: Native types torchtune has builders for, and how its names differ from Hugging Face's for each
#: (checked against torchtune's ``models/*/_convert_weights.py`` and component builders): Llama,
#: Mistral and Gemma rotate interleaved pairs (q/k rows permuted per head); Qwen2, Qwen3 and Phi-3
#: rotate halves (rows kept); Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` are split into q/k/v and
#: w1/w3. ``ModelType.torchtune_rope`` and ``model_types.fused_projections`` hold those facts.
TORCHTUNE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")
#: Every type ``--to torchtune`` covers: the native ones above, and the types torchtune builds whose
#: forward here is transformers' (renamed by their rows in ``model_types.TORCHTUNE_NAMES``: Gemma 2).
TORCHTUNE_EXPORT_TYPES = TORCHTUNE_MODEL_TYPES + tuple(TORCHTUNE_NAMES)

_LAYER = re.compile(r"layers\.(?P<i>\d+)\.(?P<suffix>.+)")


def _layer_suffix(canonical: str) -> tuple[int, str] | None:
    """(layer, suffix) of a decoder layer's own canonical tensor (not a fusion layer's), else None."""
    m = _LAYER.fullmatch(canonical)
    if not m or m.group("suffix").startswith(FUSION_SEGMENT + "."):
        return None
    return int(m.group("i")), m.group("suffix")


def _fused_groups(cfg: ModelConfig, fused_qkv: bool, fused_gate_up: bool) -> dict[str, list[tuple[str, int]]]:
    """Canonical suffix of each fused projection the target spells as one tensor -> its parts' suffixes
    and row counts, in the order of their rows (q, k, v; gate, up)."""
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.kv_dim, cfg.intermediate_dim
    groups: dict[str, list[tuple[str, int]]] = {}
    for kind in ("weight", "bias"):
        groups[f"attn.qkv_proj.{kind}"] = [(f"attn.{p}.{kind}", n) for p, n in (("q_proj", q), ("k_proj", kv),
                                                                                   ("v_proj", kv))]
    groups["mlp.w13.weight"] = [("mlp.w1.weight", inter), ("mlp.w3.weight", inter)]
    return {k: v for k, v in groups.items() if (fused_qkv if k.startswith("attn.") else fused_gate_up)}


class RenamePlan(NamedTuple):
    """What ``plan_renamed`` writes: the tensors, each source key's new key(s), the target's RoPE layout."""

    tensors: list[OutTensor]
    rename: dict[str, list[str]]
    rope_layout: str  # the layout the target's q/k rows follow

    @property
    def permuted(self) -> bool:
        """Some q/k rows move per head."""
        return any(p.head_perm for t in self.tensors for p in t.parts)

    @property
    def split(self) -> bool:
        """A fused projection is written as its parts (row ranges of one source)."""
        return any(p.rows is not None for t in self.tensors for p in t.parts)

    @property
    def joined(self) -> bool:
        """Parts are written as one fused projection."""
        return any(len(t.parts) > 1 for t in self.tensors)


def plan_renamed(src: Source, target: Family) -> RenamePlan:
    """Every tensor of ``src`` under ``target``'s names, with each source key's new key(s).

    Rows of the self-attention q/k move per head where the two namings' RoPE layouts differ for this
    type; a fused projection is split where the target names its parts (Phi-3 into torchtune's names)
    and joined where the target fuses them (back to Hugging Face's names). Bytes are moved, never changed.
    """
    cfg, ckpt = src.cfg, src.ckpt
    family = cfg.family_obj
    dst_layout = rope_layout_of(target.name, target.rope_layout, cfg.model_type)
    perm = head_permutation(cfg.head_dim, cfg.rope_layout, dst_layout)
    moved = perm != tuple(range(cfg.head_dim))
    # what the source fuses and the target does not is split; what the target fuses and the source does not, joined
    split = _fused_groups(cfg, cfg.fused_qkv, cfg.fused_gate_up)
    join = _fused_groups(cfg, *fused_projections(target.name, cfg.model_type))
    split, join = {k: v for k, v in split.items() if k not in join}, {k: v for k, v in join.items() if k not in split}
    part_of = {part: fused for fused, parts in join.items() for part, _ in parts}
    key_of = {family.to_canonical(name): name for name in ckpt.keys()}

    def perm_for(canonical: str) -> tuple[int, ...] | None:
        return perm if moved and rotates(canonical) else None

    def how_moved(name: str) -> str:
        return describe(cfg.rope_layout, dst_layout, ckpt.info(name).shape[0] // cfg.head_dim, cfg.head_dim)

    out: list[OutTensor] = []
    rename: dict[str, list[str]] = {}
    for _, info in ckpt.tensors():
        canonical = family.to_canonical(info.name)
        if canonical.startswith(PASSTHROUGH):
            raise CheckpointError(f"{ckpt.root}: tensor {info.name!r} is not one {target.description} has a name "
                                  f"for (a {cfg.model_type} checkpoint holds only the tensors its rows name)")
        i, suffix = _layer_suffix(canonical) or (-1, "")
        if suffix in split:  # one source tensor -> its parts, row ranges
            first, rename[info.name] = 0, []
            for part, rows in split[suffix]:
                key, p = target.to_family(f"layers.{i}.{part}"), perm_for(f"layers.{i}.{part}")
                how = (f"rows {first}:{first + rows} of {info.name} (split as {target.name} names it)"
                       + (f"; {how_moved(info.name)}" if p else ""))
                out.append(OutTensor(key, info.dtype, (rows, *info.shape[1:]), [Part(info.name, first, rows, head_perm=p)],
                                     how, [info.name]))
                rename[info.name].append(key)
                first += rows
        elif suffix in part_of:  # the parts -> one tensor, written where its first part is met
            fused = part_of[suffix]
            key = target.to_family(f"layers.{i}.{fused}")
            rename[info.name] = [key]
            parts = [f"layers.{i}.{part}" for part, _ in join[fused]]
            if canonical != parts[0]:
                continue
            names = [key_of[c] for c in parts]
            rows = sum(ckpt.info(n).shape[0] for n in names)
            how = (f"concatenated: rows of {', '.join(names)} (joined as {target.name} names it)"
                   + (f"; q/k {how_moved(names[0])}" if any(perm_for(c) for c in parts) else ""))
            out.append(OutTensor(key, info.dtype, (rows, *info.shape[1:]),
                                 [Part(n, head_perm=perm_for(c)) for n, c in zip(names, parts)], how, names))
        else:
            key = target.to_family(canonical)
            rename[info.name] = [key]
            p = perm_for(canonical)
            out.append(same(ckpt, info.name, key, head_perm=p, transform=how_moved(info.name) if p else None))
    return RenamePlan(out, rename, dst_layout)


def translate_fusion_manifest(doc: dict[str, Any], rename: dict[str, list[str]], out: dict[str, OutTensor],
                              files: dict[str, str], digests: dict[str, str], src: Source,
                              target: Family, target_name: str | None = None) -> dict[str, Any] | None:
    """The source's ``fusion_manifest.json`` in the new names, with the digests of the bytes written.

    A tensor split by the export becomes one entry per part; tensors joined become one entry (at the
    place of the first). ``base.num_tensors`` then counts the entries, so the manifest stays consistent.
    """
    doc = copy.deepcopy(doc)
    entries = list(doc.get("new_tensors", [])) + list(doc.get("original_tensors", []))
    if not entries or any(e.get("name") not in rename for e in entries):
        return None
    for section in ("new_tensors", "original_tensors"):
        translated: list[dict[str, Any]] = []
        seen: set[str] = set()
        for entry in doc.get(section, []):
            for key in rename[entry["name"]]:
                if key in seen:
                    continue
                seen.add(key)
                new = dict(entry, name=key, file=files[key], digest=digests[key])
                if list(out[key].shape) != list(entry.get("shape", out[key].shape)):
                    new["shape"] = list(out[key].shape)
                    if "numel" in new:
                        new["numel"] = math.prod(out[key].shape)
                translated.append(new)
        if section in doc:
            doc[section] = translated
    for entry in doc.get("new_tensors", []):
        if isinstance(entry.get("init"), str) and entry["init"].startswith("copy("):
            entry["init"] += f" (source named in the {src.cfg.family} family)"
    doc.pop("layout", None)  # an export holds every tensor, whatever the source's layout
    base = doc.get("base")
    if isinstance(base, dict) and "num_tensors" in base:
        base["num_tensors"] = len(doc.get("original_tensors", []))
    doc["export"] = {
        "from": source_name(src), "from_family": src.cfg.family, "to_family": target_name or target.name,
        "note": f"names and digests describe this export (see {EXPORT_MANIFEST_NAME}); "
                "'base' describes the checkpoint that was fused (its tensor count: this export's)",
    }
    return doc


def export_family(src: Source, out: Path, target_name: str, *, force: bool = False,
                  progress: Progress | None = None) -> ExportResult:
    """Write ``src`` renamed into the ``target_name`` family (``torchtune`` or ``hf``) at ``out``.

    Args:
        src: the opened source (``common.open_source``): a native type, or a type with torchtune rows
            (``model_types.TORCHTUNE_NAMES``: Gemma 2) in transformers' or torchtune's names.
        out: the output directory (replaced only once complete, with ``force``).
        target_name: ``torchtune`` or ``hf``.
        force: replace an existing output.
        progress: told how many bytes were written.

    Returns:
        ExportResult: every tensor with its sources, digest and transform; notes; files.

    Raises:
        UsageError: a type this export does not cover (``target_family``), or ``hf`` for a checkpoint
            already in transformers' names.
        CheckpointError: a Gemma 2 (a type with torchtune rows) missing a tensor, or holding one the rows
            do not name.
    """
    cfg = src.cfg
    quant = read_quantization(src.ckpt.config) if target_name == "torchtune" else None
    if quant is not None:
        raise UsageError(f"`to` torchtune: this checkpoint is quantized ({quant.method}) and torchtune's builders "
                         "read float weights; fusionsurgery.hf loads it as it is")
    target = target_family(cfg, target_name)
    if not cfg.native:
        require_rows(src)
    notes: list[str] = []
    if cfg.family_obj == target:
        notes.append(f"the source already uses {target_name} names: tensors are copied unchanged")
    if cfg.rope_theta is None:
        notes.append("RoPE theta and scaling are unknown (no config): readers need --config or --rope-defaults")
    plan = plan_renamed(src, target)
    tensors, rename = plan.tensors, plan.rename
    if plan.permuted:
        notes.append(f"self-attention q/k rows permuted per head for {plan.rope_layout} RoPE "
                     f"({cfg.rope_layout} before); every other tensor keeps its bytes")
    elif cfg.family_obj != target:
        notes.append(f"self-attention q/k rows kept: {cfg.model_type} rotates the two halves of each head in both namings "
                     f"(torchtune's {cfg.model_type} builder uses the same RoPE layout)")
    if plan.split:
        notes.append("fused qkv_proj / gate_up_proj split into q/k/v_proj and w1/w3 (row ranges, bytes kept)")
    if plan.joined:
        notes.append("q/k/v_proj and w1/w3 joined into the fused qkv_proj / gate_up_proj (rows in order, bytes kept)")
    if target_name == "torchtune":
        notes.extend(_torchtune_notes(src))
    result = ExportResult(out, target_name, cfg.family, notes=notes)
    with AtomicDirectory(out, force=force) as staging:
        tmp = staging.tmp
        files, digests = write_source_tensors(src, tensors, tmp, notes, progress)
        if len(set(files.values())) > 1:
            write_json(tmp / INDEX_NAME, index_doc(files, tensors))
        if src.ckpt.config is not None:
            write_json(tmp / CONFIG_NAME, public_config(src.ckpt.config if cfg.native else fusion_section_for(src.ckpt.config, target)))
        copy_sidecars(src.ckpt, tmp)
        source_manifest = src.manifest
        if source_manifest is not None:
            translated = translate_fusion_manifest(source_manifest, rename, {t.key: t for t in tensors}, files,
                                                   digests, src, target, target_name)
            if translated is not None:
                vision = copy_vision(read_origin(src.ckpt, src.manifest), tmp, src.digest)
                if vision is not None:
                    translated[ORIGIN_KEY]["vision"] = vision
                    notes.append(f"the imported vision tower and projector are carried in {VISION_DIR}/ under their "
                                 "Hugging Face names (export --to mllama puts them back)")
                write_json(tmp / MANIFEST_NAME, public_manifest(translated if cfg.native else fusion_section_for(translated, target)))
            else:
                notes.append(f"the source's {MANIFEST_NAME} does not match its tensors; not carried over")
        entries = tensor_entries(tensors, files, digests)
        write_json(tmp / EXPORT_MANIFEST_NAME, export_manifest(src, target_name, entries, notes))
        result.tensors = entries
        result.files = listed_files(tmp)
        staging.commit()
    return result


def target_family(cfg: ModelConfig, target_name: str) -> Family:
    """The naming family ``--to target_name`` writes ``cfg``'s checkpoint in.

    Args:
        cfg: the source's description.
        target_name: ``torchtune`` or ``hf``.

    Returns:
        Family: the shared table of a native type; for a type torchtune builds without native modules
        here (Gemma 2), that type's family in the target's names (``families.typed_family``).

    Raises:
        UsageError: a type the export does not cover (named, with the covered ones), or ``hf`` for a
            checkpoint already in transformers' names.
    """
    covered = ", ".join(TORCHTUNE_EXPORT_TYPES)
    if cfg.native:
        if target_name == "torchtune" and cfg.model_type not in TORCHTUNE_MODEL_TYPES:
            raise UsageError(f"`to` torchtune supports {covered} checkpoints (the types torchtune has builders for); "
                             f"this one is {cfg.model_type}")
        return FAMILIES[target_name]
    typed = typed_family(cfg.model_type, target_name)
    if target_name == "hf" and cfg.family_obj.transformers_names:
        raise UsageError(f"`to` hf renames a native family's or a torchtune-named checkpoint's tensors; this "
                         f"{cfg.model_type} checkpoint is already in transformers' own names (fusionsurgery.hf "
                         "loads it as it is)")
    if typed is None or cfg.family_obj not in (typed_family(cfg.model_type, "hf"),
                                               typed_family(cfg.model_type, "torchtune")):
        raise UsageError(
            f"`to` {target_name}: this {cfg.model_type} checkpoint is not one this export covers: it renames the "
            f"types torchtune builds ({covered}), laid out as transformers or torchtune names them; the checkpoint "
            "stays in transformers' names, which fusionsurgery.hf loads as it is")
    return typed


def require_rows(src: Source) -> None:
    """Refuse a checkpoint of a type with torchtune rows (``model_types.TORCHTUNE_NAMES``) that lacks a
    tensor they name: every layer holds each layer row, and the model its embedding and final norm.

    Raises:
        CheckpointError: one line naming the missing tensors.
    """
    cfg, keys = src.cfg, set(src.ckpt.keys())
    names, family = TORCHTUNE_NAMES[cfg.model_type], cfg.family_obj
    wanted = [family.global_key("tok_embeddings.weight")]
    wanted += [family.global_key(c) for c in names.globals if c != "output.weight"]  # output: only when untied
    wanted += [family.layer_key(i, c) for i in range(cfg.num_layers) for c in names.layer]
    missing = [k for k in wanted if k not in keys]
    if missing:
        raise CheckpointError(f"{src.ckpt.root}: not a complete {cfg.model_type} decoder: {len(missing)} tensor(s) "
                              f"missing: {listed(missing)}")


def _torchtune_notes(src: Source) -> list[str]:
    """What a torchtune user must build to load this export (the builder's settings the names cannot say)."""
    cfg, notes = src.cfg, []
    if cfg.tie_embeddings:
        notes.append("tied embeddings stay tied (no output.weight): build the torchtune decoder with a tied output")
    elif (src.ckpt.config or {}).get("tie_word_embeddings") is True:
        notes.append("config.json says tie_word_embeddings, but the checkpoint holds its own output.weight (kept): "
                     "build the torchtune decoder untied to load it")
    if cfg.model_type == "gemma" or cfg.norm_offset:
        notes.append("norm scales are stored as w for an effective 1 + w (torchtune's GemmaRMSNorm); "
                     "the fusion blocks' norms follow the same convention")
    if cfg.sliding_window is not None:
        notes.append(f"the base attends within a sliding window of {cfg.sliding_window}, which torchtune's "
                     f"{cfg.model_type} builder does not implement")
    names = TORCHTUNE_NAMES.get(cfg.model_type)
    if names is not None:
        notes.extend(names.notes)
        doc = src.ckpt.config or {}
        notes.extend(text.format(value=doc[key]) for key, text in names.settings.items() if doc.get(key) is not None)
        notes.extend(text for key, text in names.unset.items() if doc.get(key) is None)
    return notes
