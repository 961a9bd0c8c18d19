"""``unfuse``: the base a fused checkpoint was made from — same keys, dtypes, shapes, bytes and config.

Shards that hold only original tensors are copied as they are (byte for byte, header included);
a shard mixing original and fusion tensors is rewritten without the fusion ones. The config loses
its ``fusion`` section; the manifest's digests, when present, confirm the originals are unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..arch.config import INFERRED_MARK, read_fusion_config, read_model_config
from ..arch.discovery import family_of_checkpoint
from ..arch.families import is_fusion_key
from ..errors import CheckpointError, UsageError, listed
from ..io.checkpoint import CONFIG_NAME, INDEX_NAME, SINGLE_NAME, Checkpoint
from ..io.copying import copy_and_digest
from ..io.digest import algorithm_of
from ..io.identity import public_config
from ..io.atomic import AtomicDirectory
from ..io.json_files import write_index
from ..io.writer import SafetensorsWriter
from ..surgery.consistency import require_consistent
from ..surgery.manifest import changed_since_fusion
from ..surgery.quantized import base_config_of
from .common import check_output_location, copy_sidecars, default_output, listed_files, write_json
from .tensors import Part, chunks, OutTensor, Progress


@dataclass
class UnfuseResult:
    output: Path
    removed: list[str] = field(default_factory=list)
    kept: int = 0
    modified: list[str] = field(default_factory=list)  # originals whose digests differ from the manifest's
    notes: list[str] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"output": str(self.output), "removed_tensors": len(self.removed), "kept_tensors": self.kept,
                "modified_since_fuse": self.modified, "notes": self.notes, "files": self.files}


def unfuse(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *, force: bool = False,
           follow_symlinks: bool = False, progress: Progress | None = None) -> UnfuseResult:
    """Write the base of the fused checkpoint at ``path``: the same keys, dtypes, shapes and bytes.

    Args:
        path: the fused checkpoint directory.
        out: the output directory (default ``<name>-unfused`` beside ``path``).
        force: replace an existing output (only once the new one is complete).
        follow_symlinks: follow a symlink in ``path`` that leads outside it (``io.links``); refused otherwise.
        progress: told how many bytes were copied.

    Returns:
        UnfuseResult: the output, the removed fusion tensors, the kept count, notes and files.

    Raises:
        CheckpointError: not a fused checkpoint, an adapter, or an unreadable or inconsistent one.
        UsageError: an output inside the input, or an existing output without ``force``.

    Example:
        >>> result = fs.unfuse("/tmp/tiny-fused", "/tmp/tiny-base", force=True)
        >>> len(result.removed), result.kept  # 13 fusion tensors per fused layer gone, every original kept
        (26, 75)
    """
    src = Path(path)
    ckpt = Checkpoint.open(src, follow_symlinks=follow_symlinks)
    manifest = ckpt.read_manifest()
    if manifest is not None and manifest.get("layout") == "adapter":
        raise UsageError(f"{src} is an adapter (fuse --adapter-only): it holds no base tensors; its base is the "
                         "checkpoint it names")
    family = family_of_checkpoint(ckpt)
    fusion_keys = [k for k in ckpt.keys() if is_fusion_key(family.to_canonical(k))]
    fusion = read_fusion_config(ckpt.config)
    if not fusion_keys and fusion is None:
        raise UsageError(f"{src} is not a fused checkpoint (no fusion tensors and no 'fusion' section in "
                         "config.json); nothing to unfuse")
    if not fusion_keys:
        raise CheckpointError(f"{src}: config.json has a 'fusion' section but the checkpoint has no fusion tensors")
    require_consistent(ckpt, read_model_config(ckpt), fusion, quantized=False)  # what remains must be a complete decoder
    out_path = Path(out) if out is not None else default_output(src, "unfused")
    check_output_location(src, out_path)

    algorithm = algorithm_of(manifest)
    dropped = set(fusion_keys)
    result = UnfuseResult(out_path, removed=sorted(dropped))
    with AtomicDirectory(out_path, force=force) as staging:
        tmp = staging.tmp
        weight_map: dict[str, str] = {}
        digests: dict[str, str] = {}
        total = 0
        for name, header in ckpt.files.items():
            keep = [k for k in header.tensors if k not in dropped]
            if not keep:
                continue
            if len(keep) == len(header.tensors):
                file_digests, _ = copy_and_digest(ckpt.path_of(name), tmp / name, header, progress,
                                                  algorithm=algorithm)
                digests.update(file_digests)
            else:
                digests.update(_rewrite_without(ckpt, name, keep, tmp / name, progress, algorithm))
            for k in keep:
                weight_map[k] = name
                total += header.tensors[k].nbytes
        result.kept = len(weight_map)
        result.modified = changed_since_fusion(manifest, digests)[0]
        if result.modified:
            result.notes.append(f"{len(result.modified)} original tensor(s) differ from the digests recorded at "
                                f"fusion (trained or damaged since?): {listed(result.modified)}; the output holds "
                                "them as they are now")
        if set(weight_map.values()) != {SINGLE_NAME}:
            write_index(tmp / INDEX_NAME, weight_map, total)
        doc = base_config_of(ckpt.config) if ckpt.config is not None else None  # a quantized base's list back
        if doc is not None:
            if INFERRED_MARK in doc:
                result.notes.append("the base had no config.json (the fused one was inferred from shapes): none written")
            else:
                write_json(tmp / CONFIG_NAME, public_config(doc))
        copy_sidecars(ckpt, tmp)
        result.files = listed_files(tmp)
        staging.commit()
    return result


def _rewrite_without(ckpt: Checkpoint, name: str, keep: list[str], dst: Path, progress: Progress | None,
                     algorithm: str) -> dict[str, str]:
    """Shard ``name`` with only the tensors ``keep`` (in file order, same metadata), streamed."""
    header = ckpt.files[name]
    entries = [(k, header.tensors[k].dtype, header.tensors[k].shape) for k in keep]
    digests: dict[str, str] = {}
    with SafetensorsWriter(dst, entries, header.metadata or None, algorithm) as writer:
        for k, dtype, shape in entries:
            digests[k] = writer.write(k, chunks(ckpt, OutTensor(k, dtype, shape, [Part(k)])), progress)
    return digests
