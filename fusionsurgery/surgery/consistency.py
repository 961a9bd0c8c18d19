"""Does a checkpoint's ``fusion`` section agree with the fusion tensors it holds, and does it hold the
original tensors its manifest lists? (headers only)

Every command that reads a fused checkpoint asks this before trusting the config: ``verify``
reports each disagreement as a failed check; ``export``, ``unfuse``, ``load_fused`` and
``fusionsurgery.hf`` refuse the checkpoint in one line (``require_consistent``); ``inspect``
describes it with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..arch.config import FusionConfig, ModelConfig
from ..arch.families import Family, is_fusion_key
from ..errors import CheckpointError, FusionSurgeryError, listed
from ..io.checkpoint import Checkpoint
from .plan import NewTensor, plan_new_tensors
from .quantized import quantization_problems


def is_fusion_name(family: Family, key: str) -> bool:
    """Whether ``key`` names a tensor fusion added (in ``family``'s dialect)."""
    return family.knows(key) and is_fusion_key(family.to_canonical(key))


@dataclass(frozen=True)
class Mismatch:
    """A planned fusion tensor the checkpoint lacks (``found`` None) or holds with another shape or dtype."""

    planned: NewTensor
    found: tuple[tuple[int, ...], str] | None  # (shape, dtype) in the checkpoint


def mismatches(ckpt: Checkpoint, planned: list[NewTensor]) -> list[Mismatch]:
    """How the checkpoint's tensors disagree with ``planned``, in the plan's order.

    Args:
        ckpt: the checkpoint (headers only are read).
        planned: the tensors a fusion section implies (``plan_new_tensors``).

    Returns:
        One ``Mismatch`` per planned tensor that is missing or of another shape or dtype.
    """
    found = []
    for t in planned:
        if t.key not in ckpt.key_to_file:
            found.append(Mismatch(t, None))
        else:
            info = ckpt.info(t.key)
            if (info.shape, info.dtype) != (t.shape, t.dtype):
                found.append(Mismatch(t, (info.shape, info.dtype)))
    return found


def planned_tensors(ckpt: Checkpoint, cfg: ModelConfig, fusion: FusionConfig) -> tuple[list[NewTensor], list[str]]:
    """The fusion tensors ``fusion`` implies, and how the checkpoint's tensors disagree with them.

    Problems: layers outside the model or repeated, a section the planner refuses, planned tensors
    missing or of another shape or dtype. Each names the tensors.
    """
    bad_layers = [i for i in fusion.layers if not 0 <= i < cfg.num_layers]
    if bad_layers or len(set(fusion.layers)) != len(fusion.layers) or not fusion.layers:
        return [], [f"config.json fusion.layers {fusion.layers} are not distinct layers of 0..{cfg.num_layers - 1}"]
    try:
        planned = plan_new_tensors(cfg, fusion)
    except FusionSurgeryError as exc:
        return [], [f"config.json fusion section: {exc}"]
    problems: list[str] = []
    wrong = mismatches(ckpt, planned)
    missing = [m.planned.key for m in wrong if m.found is None]
    if missing:
        problems.append(f"{len(missing)} fusion tensor(s) missing: {listed(missing)}")
    for m in wrong:
        if m.found is not None:
            t = m.planned
            problems.append(f"wrong shape or dtype: {t.key} is {list(m.found[0])} {m.found[1]}, expected "
                            f"{list(t.shape)} {t.dtype}")
    return planned, problems


def fusion_problems(ckpt: Checkpoint, cfg: ModelConfig, fusion: FusionConfig | None,
                    quantized: bool = True) -> list[str]:
    """Every way the config's fusion section (or its absence) disagrees with the fusion tensors; with
    ``quantized``, also a ``quantization_config`` whose skip list leaves fusion blocks to be quantized."""
    family = cfg.family_obj
    present = [k for k in ckpt.keys() if is_fusion_name(family, k)]
    if fusion is None:
        return [f"{len(present)} fusion tensor(s) but config.json has no 'fusion' section: {listed(present)}"] \
            if present else []
    planned, problems = planned_tensors(ckpt, cfg, fusion)
    if planned:
        expected = {t.key for t in planned}
        unplanned = [k for k in present if k not in expected]
        if unplanned:
            problems.append(f"{len(unplanned)} fusion tensor(s) the config's fusion section does not imply: "
                            f"{listed(unplanned)}")
        if quantized:
            block = fusion.block(cfg)
            problems += quantization_problems(ckpt.config, block, block.layer_prefix, block.embedding_key)
    return problems


def original_problems(ckpt: Checkpoint, originals: list[dict[str, Any]], dtypes: bool = True,
                      family: Family | None = None) -> list[str]:
    """How the checkpoint disagrees with the original tensors a manifest lists (headers only).

    Args:
        ckpt: the checkpoint (a fused one, or an adapter already attached to its base).
        originals: the manifest's ``original_tensors`` entries (``name``, ``shape``, ``dtype`` each).
        dtypes: compare dtypes too (not for another base of the same model, which ``graft`` takes in any dtype).
        family: the checkpoint's naming family: a tensor neither listed nor a fusion tensor is a problem too.

    Returns:
        One problem naming every missing tensor (``listed``), one per tensor of another shape or dtype,
        and one naming the tensors neither listed nor fusion tensors (with ``family``).
    """
    missing = [e["name"] for e in originals if e["name"] not in ckpt.key_to_file]
    problems = [f"{len(missing)} original tensor(s) listed in the manifest are missing: {listed(missing)}"] \
        if missing else []
    for e in originals:
        if e["name"] in ckpt.key_to_file:
            info = ckpt.info(e["name"])
            if list(info.shape) != list(e["shape"]) or (dtypes and info.dtype != e["dtype"]):
                problems.append(f"original tensor {e['name']} is {list(info.shape)} {info.dtype}, the manifest "
                                f"says {list(e['shape'])} {e['dtype']}")
    if family is not None and originals:
        known = {e["name"] for e in originals}
        extra = [k for k in ckpt.keys() if k not in known and not is_fusion_name(family, k)]
        if extra:
            problems.append(f"{len(extra)} unexplained tensor(s), neither original (the manifest) nor fusion: "
                            f"{listed(extra)}")
    return problems


def require_consistent(ckpt: Checkpoint, cfg: ModelConfig, fusion: FusionConfig | None,
                       quantized: bool = True) -> None:
    """Refuse (one line, exit 2) a checkpoint whose fusion section disagrees with its tensors, or that lacks
    (or holds in another shape or dtype) an original tensor its ``fusion_manifest.json`` lists (``quantized``:
    or whose ``quantization_config`` would let its loader quantize the fusion blocks; ``unfuse`` reads such a
    checkpoint, since its output drops them).

    An adapter (``fuse --adapter-only``) is checked once attached to its base (``attach_base``): alone it
    holds none of the original tensors its manifest lists.

    Raises:
        CheckpointError: the first problem, naming the tensors, and how many more ``verify`` lists.
    """
    problems = fusion_problems(ckpt, cfg, fusion, quantized)
    what = "the config's fusion section disagrees with the tensors"
    if not problems:
        manifest = ckpt.read_manifest()
        problems = original_problems(ckpt, (manifest or {}).get("original_tensors", []), family=cfg.family_obj)
        what = "the tensors disagree with fusion_manifest.json"
    if problems:
        more = f" (and {len(problems) - 1} more problem(s); `fusionsurgery verify` lists them)" if len(problems) > 1 else ""
        raise CheckpointError(f"{ckpt.root}: {what}: {problems[0]}{more}")
