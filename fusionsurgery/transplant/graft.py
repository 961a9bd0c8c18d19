"""``graft``: an adapter's fusion layers (and vision parts) on another base of the same dimensions.

The adapter (``fuse --adapter-only`` or ``import --adapter-only``) was made on one base; its fusion
tensors fit any base with the same layers, width, heads, MLP width and vocabulary. The output is an
ordinary fused checkpoint of the new base: its shard files copied (or hard-linked) byte for byte,
the adapter's files copied, an index, the base's config with the adapter's ``fusion`` section, and
a manifest that records the graft. With the adapter's own base at hand (``was``), the report says
how far the new base is from it, tensor by tensor and layer by layer.
"""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..arch.config import FusionConfig, ModelConfig, read_fusion_config, read_model_config, to_hf_config
from ..arch.families import is_fusion_key
from ..errors import CheckpointError, UsageError, listed
from ..io.checkpoint import CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, Checkpoint
from ..surgery.quantized import with_fusion_skipped
from ..io.copying import copy_checkpoint_files, same_filesystem
from ..io.digest import algorithm_of, file_digest
from ..io.identity import input_name, public_config, public_manifest
from ..io.progress import StageProgress
from ..io.atomic import AtomicDirectory
from ..io.json_files import write_index, write_json
from ..io.outputs import check_output_location, copy_sidecars, default_output
from ..surgery.adapter import is_adapter
from ..surgery.consistency import mismatches, original_problems
from ..surgery.fuse import bring_originals, check_not_fused
from ..surgery.manifest import build_manifest, describe_base
from ..surgery.plan import plan_new_tensors
from ..exporting.common import listed_files
from ..arch.mllama_layouts import ORIGIN_KEY, VISION_DIR, copy_vision, read_origin
from .drift import Drift, compare

#: What must agree between the adapter's base and the new one: (ModelConfig field, words), checked in order.
DIMENSIONS = (
    ("family", "tensor naming"), ("num_layers", "layers"), ("dim", "width"), ("num_heads", "attention heads"),
    ("num_kv_heads", "key/value heads"), ("head_dim", "head_dim"), ("intermediate_dim", "MLP width"),
    ("vocab_size", "vocabulary"), ("norm_offset", "RMSNorm offset (Gemma's 1 + w)"),
)


@dataclass
class GraftResult:
    """What ``graft`` did, for reports and ``--json``."""

    output: Path
    layout: str  # copy or link
    adapter: Path
    base: Path
    adapter_digest: str
    fusion: FusionConfig
    config: ModelConfig
    fusion_tensors: int
    vision_tensors: int
    #: the new base's tensors whose digest equals the adapter's record of its own base
    same_as_adapter_base: int
    drift: Drift | None = None
    files: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output), "layout": self.layout, "adapter": str(self.adapter), "base": str(self.base),
            "adapter_digest": self.adapter_digest, "fused_layers": self.fusion.layers,
            "fusion_first": self.fusion.fusion_first, "fusion_tensors": self.fusion_tensors,
            "vision_tensors": self.vision_tensors, "same_as_adapter_base": self.same_as_adapter_base,
            "drift": self.drift.to_dict() if self.drift else None, "files": self.files, "notes": self.notes,
        }


@dataclass
class Adapter:
    """An adapter directory, read and checked."""

    path: Path
    ckpt: Checkpoint
    manifest: dict[str, Any]
    fusion: FusionConfig
    base_config: dict[str, Any]

    @property
    def base_digests(self) -> dict[str, str]:
        return {e["name"]: e.get("digest") for e in self.manifest.get("original_tensors", []) if isinstance(e, dict)}


def open_adapter(path: Path, follow_symlinks: bool = False) -> Adapter:
    """The adapter at ``path``; a one-line refusal for anything else."""
    ckpt = Checkpoint.open(path, follow_symlinks=follow_symlinks)
    manifest = ckpt.read_manifest()
    if not is_adapter(manifest):
        what = "no fusion_manifest.json" if manifest is None else f"its manifest's layout is {manifest.get('layout')!r}"
        raise UsageError(f"{path} is not an adapter ({what}): graft takes the output of `fuse --adapter-only` or "
                         "`import --adapter-only`")
    assert manifest is not None
    fusion = read_fusion_config(ckpt.config)
    described = (manifest.get("base") or {}).get("config")
    if fusion is None or not isinstance(described, dict):
        raise CheckpointError(f"{path}: the adapter's config.json has no fusion section, or its manifest does not "
                              "describe its base")
    return Adapter(path, ckpt, manifest, fusion, described)


def check_dimensions(adapter: Adapter, cfg: ModelConfig, what: str) -> None:
    """Refuse, naming the first mismatch, a base whose dimensions differ from the adapter's base."""
    for name, words in DIMENSIONS:
        theirs, ours = adapter.base_config.get(name), getattr(cfg, name)
        if theirs != ours:
            raise UsageError(f"cannot graft {adapter.path} onto {what}: {words} differ (the adapter's base has "
                             f"{theirs}, {what} has {ours})")


def check_tensors(adapter: Adapter, cfg: ModelConfig, what: str) -> None:
    """Every fusion tensor the adapter must hold for ``cfg``, with its shape and dtype, and nothing else."""
    planned = plan_new_tensors(cfg, adapter.fusion)
    for m in mismatches(adapter.ckpt, planned)[:1]:
        p = m.planned
        if m.found is None:
            raise UsageError(f"cannot graft {adapter.path} onto {what}: the adapter lacks {p.key}")
        raise UsageError(f"cannot graft {adapter.path} onto {what}: {p.key} is {list(m.found[0])} {m.found[1]}, "
                         f"{what} needs {list(p.shape)} {p.dtype}")
    extra = sorted(set(adapter.ckpt.keys()) - {p.key for p in planned})
    if extra:
        raise UsageError(f"cannot graft {adapter.path}: tensor(s) its fusion section does not explain: "
                         f"{listed(extra, 3)}")


def check_base_tensors(adapter: Adapter, base: Checkpoint, what: str) -> None:
    """Refuse a base that lacks a tensor the adapter's own base had, or holds one in another shape (the
    adapter's manifest lists them): a fused output must hold every tensor of a complete decoder.

    Raises:
        CheckpointError: the tensors missing, or the first of another shape, named.
    """
    problems = original_problems(base, adapter.manifest.get("original_tensors", []), dtypes=False)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"cannot graft {adapter.path} onto {what}: its tensors differ from those of the "
                              f"adapter's own base (its manifest lists them): {problems[0]}{more}")


def _open_base(path: Path, adapter: Adapter, what: str, *, fused_ok: bool = False,
               follow_symlinks: bool = False) -> tuple[Checkpoint, ModelConfig]:
    ckpt = Checkpoint.open(path, follow_symlinks=follow_symlinks)
    if (ckpt.config or {}).get("model_type") in ("mllama", "mllama_text_model"):
        raise UsageError(f"{what} {path} is an Mllama checkpoint: `fusionsurgery import` it first (and `unfuse` "
                         "the import for its text base)")
    if not fused_ok:
        check_not_fused(ckpt)
    elif is_adapter(ckpt.read_manifest()):
        raise UsageError(f"{what} {path} is an adapter; give a base with its tensors")
    cfg = read_model_config(ckpt)
    check_dimensions(adapter, cfg, f"{what} {path}")
    return ckpt, cfg


def _open_reference(path: Path, adapter: Adapter, base: Checkpoint) -> Checkpoint:
    """``--was``: a base with the same tensors as BASE (a fused checkpoint's originals count)."""
    ref, cfg = _open_base(path, adapter, "--was", fused_ok=True, follow_symlinks=base.follow_symlinks)
    family = cfg.family_obj
    theirs = {k for k in ref.keys() if not is_fusion_key(family.to_canonical(k))}
    for key in base.keys():
        if key not in theirs:
            raise UsageError(f"`was` {path} has no tensor {key}, which BASE has")
        if ref.info(key).shape != base.info(key).shape:
            raise UsageError(f"`was` {path}: {key} is {list(ref.info(key).shape)}, BASE's is {list(base.info(key).shape)}")
    return ref


def graft(adapter: str | os.PathLike[str], onto: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
          *, was: str | os.PathLike[str] | None = None, link: bool = False, force: bool = False,
          follow_symlinks: bool = False, progress: StageProgress | None = None) -> GraftResult:
    """Attach the adapter at ``adapter`` to the base at ``onto``, writing a fused checkpoint of ``onto``.

    Args:
        adapter: an adapter (``fuse --adapter-only`` or ``import --adapter-only``).
        onto: the base to attach it to: same layers, width, heads, MLP width and vocabulary as the
            adapter's own base.
        out: the output directory (default ``<base name>-grafted`` beside ``onto``).
        was: the adapter's own base (a plain base, or a fused checkpoint whose originals are it),
            to report how far ``onto`` is from it (``result.drift``).
        link: hard-link the base's shard files instead of copying them.
        force: replace an existing output (only once the new one is complete).
        follow_symlinks: follow symlinks in the three inputs that lead outside them (``io.links``).
        progress: told ``(stage, bytes, total)`` as the base is copied or digested.

    Returns:
        GraftResult: the output, its config and fusion settings, tensor counts, the adapter's
        digest, the drift report (with ``was``), notes and files.

    Raises:
        UsageError: a base whose dimensions differ from the adapter's base (the first difference
            named), or an input that is not an adapter.
        CheckpointError: an unreadable input.

    The manifest names the three inputs by name, never by path.
    """
    a = open_adapter(Path(adapter), follow_symlinks)
    base_path = Path(onto)
    base, cfg = _open_base(base_path, a, "BASE", follow_symlinks=follow_symlinks)
    check_tensors(a, cfg, f"BASE {base_path}")
    check_base_tensors(a, base, f"BASE {base_path}")
    ref = _open_reference(Path(was), a, base) if was is not None else None
    origin = read_origin(a.ckpt, a.manifest)
    out_path = Path(out) if out is not None else default_output(base_path, "grafted")
    for source in (base_path, Path(adapter), *([Path(was)] if was is not None else [])):
        check_output_location(source, out_path)
    clash = sorted(set(base.files) & set(a.ckpt.files))
    if clash:
        raise CheckpointError(f"{base_path}: has file(s) named like the adapter's ({', '.join(clash)})")
    algorithm = algorithm_of(a.manifest)
    result = GraftResult(out_path, "link" if link else "copy", Path(adapter), base_path, "", a.fusion, cfg,
                         fusion_tensors=len(a.ckpt.keys()),
                         vision_tensors=len(origin.vision.keys()) if origin and origin.vision else 0,
                         same_as_adapter_base=0)
    if link and out_path.parent.exists() and not same_filesystem(base.root, out_path.parent):
        result.layout = "copy"
        result.notes.append("--link: the base and the output are on different filesystems, so the shards were copied")
    family = cfg.family_obj
    if ref is not None:
        total = 2 * sum(base.info(k).nbytes for k in base.keys())
        step = (lambda n: progress("compare", n, total)) if progress else None
        result.drift = compare(base, ref, family, fused_layers=a.fusion.layers, was=input_name(was),
                               expected=a.base_digests, algorithm=algorithm, progress=step)

    with AtomicDirectory(out_path, force=force) as staging:
        tmp = staging.tmp
        originals, file_digests = bring_originals(base, tmp, result.layout, algorithm, progress, threading.Event())
        new_digests, adapter_files = _copy_files(a.ckpt, tmp, algorithm, progress)
        vision_doc = copy_vision(origin, tmp, algorithm)
        adapter_files += [dict(f, name=f"{VISION_DIR}/{f['name']}") for f in (vision_doc or {}).get("files", [])]
        result.adapter_digest = file_digest(b"", [f["digest"] for f in adapter_files], algorithm)
        recorded = a.base_digests
        result.same_as_adapter_base = sum(recorded.get(e["name"]) == e["digest"] for e in originals)
        weight_map = {k: base.key_to_file[k] for k in base.keys()}
        weight_map.update({k: a.ckpt.key_to_file[k] for k in a.ckpt.keys()})
        write_index(tmp / INDEX_NAME, weight_map, sum(base.info(k).nbytes for k in base.keys())
                    + sum(a.ckpt.info(k).nbytes for k in a.ckpt.keys()))
        _sidecars(base, a.ckpt, tmp, result.notes)
        doc = to_hf_config(cfg, base.config)
        doc["fusion"] = a.fusion.to_dict()
        block = a.fusion.block(cfg)  # a quantized BASE: its loader's skip list gets the fusion blocks
        doc = with_fusion_skipped(doc, base, block, block.layer_prefix, block.embedding_key)
        write_json(tmp / CONFIG_NAME, public_config(doc))
        manifest = _manifest(a, base, cfg, base_path, originals, file_digests, new_digests, adapter_files,
                             vision_doc, result, algorithm)
        write_json(tmp / MANIFEST_NAME, public_manifest(manifest))
        result.files = listed_files(tmp)
        staging.commit()
    changed = sorted(e["name"] for e in a.manifest.get("new_tensors", [])
                     if isinstance(e, dict) and e.get("digest") not in (None, new_digests.get(e["name"])))
    if changed:
        result.notes.append(f"{len(changed)} adapter tensor(s) differ from the digests recorded when it was made "
                            "(trained since?)")
    return result


def _copy_files(ckpt: Checkpoint, directory: Path, algorithm: str,
                progress: StageProgress | None) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Copy every weight file of ``ckpt`` into ``directory``; (tensor digests, [{name, bytes, digest}])."""
    total = ckpt.total_bytes()
    step = (lambda n: progress("copy adapter", n, total)) if progress else None
    return copy_checkpoint_files(ckpt, directory, step, algorithm)


def _sidecars(base: Checkpoint, adapter: Checkpoint, tmp: Path, notes: list[str]) -> None:
    """The base's tokenizer and generation files; the adapter's (an image processor) where the base has none."""
    carried = set(copy_sidecars(base, tmp))
    extra = [f for f in adapter.sidecar_files() if f.name not in carried]
    for f in extra:
        shutil.copyfile(f, tmp / f.name)
    if extra:
        notes.append(f"from the adapter (the base has none): {', '.join(f.name for f in extra)}")


def _manifest(a: Adapter, base: Checkpoint, cfg: ModelConfig, base_path: Path, originals: list[dict[str, Any]],
              file_digests: dict[str, str], new_digests: dict[str, str], adapter_files: list[dict[str, Any]],
              vision_doc: dict[str, Any] | None, result: GraftResult, algorithm: str) -> dict[str, Any]:
    planned = plan_new_tensors(cfg, a.fusion)
    manifest = build_manifest(base_desc=describe_base(base, cfg, input_name(base_path), file_digests), fusion=a.fusion,
                              new=planned, new_files=dict(a.ckpt.key_to_file), new_digests=new_digests,
                              originals=originals, layout=result.layout, digest_algorithm=algorithm)
    recorded = {e["name"]: e for e in a.manifest.get("new_tensors", []) if isinstance(e, dict)}
    for entry in manifest["new_tensors"]:
        for key in ("init", "from"):
            if key in recorded.get(entry["name"], {}):
                entry[key] = recorded[entry["name"]][key]
    manifest["graft"] = {
        "adapter": {"name": input_name(a.path), "digest": result.adapter_digest,
                    "digest_of": f"{algorithm} of the adapter's weight files' digests, in the order listed",
                    "files": adapter_files, "manifest_created": a.manifest.get("created")},
        "adapter_base": a.manifest.get("base"),
        "base": {"name": input_name(base_path), "files": manifest["base"]["files"]},
        "same_as_adapter_base": {"tensors": result.same_as_adapter_base, "of": len(originals)},
        "was": result.drift.to_dict() if result.drift else None,
    }
    if ORIGIN_KEY in a.manifest:
        manifest[ORIGIN_KEY] = dict(a.manifest[ORIGIN_KEY], vision=vision_doc)
    return manifest
