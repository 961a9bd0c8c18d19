"""``fusion_manifest.json``: what a fused checkpoint holds, with digests that make it checkable alone."""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict
from collections.abc import Mapping
from typing import Any

from ..arch.config import FusionConfig, ModelConfig
from ..errors import listed
from ..io.checkpoint import Checkpoint
from ..io.digest import DEFAULT_ALGORITHM, scheme
from ..io.identity import hub_id
from ..version import __version__
from .plan import NewTensor
from .quantized import param_count

MANIFEST_FORMAT = "fusionsurgery-manifest"
MANIFEST_VERSION = 1


def describe_base(base: Checkpoint, cfg: ModelConfig, name: str, file_digests: dict[str, str]) -> dict[str, Any]:
    """The base's identity: its name (``io.identity.input_name``: never a local path), files (size,
    digest), architecture, counts; ``hub_id`` when its config names one."""
    return {
        "name": name,
        **({"hub_id": hub_id(base.config)} if hub_id(base.config) else {}),
        "family": cfg.family,
        "model_type": cfg.model_type,
        "architecture": (base.config or {}).get("architectures", [None])[0] if base.config else None,
        "config": {k: v for k, v in asdict(cfg).items() if k != "inferred"},
        "inferred": list(cfg.inferred),
        "files": [
            {"name": name, "bytes": h.file_size, "digest": file_digests.get(name), "tensors": len(h.tensors)}
            for name, h in base.files.items()
        ],
        "num_tensors": len(base.key_to_file),
        "num_params": param_count(base),  # packed weights unpacked, scales not counted
        "bytes": base.total_bytes(),
    }


def build_manifest(*, base_desc: dict[str, Any], fusion: FusionConfig, new: list[NewTensor],
                   new_files: dict[str, str], new_digests: dict[str, str], originals: list[dict[str, Any]],
                   layout: str = "copy", digest_algorithm: str = DEFAULT_ALGORITHM) -> dict[str, Any]:
    """The whole manifest document. ``layout``: how the originals reached the output (copy, link)
    or that they did not (adapter: only the new tensors, the base named by its digests)."""
    fusion_params = sum(t.numel for t in new)
    base_params = base_desc["num_params"]
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "tool": {"name": "fusionsurgery", "version": __version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "digest_algorithm": digest_algorithm,
        "digest_scheme": scheme(digest_algorithm),
        "layout": layout,
        "base": base_desc,
        "fusion": fusion.to_dict(),
        "new_tensors": [
            {
                "name": t.key, "shape": list(t.shape), "dtype": t.dtype, "numel": t.numel, "init": t.init_text,
                "layer": t.layer, "trainable": True, "file": new_files[t.key], "digest": new_digests[t.key],
            }
            for t in new
        ],
        "original_tensors": originals,
        "totals": {
            "base_params": base_params,
            "fusion_params": fusion_params,
            "fusion_percent_of_base": round(100.0 * fusion_params / base_params, 4) if base_params else None,
            "total_params": base_params + fusion_params,
        },
    }


def changed_since_fusion(manifest: Mapping[str, Any] | None,
                         actual: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """(original, fusion) tensors whose digest in ``actual`` differs from the one the manifest recorded.

    Only tensors present in both are compared; the digests must use the manifest's algorithm.
    """
    if not manifest:
        return [], []

    def differ(section: str) -> list[str]:
        return [e["name"] for e in manifest.get(section, [])
                if e["name"] in actual and e.get("digest") != actual[e["name"]]]

    return differ("original_tensors"), differ("new_tensors")


def change_notes(manifest: Mapping[str, Any] | None, actual: Mapping[str, str]) -> list[str]:
    """Notes naming the tensors changed since fusion (the first few, and how many), for reports."""
    originals, fusion = changed_since_fusion(manifest, actual)
    notes = []
    if originals:
        notes.append(f"{len(originals)} original tensor(s) differ from the digests recorded at fusion "
                     f"(trained or damaged since?): {listed(originals)}")
    if fusion:
        notes.append(f"{len(fusion)} fusion tensor(s) changed since fusion (trained?): {listed(fusion)}")
    return notes
