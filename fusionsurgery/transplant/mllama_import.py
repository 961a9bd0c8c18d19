"""``import``: a Hugging Face Mllama checkpoint (Llama 3.2 Vision) in this tool's fused layout.

Mllama interleaves cross-attention layers with a plain Llama decoder. The decoder becomes the base
(its self-attention layers renumbered 0..N-1, the first ``vocab_size`` rows of ``embed_tokens``,
``lm_head`` as is); each cross-attention layer becomes the fusion layer of the layer that follows
it (of the one before it, ``fusion_first: false``, when a cross-attention layer comes last); the
extra embedding rows become the fusion vocabulary. The vision tower and projector keep their names
and bytes in ``vision/``. The manifest's ``mllama`` section records the source's layout and config,
so ``export --to mllama`` rebuilds the very checkpoint. Every tensor is streamed chunk by chunk.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..arch.config import FusionConfig, ModelConfig, config_from_shapes
from ..arch.families import FAMILIES, FUSION_SEGMENT, is_fusion_key
from ..errors import CheckpointError, UsageError, listed
from ..io.checkpoint import CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, Checkpoint
from ..io.digest import ALGORITHMS, DEFAULT_ALGORITHM, file_digest
from ..io.identity import input_name, public_config, public_manifest
from ..io.manifest_schema import is_int
from ..io.atomic import AtomicDirectory
from ..io.json_files import write_index, write_json
from ..io.outputs import check_output_location, copy_sidecars, default_output
from ..surgery.manifest import build_manifest, describe_base
from ..surgery.plan import plan_new_tensors
from ..version import __version__
from ..exporting.common import listed_files
from ..arch.mllama_layouts import (ORIGIN_KEY, VISION_DIR, MllamaLayout, detect_layout, expected_vision_keys,
                                    text_config_of)
from ..exporting.tensors import OutTensor, Part, PlannedShard, Progress, plan_shards, same, write_shards

HF = FAMILIES["hf"]
#: Text-config fields the imported base's (Llama) config.json keeps as they are.
CARRIED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
           "hidden_act", "rms_norm_eps", "max_position_embeddings", "rope_theta", "rope_scaling", "rope_parameters",
           "bos_token_id", "eos_token_id", "initializer_range", "use_cache")
#: Metadata of the base's shard files: no tool version, so an adapter-only import and a full one (by
#: any version) name the same base files by the same digests.
BASE_METADATA = {"format": "pt", "producer": "fusionsurgery import"}


@dataclass
class ImportPlan:
    """What an import writes, and from where."""

    layout: MllamaLayout
    source_config: dict[str, Any]
    base_doc: dict[str, Any]  # the imported base's config.json (a Llama config)
    cfg: ModelConfig
    fusion: FusionConfig
    base: list[OutTensor]
    new: list[OutTensor]  # in plan_new_tensors order
    vision: list[OutTensor]
    layer_map: list[dict[str, Any]]
    cross_attention_layers: list[int]
    notes: list[str] = field(default_factory=list)


@dataclass
class ImportResult:
    """What ``import_mllama`` wrote, for reports and ``--json``."""

    output: Path
    layout: str  # "copy" (the whole fused checkpoint) or "adapter"
    source_layout: str
    architecture: str
    num_layers: int
    fused_layers: list[int]
    fusion_first: bool
    cross_attention_layers: list[int]
    counts: dict[str, int]
    params: dict[str, int]
    files: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"output": str(self.output), "layout": self.layout, "source_layout": self.source_layout,
                "architecture": self.architecture, "num_layers": self.num_layers, "fused_layers": self.fused_layers,
                "fusion_first": self.fusion_first, "cross_attention_layers": self.cross_attention_layers,
                "tensors": self.counts, "params": self.params, "files": self.files, "notes": self.notes}


# ---------------------------------------------------------------------- planning
def _int_field(doc: dict[str, Any], name: str, where: str) -> int:
    value = doc.get(name)
    if not is_int(value) or value <= 0:
        raise CheckpointError(f"{where}: text config needs a positive integer {name!r}, got {value!r}")
    return value


def placement(num_layers: int, cross: list[int], where: str) -> tuple[bool, dict[int, int]]:
    """(fusion_first, each cross-attention layer -> the self-attention layer it becomes the fusion layer of).

    The following layer when every cross-attention layer has one that is not cross-attention too
    (Llama 3.2 Vision), else the preceding one; anything else has no FusionLayer form."""
    chosen = set(cross)
    if not cross or len(chosen) != len(cross) or not all(isinstance(c, int) and 0 <= c < num_layers for c in cross):
        raise CheckpointError(f"{where}: cross_attention_layers {cross} are not distinct layers of 0..{num_layers - 1}")
    for fusion_first, step in ((True, 1), (False, -1)):
        wraps = {c: c + step for c in cross}
        if all(0 <= j < num_layers and j not in chosen for j in wraps.values()):
            return fusion_first, wraps
    raise UsageError(f"{where}: cross-attention layers {sorted(cross)} cannot each sit beside a layer of their own "
                     "(two in a row, or at both ends): a FusionLayer wraps one self-attention layer")


def plan_import(ckpt: Checkpoint, source: Path) -> ImportPlan:
    """Check that ``ckpt`` is an Mllama checkpoint this tool can express, and plan every output tensor."""
    doc = ckpt.config
    model_type = (doc or {}).get("model_type")
    layout = detect_layout(set(ckpt.keys()))
    if model_type not in ("mllama", "mllama_text_model") or layout is None:
        why = "no config.json" if doc is None else (
            f"config.json model_type {model_type!r}" if model_type not in ("mllama", "mllama_text_model")
            else "no Mllama embed_tokens tensor")
        raise UsageError(f"{source} is not an Mllama checkpoint ({why}); import reads MllamaForCausalLM and "
                         "MllamaForConditionalGeneration checkpoints (a text-only decoder needs `fusionsurgery fuse`)")
    assert doc is not None
    described = "MllamaForConditionalGeneration" if model_type == "mllama" else "MllamaForCausalLM"
    if layout.architecture != described:
        raise CheckpointError(f"{source}: config.json describes {described}, but the tensors are named as "
                              f"{layout.architecture}'s")
    where = str(ckpt.config_path or source)
    text = text_config_of(doc)
    if not isinstance(text, dict):
        raise CheckpointError(f"{where}: text_config is not an object")
    num_layers, vocab = _int_field(text, "num_hidden_layers", where), _int_field(text, "vocab_size", where)
    cross = text.get("cross_attention_layers")
    if not isinstance(cross, list):
        raise CheckpointError(f"{where}: text config has no cross_attention_layers list")
    fusion_first, wraps = placement(num_layers, cross, where)
    self_layers = [j for j in range(num_layers) if j not in wraps]
    index = {j: i for i, j in enumerate(self_layers)}
    notes: list[str] = []

    embed_key = f"{layout.text_prefix}embed_tokens.weight"
    einfo = ckpt.info(embed_key)
    if len(einfo.shape) != 2 or einfo.shape[0] < vocab:
        raise CheckpointError(f"{source}: {embed_key} is {list(einfo.shape)}, fewer rows than vocab_size {vocab}")
    if layout.lm_head not in ckpt.key_to_file:
        raise CheckpointError(f"{source}: no {layout.lm_head}; import needs Mllama's own output head")
    rows, dim = einfo.shape
    base = [OutTensor("model.embed_tokens.weight", einfo.dtype, (vocab, dim), [Part(embed_key, 0, vocab)],
                      f"rows 0:{vocab} of {embed_key}", [embed_key])]
    new: dict[str, OutTensor] = {}
    if rows > vocab:
        key = HF.global_key("tok_embeddings.fusion_embedding.weight")
        new[key] = OutTensor(key, einfo.dtype, (rows - vocab, dim), [Part(embed_key, vocab, rows - vocab)],
                             f"rows {vocab}:{rows} of {embed_key}", [embed_key])
    vision: list[OutTensor] = []
    layer_re = re.compile(re.escape(layout.text_prefix) + r"layers\.(\d+)\.(.+)")
    for key in ckpt.keys():
        if key == embed_key:
            continue
        if layout.is_vision(key):
            vision.append(same(ckpt, key, key))
            continue
        target = _target(key, layout, layer_re, num_layers, wraps, index, source)
        if is_fusion_key(HF.to_canonical(target)):
            new[target] = same(ckpt, key, target)
        else:
            base.append(same(ckpt, key, target))

    if model_type == "mllama":
        _check_vision(layout, doc, {t.key for t in vision}, source, where)
    base_doc = _base_config(text, doc, len(self_layers), vocab, notes)
    cfg = config_from_shapes(base_doc, HF, {HF.to_canonical(t.key): t.shape for t in base}, where)
    dtypes = sorted({t.dtype for t in new.values()})
    if len(dtypes) != 1:
        raise CheckpointError(f"{source}: the cross-attention layers and extra embedding rows mix dtypes "
                              f"{', '.join(dtypes)}; a fused checkpoint keeps its fusion tensors in one")
    fusion = FusionConfig(layers=sorted(index[wraps[c]] for c in cross), fusion_first=fusion_first,
                          encoder_dim=cfg.dim, fusion_vocab=rows - vocab, init="imported", init_std=0.0, seed=0,
                          dtype=dtypes[0], qk_norm_eps=cfg.norm_eps, norm_eps=cfg.norm_eps, tool_version=__version__)
    ordered = _check_fusion_tensors(cfg, fusion, new, source)
    layer_map = [{"mllama_layer": j, "kind": "cross" if j in wraps else "self",
                  "source_layer": index[wraps[j]] if j in wraps else index[j]} for j in range(num_layers)]
    return ImportPlan(layout, doc, base_doc, cfg, fusion, base, ordered, vision, layer_map, sorted(cross), notes)


def _check_vision(layout: MllamaLayout, doc: dict[str, Any], present: set[str], source: Path, where: str) -> None:
    """Refuse an MllamaForConditionalGeneration whose vision tensors are not the ones its vision_config
    promises (missing ones would come back as random weights from transformers after an export)."""
    expected = expected_vision_keys(layout, doc.get("vision_config"), where)
    missing, extra = sorted(expected - present), sorted(present - expected)
    if missing:
        raise CheckpointError(
            f"{source}: config.json promises a vision tower (vision_config), but {len(missing)} of its "
            f"{len(expected)} vision tensor(s) are missing: {listed(missing)}")
    if extra:
        raise CheckpointError(
            f"{source}: {len(extra)} vision tensor(s) that config.json's vision_config does not account for: "
            f"{listed(extra)}")


def _target(key: str, layout: MllamaLayout, layer_re: re.Pattern[str], num_layers: int, wraps: dict[int, int],
            index: dict[int, int], source: Path) -> str:
    """The fused layout's (Hugging Face) name for Mllama text tensor ``key``."""
    if key == layout.lm_head:
        return "lm_head.weight"
    if key == f"{layout.text_prefix}norm.weight":
        return "model.norm.weight"
    m = layer_re.fullmatch(key)
    target = None
    if m and int(m.group(1)) < num_layers:
        j, suffix = int(m.group(1)), m.group(2)
        target = (f"model.layers.{index[wraps[j]]}.{FUSION_SEGMENT}.{suffix}" if j in wraps
                  else f"model.layers.{index[j]}.{suffix}")
    if target is None or not HF.knows(target):
        raise CheckpointError(f"{source}: tensor {key} has no place in Mllama's Llama text model "
                              f"({layout.architecture}, {layout.name} names)")
    return target


def _check_fusion_tensors(cfg: ModelConfig, fusion: FusionConfig, new: dict[str, OutTensor],
                          source: Path) -> list[OutTensor]:
    """The imported fusion tensors, in the order fuse writes them: exactly the planned ones."""
    ordered = []
    planned = plan_new_tensors(cfg, fusion)
    for p in planned:
        t = new.get(p.key)
        if t is None:
            raise CheckpointError(f"{source}: a cross-attention layer lacks a tensor its fusion layer needs: "
                                  f"{p.key} ({list(p.shape)})")
        if tuple(t.shape) != tuple(p.shape):
            raise CheckpointError(f"{source}: {t.sources[0]} is {list(t.shape)}; as {p.key} it must be {list(p.shape)}")
        ordered.append(t)
    extra = sorted(set(new) - {p.key for p in planned})
    if extra:
        raise CheckpointError(f"{source}: tensor(s) no fusion layer has: {listed([new[k].sources[0] for k in extra], 3)}")
    return ordered


def _base_config(text: dict[str, Any], doc: dict[str, Any], num_layers: int, vocab: int,
                 notes: list[str]) -> dict[str, Any]:
    """A Llama config.json for the text decoder: transformers reads the imported base as ``LlamaForCausalLM``."""
    out: dict[str, Any] = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    out.update({k: text[k] for k in CARRIED if k in text})
    out.update({"num_hidden_layers": num_layers, "tie_word_embeddings": False, "attention_bias": False,
                "mlp_bias": False})
    heads, width = text.get("num_attention_heads"), text.get("hidden_size")
    if isinstance(heads, int) and isinstance(width, int) and heads > 0:
        out["head_dim"] = width // heads
    pad = text.get("pad_token_id")
    if isinstance(pad, int) and 0 <= pad < vocab:
        out["pad_token_id"] = pad
    elif pad is not None:
        notes.append(f"pad_token_id {pad} is one of the extra embedding rows: the text base's config names none "
                     "(export --to mllama restores it)")
    dtype = next((d.get(k) for d in (text, doc) for k in ("dtype", "torch_dtype") if d.get(k)), None)
    if dtype:
        out["dtype"] = dtype
    return out


# ---------------------------------------------------------------------- writing
def import_mllama(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
                  adapter_only: bool = False, force: bool = False, digest: str = DEFAULT_ALGORITHM,
                  follow_symlinks: bool = False, progress: Progress | None = None) -> ImportResult:
    """Import the Mllama checkpoint at ``path`` into the fused layout.

    Args:
        path: a Hugging Face ``MllamaForCausalLM`` or ``MllamaForConditionalGeneration`` directory.
        out: the output directory (default ``<name>-imported`` beside ``path``).
        adapter_only: write only the fusion tensors (and the vision parts); the text base is named
            by the digests of the files a full import writes (which ``unfuse`` of it gives back).
        force: replace an existing output (only once the new one is complete).
        digest: ``blake3`` or ``sha256``, for the manifest's digests.
        follow_symlinks: follow symlinks in ``path`` that lead outside it (``io.links``).
        progress: told how many bytes were written.

    The manifest names the source by its name, never its path.

    Returns:
        ImportResult: the output, the source's architecture and layout, the fused and
        cross-attention layers, notes and files.

    Raises:
        CheckpointError: not an Mllama, no config.json, tensors with no place in a Llama decoder,
            or cross-attention layers no FusionLayer can express.
        UsageError: an unknown digest, or an output inside the input.
    """
    if digest not in ALGORITHMS:
        raise UsageError(f"`digest` must be one of {', '.join(ALGORITHMS)}, got {digest!r}")
    source = Path(path)
    ckpt = Checkpoint.open(source, follow_symlinks=follow_symlinks)
    plan = plan_import(ckpt, source)
    out_path = Path(out) if out is not None else default_output(source, "imported")
    check_output_location(source, out_path)
    layout = "adapter" if adapter_only else "copy"
    result = ImportResult(
        out_path, layout, plan.layout.name, plan.layout.architecture, plan.cfg.num_layers, plan.fusion.layers,
        plan.fusion.fusion_first, plan.cross_attention_layers,
        counts={"base": len(plan.base), "fusion": len(plan.new), "vision": len(plan.vision)},
        params={k: sum(math.prod(t.shape) for t in ts)
                for k, ts in (("base", plan.base), ("fusion", plan.new), ("vision", plan.vision))},
        notes=plan.notes)
    with AtomicDirectory(out_path, force=force) as staging:
        tmp = staging.tmp
        shards = plan_shards(plan.base, metadata=BASE_METADATA)
        base_files, base_digests = write_shards(ckpt, shards, None if adapter_only else tmp, progress=progress,
                                                algorithm=digest)
        new_files, new_digests = write_shards(ckpt, plan_shards(plan.new, stem="fusion", numbered=True), tmp,
                                              progress=progress, algorithm=digest)
        vision_doc = None
        if plan.vision:
            (tmp / VISION_DIR).mkdir()
            vision_doc = _write_vision(ckpt, plan.vision, tmp / VISION_DIR, digest, progress)
        if not adapter_only:
            write_index(tmp / INDEX_NAME, {**base_files, **new_files},
                        sum(t.nbytes for t in plan.base) + sum(t.nbytes for t in plan.new))
        write_json(tmp / CONFIG_NAME, public_config({**plan.base_doc, "fusion": plan.fusion.to_dict()}))
        sidecars = copy_sidecars(ckpt, tmp)
        write_json(tmp / MANIFEST_NAME, public_manifest(_manifest(plan, source, shards, tmp, base_files, base_digests,
                                                                  new_files, new_digests, vision_doc, sidecars, layout,
                                                                  digest)))
        result.files = listed_files(tmp)
        staging.commit()
    return result


def shard_descriptions(shards: list[PlannedShard], digests: dict[str, str], algorithm: str) -> list[dict[str, Any]]:
    """Name, size and file digest of each planned shard, from its header and its tensors' digests."""
    return [{"name": s.name, "bytes": s.file_size,
             "digest": file_digest(s.prefix, [digests[t.key] for t in s.tensors], algorithm)} for s in shards]


def _write_vision(ckpt: Checkpoint, vision: list[OutTensor], directory: Path, algorithm: str,
                  progress: Progress | None) -> dict[str, Any]:
    shards = plan_shards(vision, stem="vision")
    files, digests = write_shards(ckpt, shards, directory, progress=progress, algorithm=algorithm)
    return {"directory": VISION_DIR, "files": shard_descriptions(shards, digests, algorithm),
            "tensors": [{"name": t.key, "shape": list(t.shape), "dtype": t.dtype, "file": files[t.key],
                         "digest": digests[t.key]} for t in vision]}


def _manifest(plan: ImportPlan, source: Path, shards: list[PlannedShard], tmp: Path, base_files: dict[str, str],
              base_digests: dict[str, str], new_files: dict[str, str], new_digests: dict[str, str],
              vision_doc: dict[str, Any] | None, sidecars: list[str], layout: str, algorithm: str) -> dict[str, Any]:
    files = {s.name: s.header(tmp) for s in shards}
    base_view = Checkpoint(tmp, files, dict(base_files), config=plan.base_doc)
    described = {d["name"]: d["digest"] for d in shard_descriptions(shards, base_digests, algorithm)}
    name = input_name(source)
    base_desc = describe_base(base_view, plan.cfg, f"the text decoder of {name} (`unfuse` of a whole import)",
                              described)
    base_desc["imported_from"] = {"name": name, "architecture": plan.layout.architecture}
    originals = [{"name": t.key, "shape": list(t.shape), "dtype": t.dtype, "file": base_files[t.key],
                  "digest": base_digests[t.key], "from": t.sources[0]} for t in plan.base]
    manifest = build_manifest(base_desc=base_desc, fusion=plan.fusion, new=plan_new_tensors(plan.cfg, plan.fusion),
                              new_files=new_files, new_digests=new_digests, originals=originals, layout=layout,
                              digest_algorithm=algorithm)
    sources = {t.key: t.sources[0] for t in plan.new}
    for entry in manifest["new_tensors"]:
        entry["init"] = "imported"
        entry["from"] = sources[entry["name"]]
    manifest[ORIGIN_KEY] = {
        "source": name, "layout": plan.layout.name, "architecture": plan.layout.architecture,
        "config": plan.source_config, "cross_attention_layers": plan.cross_attention_layers,
        "layer_map": plan.layer_map, "vision": vision_doc, "sidecars": sidecars,
    }
    return manifest
