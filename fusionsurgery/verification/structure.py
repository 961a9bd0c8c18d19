"""Check 1, structure: config and manifest parse and agree with the tensors, the index and the shards.

Header-level only (no tensor data, no torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..arch.config import MODEL_TYPES, FusionConfig, ModelConfig, read_fusion_config, read_model_config
from ..arch.discovery import family_of_checkpoint, text_decoder_problem
from ..arch.families import FAMILIES, Family, detect_family
from ..arch.mllama_layouts import Origin, read_origin
from ..errors import CheckpointError, FusionSurgeryError, listed
from ..io.checkpoint import INDEX_NAME, Checkpoint, read_json_object
from ..io.safetensors_format import read_header
from ..surgery.consistency import is_fusion_name, original_problems, planned_tensors
from ..surgery.quantized import param_count, quantization_problems
from ..surgery.manifest import MANIFEST_FORMAT, MANIFEST_VERSION
from ..surgery.plan import NewTensor
from .report import CheckResult

NAME, TITLE = "structure", "Structure: config, manifest, tensors, index and shards"


@dataclass
class Layout:
    """What the structure check learnt, for the checks after it."""

    cfg: ModelConfig | None = None
    fusion: FusionConfig | None = None
    manifest: dict[str, Any] | None = None
    original_keys: list[str] = field(default_factory=list)
    new_tensors: list[NewTensor] = field(default_factory=list)
    origin: Origin | None = None  # an import's (or graft's) source and its vision parts


# ---------------------------------------------------------------- index and shards
def shard_problems(path: Path) -> list[str]:
    """Inconsistencies between ``model.safetensors.index.json`` and the shard headers, all of them.

    ``Checkpoint.open`` refuses at the first one; this lists every one as check failures. An
    unreadable shard header still raises ``CheckpointError`` (unreadable input).
    """
    index = path / INDEX_NAME
    if not path.is_dir() or not index.exists():
        return []
    try:
        doc = read_json_object(index, "index")
    except CheckpointError as exc:
        return [str(exc)]
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        return [f"{INDEX_NAME} has no weight_map of key -> file name"]
    problems: list[str] = []
    headers = {}
    for name in sorted(set(weight_map.values())):
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            problems.append(f"{INDEX_NAME} names shard {name!r} outside the directory")
        elif not (path / name).is_file():
            problems.append(f"shard {name} named in {INDEX_NAME} is missing")
        else:
            headers[name] = read_header(path / name)
    wrong = [k for k, f in weight_map.items() if f in headers and k not in headers[f].tensors]
    if wrong:
        problems.append(f"{INDEX_NAME} maps {len(wrong)} key(s) to shards that do not hold them: {listed(wrong)}")
    unindexed = [k for f, h in headers.items() for k in h.tensors if weight_map.get(k) != f]
    if unindexed:
        problems.append(f"{len(unindexed)} tensor(s) in shards are not indexed there: {listed(unindexed)}")
    stray = sorted(f.name for f in path.glob("*.safetensors") if f.name not in headers)
    if stray:
        problems.append(f"safetensors file(s) not named in {INDEX_NAME}: {listed(stray)}")
    total = (doc.get("metadata") or {}).get("total_size") if isinstance(doc.get("metadata"), dict) else None
    actual = sum(t.nbytes for h in headers.values() for t in h.tensors.values())
    if total is not None and total != actual and not problems:
        problems.append(f"{INDEX_NAME} metadata.total_size is {total} but the tensors hold {actual} bytes")
    return problems


# ---------------------------------------------------------------- the check
def check_structure(ckpt: Checkpoint, rope_defaults: str | None = None) -> tuple[CheckResult, Layout]:
    """Config, manifest, expected new tensors and the keys actually present, cross-checked."""
    result, layout = CheckResult(NAME, TITLE), Layout()
    family = family_of(ckpt)
    present = set(ckpt.keys())
    try:
        layout.fusion = read_fusion_config(ckpt.config)
        if layout.fusion is None:
            result.fail("config.json has no 'fusion' section")
        layout.cfg = read_model_config(ckpt, rope_defaults=rope_defaults)
    except FusionSurgeryError as exc:
        result.fail(f"config: {exc}")
    try:
        layout.manifest = ckpt.read_manifest()
        if layout.manifest is None:
            result.fail("no fusion_manifest.json: original tensors cannot be checked without --base")
    except FusionSurgeryError as exc:
        result.fail(str(exc))
    manifest = layout.manifest
    if manifest is not None:
        _check_manifest_schema(manifest, result)
    if result.failed and manifest is not None and not _schema_ok(manifest):
        return result.finish(""), layout
    if layout.cfg is not None and layout.fusion is not None:
        _check_planned(layout, ckpt, result)
        _check_text_decoder(layout, ckpt, result)
    if manifest is not None:
        layout.original_keys = [e["name"] for e in manifest["original_tensors"]]
        for problem in original_problems(ckpt, manifest["original_tensors"]):  # missing, or of another shape/dtype
            result.fail(problem)
        _check_originals_listed(manifest, ckpt, family, result)
        if layout.fusion is not None:
            _check_manifest_fusion(manifest, layout.fusion, result)
        _check_manifest_new(manifest, layout.new_tensors, result)
        _check_totals(manifest, layout, ckpt, result)
        try:
            layout.origin = read_origin(ckpt, manifest)
        except FusionSurgeryError as exc:
            result.fail(str(exc))
    else:
        layout.original_keys = [k for k in ckpt.keys() if not is_fusion_name(family, k)]
    explained = set(layout.original_keys) | {t.key for t in layout.new_tensors}
    extra = sorted(present - explained)
    if extra and layout.new_tensors:
        result.fail(f"{len(extra)} unexplained tensor(s), neither original nor planned fusion: {listed(extra)}")
    result.figures = {"tensors": len(present), "original_tensors": len(layout.original_keys),
                      "fusion_tensors": len(layout.new_tensors), "files": len(ckpt.files),
                      "fused_layers": layout.fusion.layers if layout.fusion else None}
    return result.finish(f"{len(present)} tensors in {len(ckpt.files)} file(s): {len(layout.original_keys)} "
                         f"original, {len(layout.new_tensors)} fusion, all accounted for"), layout


def family_of(ckpt: Checkpoint) -> Family:
    """The naming family, even when some keys have no place in it (those are reported, not fatal)."""
    model_type = (ckpt.config or {}).get("model_type")
    if isinstance(model_type, str) and model_type not in MODEL_TYPES:
        return family_of_checkpoint(ckpt)  # any decoder: the layout its fusion section records
    for family in FAMILIES.values():
        if family.marker in ckpt.key_to_file:
            return family
    return detect_family(ckpt.keys())  # raises the usual "unrecognised checkpoint" error


def _schema_ok(manifest: dict[str, Any]) -> bool:
    return (isinstance(manifest.get("fusion"), dict) and all(
        isinstance(manifest.get(k), list) and all(isinstance(e, dict) and {"name", "shape", "dtype"} <= e.keys()
                                                  for e in manifest[k])
        for k in ("new_tensors", "original_tensors")))


def _check_manifest_schema(manifest: dict[str, Any], result: CheckResult) -> None:
    if manifest.get("format") != MANIFEST_FORMAT:
        result.fail(f"fusion_manifest.json: format is {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    if manifest.get("format_version") != MANIFEST_VERSION:
        result.fail(f"fusion_manifest.json: format_version {manifest.get('format_version')!r} is not supported "
                    f"(this tool reads {MANIFEST_VERSION})")
    if not _schema_ok(manifest):
        result.fail("fusion_manifest.json: needs a 'fusion' object and 'new_tensors' / 'original_tensors' lists "
                    "of {name, shape, dtype, digest}")


def _check_planned(layout: Layout, ckpt: Checkpoint, result: CheckResult) -> None:
    """The fusion tensors the config implies must exist with their shapes and dtypes."""
    assert layout.cfg is not None and layout.fusion is not None
    layout.new_tensors, problems = planned_tensors(ckpt, layout.cfg, layout.fusion)
    block = layout.fusion.block(layout.cfg)
    problems += quantization_problems(ckpt.config, block, block.layer_prefix, block.embedding_key)
    for problem in problems:
        result.fail(problem)


def _check_text_decoder(layout: Layout, ckpt: Checkpoint, result: CheckResult) -> None:
    """A type without native modules: the section's layers are the text decoder's, as ``fuse`` decides
    it from the config's text part (not a vision tower's list of the same count)."""
    assert layout.cfg is not None and layout.fusion is not None
    if layout.cfg.native or not layout.fusion.layer_prefix:
        return
    problem = text_decoder_problem(ckpt, layout.fusion.layer_prefix)
    if problem is not None:
        result.fail(f"the fusion section's layers are not the text decoder's: {problem}")


def _check_originals_listed(manifest: dict[str, Any], ckpt: Checkpoint, family: Family, result: CheckResult) -> None:
    """Original tensors in another file than the manifest says, or named as fusion tensors (their presence,
    shapes and dtypes: ``surgery.consistency.original_problems``)."""
    wrong, fusion_named = [], []
    for e in manifest["original_tensors"]:
        key = e["name"]
        if key not in ckpt.key_to_file:
            continue  # reported as missing by original_problems
        if e.get("file") not in (None, ckpt.key_to_file[key]):
            wrong.append(f"{key} is in {ckpt.key_to_file[key]}, manifest says {e['file']}")
        if is_fusion_name(family, key):
            fusion_named.append(key)
    for w in wrong:
        result.fail(f"original tensor disagrees with the manifest: {w}")
    if fusion_named:
        result.fail(f"manifest lists fusion tensor(s) as original: {listed(fusion_named)}")


def _check_manifest_fusion(manifest: dict[str, Any], fusion: FusionConfig, result: CheckResult) -> None:
    doc = manifest["fusion"]
    for f in fields(FusionConfig):
        if f.name in doc and doc[f.name] != getattr(fusion, f.name):
            result.fail(f"manifest says fusion.{f.name}={doc[f.name]!r} but config.json says {getattr(fusion, f.name)!r}")


def _check_manifest_new(manifest: dict[str, Any], planned: list[NewTensor], result: CheckResult) -> None:
    listed_new = {e["name"]: e for e in manifest["new_tensors"]}
    expected = {t.key: t for t in planned}
    unplanned = sorted(set(listed_new) - set(expected))
    if unplanned and planned:
        result.fail(f"manifest lists new tensor(s) the config does not imply: {listed(unplanned)}")
    unlisted = sorted(set(expected) - set(listed_new))
    if unlisted:
        result.fail(f"fusion tensor(s) missing from the manifest: {listed(unlisted)}")
    for key in sorted(set(listed_new) & set(expected)):
        e, t = listed_new[key], expected[key]
        if list(e["shape"]) != list(t.shape) or e["dtype"] != t.dtype:
            result.fail(f"manifest says {key} is {e['shape']} {e['dtype']}, expected {list(t.shape)} {t.dtype}")


def _check_totals(manifest: dict[str, Any], layout: Layout, ckpt: Checkpoint, result: CheckResult) -> None:
    base_params = param_count(ckpt, [k for k in layout.original_keys if k in ckpt.key_to_file])
    fusion_params = sum(t.numel for t in layout.new_tensors)
    totals = manifest.get("totals") or {}
    for name, actual in (("base_params", base_params), ("fusion_params", fusion_params)):
        if name in totals and totals[name] != actual:
            result.fail(f"manifest totals.{name} is {totals[name]}, the tensors hold {actual}")
    base = manifest.get("base") or {}
    if "num_tensors" in base and base["num_tensors"] != len(layout.original_keys):
        result.fail(f"manifest base.num_tensors is {base['num_tensors']} but it lists "
                    f"{len(layout.original_keys)} original tensors")
    cfg, described = layout.cfg, base.get("config") or {}
    if cfg is not None:
        for name in ("num_layers", "dim", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
            if name in described and described[name] != getattr(cfg, name):
                result.fail(f"manifest base.config.{name} is {described[name]}, the checkpoint's is {getattr(cfg, name)}")
