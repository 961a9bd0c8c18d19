"""Adapter outputs (``fuse --adapter-only``): the new tensors alone, the base named by its digests."""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError, UsageError, listed
from ..io.checkpoint import Checkpoint
from ..io.digest import algorithm_of, tensor_digests
from ..io.identity import public_text


def is_adapter(manifest: dict[str, Any] | None) -> bool:
    return bool(manifest) and manifest.get("layout") == "adapter"


def made_on(manifest: dict[str, Any] | None) -> str:
    """``; it was made on 'NAME'``, as the adapter's manifest names its base (an earlier release's
    path cut to its last part), or nothing: the tail of a message asking for the base."""
    base = (manifest or {}).get("base") or {}
    name = base.get("name") or base.get("path")
    return f"; it was made on {public_text(name)!r}" if isinstance(name, str) and name else ""


def check_base(base: Checkpoint, manifest: dict[str, Any]) -> None:
    """Refuse a base whose files or tensor digests differ from those the adapter was made from."""
    expected = {f["name"]: f for f in manifest.get("base", {}).get("files", [])}
    if set(base.files) != set(expected):
        raise CheckpointError(
            f"{base.root}: not the adapter's base (files {sorted(base.files)} vs {sorted(expected)})")
    originals = {t["name"]: t for t in manifest.get("original_tensors", [])}
    algorithm = algorithm_of(manifest)
    for name, header in base.files.items():
        if header.file_size != expected[name].get("bytes"):
            raise CheckpointError(f"{base.root}: {name} has {header.file_size} bytes, the adapter's base had "
                                  f"{expected[name].get('bytes')}; not the adapter's base")
        digests, file_digest = tensor_digests(base.path_of(name), header, algorithm=algorithm)
        if file_digest != expected[name].get("digest"):
            differ = sorted(k for k, d in digests.items() if originals.get(k, {}).get("digest") != d)
            what = f"{len(differ)} tensor(s): {listed(differ)}" if differ else "its header"
            raise CheckpointError(f"{base.root}: {name} differs from the adapter's base ({what}); refused")


def attach_base(adapter: Checkpoint, base: Checkpoint | None, *, check: bool = True) -> Checkpoint:
    """One checkpoint view of an adapter on top of its (verified) base."""
    manifest = adapter.read_manifest()
    if not is_adapter(manifest):
        if base is not None:
            raise UsageError(f"{adapter.root} is not an adapter (fuse --adapter-only); it needs no base")
        return adapter
    if base is None:
        raise UsageError(f"{adapter.root} holds only the fusion tensors (fuse --adapter-only): give its base "
                         f"(`base` BASE){made_on(manifest)}")
    if check:
        check_base(base, manifest)
    return Checkpoint.combine(base, adapter)
