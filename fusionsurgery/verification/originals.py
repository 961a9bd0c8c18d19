"""Check 2, originals intact: every original tensor bit-identical to the base (or the manifest's digests).

Hashes each file once, sequentially (per tensor, with the manifest's algorithm). No torch.
"""

from __future__ import annotations

import os

from ..io.checkpoint import Checkpoint
from ..io.digest import DEFAULT_ALGORITHM, algorithm_of, tensor_digests
from ..surgery.manifest import changed_since_fusion
from .report import CheckResult
from ..errors import listed
from .structure import Layout
from ..io.progress import Progress

NAME, TITLE = "originals", "Originals intact: every original tensor bit-identical"


def checkpoint_digests(ckpt: Checkpoint, progress: Progress | None = None, algorithm: str = DEFAULT_ALGORITHM,
                       seen: dict[tuple[int, ...], dict[str, str]] | None = None) -> dict[str, str]:
    """The digest of every tensor's bytes, reading each file once.

    ``seen`` remembers files already digested (by device, inode, size and mtime), so a file shared
    by two checkpoints (an adapter's base, a --link output's shards) is read once, not twice.
    """
    seen = {} if seen is None else seen
    out: dict[str, str] = {}
    for name, header in ckpt.files.items():
        path = ckpt.path_of(name)
        st = os.stat(path)
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if ident not in seen:
            seen[ident] = tensor_digests(path, header, progress, algorithm)[0]
        out.update(seen[ident])
    return out


def check_originals(ckpt: Checkpoint, layout: Layout, base: Checkpoint | None = None,
                    progress: Progress | None = None) -> CheckResult:
    """Compare original tensors with ``base`` when given and with the manifest's digests when present."""
    result = CheckResult(NAME, TITLE)
    manifest = layout.manifest
    if base is None and manifest is None:
        result.fail("nothing to compare with: no fusion_manifest.json and no --base")
        return result.finish("", "no reference for the original tensors")
    algorithm = algorithm_of(manifest)
    seen: dict[tuple[int, ...], dict[str, str]] = {}
    actual = checkpoint_digests(ckpt, progress, algorithm, seen)
    originals = [k for k in layout.original_keys if k in actual]
    sources = []
    if manifest is not None:
        sources.append("manifest digests")
        differ, trained = changed_since_fusion(manifest, actual)
        if differ:
            result.fail(f"{len(differ)} original tensor(s) differ from their manifest digests: {listed(differ)}")
        if trained:  # new tensors changed since fusion were trained (or edited): reported, not failed
            result.notes.append(f"{len(trained)} fusion tensor(s) changed since fusion (trained?): {listed(trained)}")
        result.figures["changed_fusion_tensors"] = trained
    if layout.origin is not None and layout.origin.vision is not None:
        _compare_vision(layout, progress, algorithm, seen, result)
    if base is not None:
        sources.append("--base")
        _compare_with_base(ckpt, base, actual, set(layout.original_keys), result, progress, algorithm, seen)
    nbytes = sum(ckpt.info(k).nbytes for k in originals)
    result.figures.update({"original_tensors": len(originals), "original_bytes": nbytes, "against": sources})
    return result.finish(f"{len(originals)} original tensors ({nbytes:,} bytes) bit-identical "
                         f"(checked against {' and '.join(sources)})")


def _compare_vision(layout: Layout, progress: Progress | None, algorithm: str,
                    seen: dict[tuple[int, ...], dict[str, str]], result: CheckResult) -> None:
    """An import's vision parts against the digests recorded at import: part of the adapter, so a
    change is reported (trained?), not failed; their presence is the structure check's."""
    origin = layout.origin
    assert origin is not None and origin.vision is not None
    actual = checkpoint_digests(origin.vision, progress, algorithm, seen)
    changed = sorted(k for k, d in origin.vision_digests.items() if d and actual.get(k) != d)
    if changed:
        result.notes.append(f"{len(changed)} vision tensor(s) changed since import (trained?): {listed(changed)}")
    result.figures["vision_tensors"] = len(actual)
    result.figures["changed_vision_tensors"] = changed


def _compare_with_base(ckpt: Checkpoint, base: Checkpoint, actual: dict[str, str], originals: set[str],
                       result: CheckResult, progress: Progress | None, algorithm: str,
                       seen: dict[tuple[int, ...], dict[str, str]]) -> None:
    missing = [k for k in base.keys() if k not in ckpt.key_to_file]
    if missing and len(missing) == len(base.keys()) and originals:
        result.fail(f"the base shares no tensor name with the fused checkpoint (base {listed(missing[:1])}, fused "
                    f"{listed(sorted(originals)[:1])}): the two use different names; an export (--to torchtune) is "
                    "checked against a base in its own names, or against its manifest's digests alone")
        return
    base_digests = checkpoint_digests(base, progress, algorithm, seen)
    if missing:
        result.fail(f"{len(missing)} base tensor(s) missing from the fused checkpoint: {listed(missing)}")
    changed_meta, changed_bytes = [], []
    for key in base.keys():
        if key not in ckpt.key_to_file:
            continue
        a, b = base.info(key), ckpt.info(key)
        if (a.shape, a.dtype) != (b.shape, b.dtype):
            changed_meta.append(f"{key} ({list(a.shape)} {a.dtype} -> {list(b.shape)} {b.dtype})")
        elif base_digests[key] != actual[key]:
            changed_bytes.append(key)
    if changed_meta:
        result.fail(f"{len(changed_meta)} tensor(s) changed shape or dtype from the base: {listed(changed_meta)}")
    if changed_bytes:
        result.fail(f"{len(changed_bytes)} tensor(s) differ from the base's bytes: {listed(changed_bytes)}")
    foreign = sorted(originals - set(base.keys()))
    if foreign:
        result.fail(f"{len(foreign)} tensor(s) the manifest calls original are not in the base: {listed(foreign)}")

