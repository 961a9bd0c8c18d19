"""What every export shares: opening the source, the output's place, JSON files and the export manifest."""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..arch.config import FusionConfig, ModelConfig, read_fusion_config, read_model_config
from ..io.checkpoint import Checkpoint
from ..io.digest import algorithm_of, tensor_scheme
from ..io.identity import input_name, public_config, public_manifest
from ..io.json_files import write_json  # noqa: F401  (used by the exports)
from ..io.outputs import check_output_location, copy_sidecars, default_output  # noqa: F401  (used by the exports)
from ..surgery.consistency import require_consistent
from ..surgery.manifest import change_notes
from ..version import __version__
from .tensors import OutTensor, Part, Progress, chunks, digest_chunks, write_tensors

EXPORT_MANIFEST_NAME = "export_manifest.json"
EXPORT_FORMAT = "fusionsurgery-export"
EXPORT_VERSION = 1


@dataclass
class Source:
    """The checkpoint an export reads, described."""

    path: Path
    ckpt: Checkpoint
    cfg: ModelConfig
    fusion: FusionConfig | None
    #: The hash of the source manifest's digests (the default without one): the export's too.
    digest: str
    #: The source's ``fusion_manifest.json`` (types checked), or None.
    manifest: dict[str, Any] | None = None


@dataclass
class ExportResult:
    """What an export (or unfuse) wrote, for reports and ``--json``."""

    output: Path
    target: str
    source_family: str
    tensors: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    layer_map: list[dict[str, Any]] = field(default_factory=list)

    @property
    def transformed(self) -> list[dict[str, Any]]:
        return [t for t in self.tensors if t.get("transform")]

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output), "target": self.target, "source_family": self.source_family,
            "num_tensors": len(self.tensors),
            "transformed": [{"name": t["name"], "transform": t["transform"]} for t in self.transformed],
            "notes": self.notes, "layer_map": self.layer_map, "files": self.files,
        }


def open_source(path: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None,
                config: str | os.PathLike[str] | None = None, rope_defaults: str | None = None,
                follow_symlinks: bool = False) -> Source:
    """Open a checkpoint (an adapter output on top of its ``base``) and describe it."""
    from ..surgery.adapter import attach_base

    ckpt = Checkpoint.open(path, config=config, follow_symlinks=follow_symlinks)
    ckpt = attach_base(ckpt, Checkpoint.open(base, follow_symlinks=follow_symlinks) if base is not None else None)
    cfg = read_model_config(ckpt, rope_defaults=rope_defaults)
    fusion = read_fusion_config(ckpt.config)
    require_consistent(ckpt, cfg, fusion)
    manifest = ckpt.read_manifest()
    return Source(Path(path), ckpt, cfg, fusion, algorithm_of(manifest), manifest)


def write_source_tensors(src: Source, tensors: list[OutTensor], directory: Path, notes: list[str],
                         progress: Progress | None = None,
                         reader: Checkpoint | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """``write_tensors`` for an export; tensors whose bytes changed since fusion (against the source
    manifest's digests) are named in ``notes``. ``reader`` holds the sources when they reach beyond
    ``src.ckpt`` (an import's vision parts)."""
    reader = reader or src.ckpt
    files, digests = write_tensors(reader, tensors, directory, progress=progress, algorithm=src.digest)
    if src.manifest is not None:
        notes.extend(change_notes(src.manifest, source_digests(src, reader, tensors, digests)))
    return files, digests


def source_digests(src: Source, reader: Checkpoint, tensors: list[OutTensor], written: dict[str, str]) -> dict[str, str]:
    """The digest of every source tensor the manifest records: the written digest of a tensor
    copied verbatim, else its source hashed again (permuted, cast or assembled outputs)."""
    recorded = {e["name"] for section in ("original_tensors", "new_tensors")
                for e in (src.manifest or {}).get(section, [])}
    out: dict[str, str] = {}
    for t in tensors:
        source = verbatim_source(reader, t)
        if source is not None:
            out[source] = written[t.key]
    for key in sorted({p.source for t in tensors for p in t.parts if p.source in recorded} - set(out)):
        info = reader.info(key)
        out[key] = digest_chunks(chunks(reader, OutTensor(key, info.dtype, info.shape, [Part(key)])), src.digest)
    return out


def verbatim_source(ckpt: Checkpoint, t: OutTensor) -> str | None:
    """The source tensor whose bytes ``t`` holds unchanged (so its digest is the output's), if any."""
    if len(t.parts) != 1 or t.parts[0].source is None or t.parts[0].head_perm or t.parts[0].first_row:
        return None
    info = ckpt.info(t.parts[0].source)
    return t.parts[0].source if (info.dtype, info.shape) == (t.dtype, t.shape) else None


def tensor_entries(tensors: list[OutTensor], files: dict[str, str], digests: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {"name": t.key, "shape": list(t.shape), "dtype": t.dtype, "file": files[t.key], "digest": digests[t.key],
         "from": t.sources, "transform": t.transform}
        for t in tensors
    ]


def export_manifest(src: Source, target: str, entries: list[dict[str, Any]], notes: list[str],
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``export_manifest.json``: every tensor with its digest and sources; ``transform`` says how a
    tensor's bytes differ from its source's (null: the very same bytes, only the name may differ).
    The source is named (``io.identity.input_name``), never located."""
    return public_manifest({
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "tool": {"name": "fusionsurgery", "version": __version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "digest_algorithm": src.digest,
        "digest_scheme": tensor_scheme(src.digest),
        "target": target,
        "source": {
            "name": source_name(src), "family": src.cfg.family, "model_type": src.cfg.model_type,
            "fused_layers": src.fusion.layers if src.fusion else [],
            "files": [{"name": n, "bytes": h.file_size} for n, h in src.ckpt.files.items()],
        },
        **(extra or {}),
        "notes": notes,
        "transformed": [{"name": e["name"], "from": e["from"], "transform": e["transform"]}
                        for e in entries if e["transform"]],
        "tensors": entries,
    })


def source_name(src: Source) -> str:
    """The export source's name for manifests: never its path."""
    return input_name(src.path)


def listed_files(directory: Path) -> list[dict[str, Any]]:
    """Every file under ``directory`` (a sub-directory's as ``sub/name``) with its size."""
    return [{"name": f.relative_to(directory).as_posix(), "bytes": f.stat().st_size}
            for f in sorted(directory.rglob("*")) if f.is_file()]
