"""``inspect``: describe a checkpoint (base or fused) from its safetensors headers alone.

Nothing here reads tensor data or imports torch: a 70B checkpoint inspects in milliseconds.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from ..arch.config import MODEL_TYPES, ModelConfig, read_fusion_config, read_model_config
from ..arch.discovery import family_of_checkpoint
from ..arch.families import FAMILIES, FUSION_SEGMENT, GENERIC, Family, generic_family, is_fusion_key
from ..errors import CheckpointError, UsageError
from ..io.checkpoint import Checkpoint
from ..surgery.adapter import attach_base, is_adapter
from ..surgery.consistency import fusion_problems
from ..arch.quantization import read_quantization
from ..surgery.quantized import quantization_of


@dataclass
class FusionSummary:
    """What fusion added to a checkpoint."""

    layers: list[int]
    placement: str  # "before", "after" or "unknown"
    encoder_dim: int | None
    fusion_vocab: int
    params_per_layer: dict[int, int]
    embedding_params: int
    fusion_params: int
    base_params: int
    percent_of_base: float | None
    init: str | None
    init_std: float | None
    seed: int | None
    dtype: str | None
    has_manifest: bool
    created: str | None = None
    tool_version: str | None = None


@dataclass
class TensorChange:
    name: str
    base_shape: list[int]
    shape: list[int]
    base_dtype: str
    dtype: str


@dataclass
class KeyDiff:
    """Keys of a checkpoint compared with those of its base."""

    base: str
    added: list[dict[str, Any]]
    removed: list[dict[str, Any]]
    changed: list[TensorChange]
    unchanged: int


@dataclass
class Inspection:
    """Everything ``inspect`` reports about one checkpoint."""

    path: str
    family: str
    family_description: str
    model_type: str | None
    architecture: str | None
    num_layers: int
    dim: int
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    intermediate_dim: int | None
    vocab_size: int
    tie_embeddings: bool
    rope_theta: float | None
    dtypes: dict[str, int]  # dtype -> parameter count
    num_tensors: int
    num_params: int
    nbytes: int
    files: list[dict[str, Any]]
    has_index: bool
    inferred: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fusion: FusionSummary | None = None
    diff: KeyDiff | None = None
    tensors: list[dict[str, Any]] | None = None
    layer_prefix: str = ""  # where the decoder layers are numbered ("model.layers", "transformer.h" ...)
    embedding_key: str = ""  # the token embedding's key
    forward: str = ""  # what runs the forward: "native" (fusionsurgery.modules) or "transformers"
    #: A quantized checkpoint's method, bits, format, which tensors hold quantization data and the skip lists
    #: (``quantization_summary``); None for a float one.
    quantization: dict[str, Any] | None = None

    @property
    def is_fused(self) -> bool:
        return self.fusion is not None

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["is_fused"] = self.is_fused
        if self.fusion is not None:
            doc["fusion"]["params_per_layer"] = {str(k): v for k, v in self.fusion.params_per_layer.items()}
        return doc


def inspect_checkpoint(path: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None,
                       tensors: bool = False, follow_symlinks: bool = False) -> Inspection:
    """Describe the checkpoint at ``path`` from its safetensors headers and JSON files only.

    Args:
        path: a ``.safetensors`` file or a checkpoint directory (base, fused or adapter).
        base: another checkpoint to diff keys against (added, removed, changed shape or dtype); for
            an adapter, the base it is described with.
        tensors: list every tensor (name, shape, dtype, file).
        follow_symlinks: follow symlinks leading outside the directories (``io.links``).

    Returns:
        Inspection: architecture, dtypes, sizes, files and, for a fused checkpoint, what fusion
        added (``.fusion``); ``.to_dict()`` is the ``--json`` document.

    Raises:
        CheckpointError: an unreadable or unsupported checkpoint, or an adapter whose base does not
            match its digests.

    Example:
        >>> info = fs.inspect_checkpoint("/tmp/tiny-fused")
        >>> info.is_fused, info.fusion.layers
        (True, [3, 7])
    """
    ckpt = Checkpoint.open(path, follow_symlinks=follow_symlinks)
    manifest = ckpt.read_manifest()
    if is_adapter(manifest):
        if base is None:
            out = _describe_adapter(ckpt, manifest, str(path), tensors)
            out.notes += _provenance(manifest)
            return out
        ckpt = attach_base(ckpt, Checkpoint.open(base, follow_symlinks=follow_symlinks), check=False)  # headers only: no digests here
    family = family_of_checkpoint(ckpt)
    out = _describe(ckpt, family, str(path))
    out.notes += _provenance(manifest)
    out.fusion = _fusion_summary(ckpt, family)
    if base is not None:
        out.diff = diff_keys(Checkpoint.open(base, follow_symlinks=follow_symlinks), ckpt, str(base))
    if tensors:
        out.tensors = [{"name": info.name, "shape": list(info.shape), "dtype": info.dtype, "file": name}
                       for name, info in ckpt.tensors()]
    return out


def quantization_summary(ckpt: Checkpoint) -> dict[str, Any] | None:
    """What ``inspect`` says of a quantized checkpoint: ``method``, ``bits``, ``format``, the tensors holding
    quantization data (``side_tensors``, by suffix) and packed values (``packed_tensors``), the quantized
    dtypes, how many modules are quantized, the elements of quantization data (``side_elements``: scales, zero
    points, quantization states; not counted as parameters) and the skip lists as config.json has them
    (``skip``: field -> entries); None for a float checkpoint."""
    quant = quantization_of(ckpt)
    if quant is None:
        return None
    keys = ckpt.keys()
    dtypes = {k: ckpt.info(k).dtype for k in keys}
    out = quant.to_dict(keys, dtypes)
    side = [k for k in keys if quant.is_side(k)]
    out["quantized_modules"] = len({quant.module_of(k) for k in keys if quant.is_side(k)
                                    or quant.is_packed(k, dtypes[k]) or dtypes[k].startswith("F8_")})
    out["side_elements"] = sum(ckpt.info(k).numel for k in side)
    out["side_bytes"] = sum(ckpt.info(k).nbytes for k in side)
    out["skip"] = {f: quant.config.get(f) for f in quant.skip_fields if f in quant.config}
    return out


def _param_counts(ckpt: Checkpoint) -> Counter[str]:
    """dtype -> parameters stored in it (packed values unpacked, quantization data left out)."""
    quant = quantization_of(ckpt)
    dtypes: Counter[str] = Counter()
    for _, info in ckpt.tensors():
        count = info.numel if quant is None else quant.param_count(info.name, info.dtype, info.numel)
        if count:
            dtypes[info.dtype] += count
    return dtypes


def _describe(ckpt: Checkpoint, family: Family, path: str) -> Inspection:
    dtypes = _param_counts(ckpt)
    notes: list[str] = []
    try:
        cfg: ModelConfig | None = read_model_config(ckpt)
    except UsageError as exc:  # heads unknown without a config: describe what the shapes tell
        cfg = None
        notes.append(str(exc))
    if cfg is not None:
        notes += [f"warning: the config's fusion section disagrees with the tensors: {p}"
                  for p in fusion_problems(ckpt, cfg, read_fusion_config(ckpt.config))]
    shapes = _canonical_shapes(ckpt, family)
    if "tok_embeddings.weight" not in shapes:
        raise CheckpointError(f"{path}: no token embedding {family.global_key('tok_embeddings.weight')!r}")
    vocab, dim = shapes["tok_embeddings.weight"]
    layers = {int(k.split(".")[1]) for k in shapes if k.startswith("layers.")}
    config = ckpt.config or {}
    archs = config.get("architectures")
    return Inspection(
        path=path, family=family.name, family_description=family.description,
        model_type=cfg.model_type if cfg else None,
        architecture=archs[0] if isinstance(archs, list) and archs else None,
        num_layers=cfg.num_layers if cfg else len(layers), dim=cfg.dim if cfg else dim,
        num_heads=cfg.num_heads if cfg else None, num_kv_heads=cfg.num_kv_heads if cfg else None,
        head_dim=cfg.head_dim if cfg else None, intermediate_dim=cfg.intermediate_dim if cfg else None,
        vocab_size=vocab, tie_embeddings=cfg.tie_embeddings if cfg else "output.weight" not in shapes,
        rope_theta=cfg.rope_theta if cfg else None,
        layer_prefix=family.layer_prefix.removesuffix(".{i}."), embedding_key=family.global_key("tok_embeddings.weight"),
        forward="native" if cfg is None or cfg.native else "transformers",
        dtypes=dict(sorted(dtypes.items())),
        num_tensors=len(ckpt.key_to_file), num_params=sum(dtypes.values()),
        nbytes=sum(ckpt.info(k).nbytes for k in ckpt.keys()),
        files=[{"name": name, "bytes": h.file_size, "tensors": len(h.tensors)} for name, h in ckpt.files.items()],
        has_index=ckpt.has_index, inferred=list(cfg.inferred) if cfg else [], notes=notes,
        quantization=quantization_summary(ckpt),
    )


def _describe_adapter(ckpt: Checkpoint, manifest: dict[str, Any], path: str, tensors: bool) -> Inspection:
    """An adapter (``fuse --adapter-only``) alone: the base's facts come from the manifest."""
    base = manifest.get("base") or {}
    cfg = base.get("config") or {}
    family = FAMILIES.get(base.get("family", "hf"))
    if base.get("family") == GENERIC and cfg.get("layer_prefix") and cfg.get("embedding_key"):
        family = generic_family(str(cfg["layer_prefix"]), str(cfg["embedding_key"]), str(base.get("model_type") or ""))
    if family is None:
        raise CheckpointError(f"{path}: the manifest names an unknown naming family {base.get('family')!r}")
    fusion = _fusion_summary(ckpt, family, base_params=int(base.get("num_params") or 0))
    dtypes = _param_counts(ckpt)
    out = Inspection(
        path=path, family=family.name, family_description=family.description, model_type=base.get("model_type"),
        architecture=base.get("architecture"), num_layers=cfg.get("num_layers", 0), dim=cfg.get("dim", 0),
        num_heads=cfg.get("num_heads"), num_kv_heads=cfg.get("num_kv_heads"), head_dim=cfg.get("head_dim"),
        intermediate_dim=cfg.get("intermediate_dim"), vocab_size=cfg.get("vocab_size", 0),
        tie_embeddings=bool(cfg.get("tie_embeddings")), rope_theta=cfg.get("rope_theta"),
        dtypes=dict(sorted(dtypes.items())), num_tensors=len(ckpt.key_to_file), num_params=sum(dtypes.values()),
        nbytes=sum(ckpt.info(k).nbytes for k in ckpt.keys()),
        files=[{"name": name, "bytes": h.file_size, "tensors": len(h.tensors)} for name, h in ckpt.files.items()],
        has_index=False, inferred=list(base.get("inferred") or []),
        layer_prefix=family.layer_prefix.removesuffix(".{i}."), embedding_key=family.global_key("tok_embeddings.weight"),
        forward="native" if family.name in FAMILIES and base.get("model_type") in MODEL_TYPES else "transformers",
        notes=[f"adapter (fuse --adapter-only): the {base.get('num_tensors', '?')} original tensors live in the base "
               f"{_name(base)}, named by digest in the manifest; pass --base BASE to include them"],
        fusion=fusion, quantization=_adapter_quantization(ckpt),
    )
    if tensors:
        out.tensors = [{"name": info.name, "shape": list(info.shape), "dtype": info.dtype, "file": name}
                       for name, info in ckpt.tensors()]
    return out


def _adapter_quantization(ckpt: Checkpoint) -> dict[str, Any] | None:
    """An adapter's base quantization, from its config alone (the base's tensors are elsewhere): the tensor
    facts (``side_tensors`` ... ``side_bytes``) are None."""
    quant = read_quantization(ckpt.config)
    if quant is None:
        return None
    out = quant.to_dict()
    out.update(side_tensors=None, packed_tensors=None, quantized_dtypes=None, quantized_modules=None,
               side_elements=None, side_bytes=None,
               skip={f: quant.config.get(f) for f in quant.skip_fields if f in quant.config})
    return out


def _provenance(manifest: dict[str, Any] | None) -> list[str]:
    """Where the fusion layers came from: an ``import`` (and its vision parts), a ``graft``."""
    notes = []
    origin = (manifest or {}).get("mllama")
    if isinstance(origin, dict):
        vision = origin.get("vision") or {}
        notes.append(f"imported from {origin.get('source')} ({origin.get('architecture')}); "
                     + (f"{len(vision.get('tensors', []))} vision tower and projector tensors in "
                        f"{vision.get('directory')}/" if vision else "no vision parts"))
    graft = (manifest or {}).get("graft")
    if isinstance(graft, dict):
        adapter = graft.get("adapter") or {}
        notes.append(f"graft of the adapter {_name(adapter)} (digest {str(adapter.get('digest'))[:16]}), made on "
                     f"{_name(graft.get('adapter_base') or {})}")
    return notes


def _name(section: dict[str, Any]) -> str:
    """An input's name in a manifest section (``path`` in manifests of earlier releases)."""
    return str(section.get("name") or section.get("path") or "?")


def _canonical_shapes(ckpt: Checkpoint, family: Family) -> dict[str, tuple[int, ...]]:
    return {family.to_canonical(k): ckpt.info(k).shape for k in ckpt.keys()}


def _fusion_layer_of(canonical: str) -> int | None:
    parts = canonical.split(".")
    if len(parts) > 2 and parts[0] == "layers" and parts[2] == FUSION_SEGMENT:
        return int(parts[1])
    return None


def _fusion_summary(ckpt: Checkpoint, family: Family, base_params: int = 0) -> FusionSummary | None:
    """Fusion facts from the tensors, settings from the manifest (else the config's fusion section)."""
    per_layer: dict[int, int] = {}
    embedding = 0
    k_proj_in: int | None = None
    quant = quantization_of(ckpt)
    for key in ckpt.keys():
        canonical, info = family.to_canonical(key), ckpt.info(key)
        if not is_fusion_key(canonical):
            base_params += info.numel if quant is None else quant.param_count(key, info.dtype, info.numel)
            continue
        layer = _fusion_layer_of(canonical)
        if layer is None:
            embedding += info.numel
        else:
            per_layer[layer] = per_layer.get(layer, 0) + info.numel
            if canonical.endswith(f"{FUSION_SEGMENT}.attn.k_proj.weight"):
                k_proj_in = info.shape[1]
    manifest = ckpt.read_manifest()
    cfg_fusion = read_fusion_config(ckpt.config)
    settings: dict[str, Any] = {}
    if cfg_fusion is not None:
        settings.update(cfg_fusion.to_dict())
    if manifest and isinstance(manifest.get("fusion"), dict):
        settings.update(manifest["fusion"])
    if not per_layer and not embedding and not settings:
        return None
    total = sum(per_layer.values()) + embedding
    fusion_first = settings.get("fusion_first")
    vocab_rows = next((ckpt.info(k).shape[0] for k in ckpt.keys()
                       if family.to_canonical(k) == "tok_embeddings.fusion_embedding.weight"), 0)
    return FusionSummary(
        layers=sorted(per_layer), placement="unknown" if fusion_first is None else "before" if fusion_first else "after",
        encoder_dim=k_proj_in if k_proj_in is not None else settings.get("encoder_dim"),
        fusion_vocab=vocab_rows, params_per_layer=dict(sorted(per_layer.items())), embedding_params=embedding,
        fusion_params=total, base_params=base_params,
        percent_of_base=round(100.0 * total / base_params, 4) if base_params else None,
        init=settings.get("init"), init_std=settings.get("init_std"), seed=settings.get("seed"),
        dtype=settings.get("dtype"), has_manifest=manifest is not None,
        created=(manifest or {}).get("created"), tool_version=settings.get("tool_version") or None,
    )


def diff_keys(base: Checkpoint, other: Checkpoint, base_path: str) -> KeyDiff:
    """Keys added, removed and changed (shape or dtype) from ``base`` to ``other``."""
    added = [_entry(other, k) for k in other.keys() if k not in base.key_to_file]
    removed = [_entry(base, k) for k in base.keys() if k not in other.key_to_file]
    changed: list[TensorChange] = []
    unchanged = 0
    for key in base.keys():
        if key not in other.key_to_file:
            continue
        a, b = base.info(key), other.info(key)
        if a.shape != b.shape or a.dtype != b.dtype:
            changed.append(TensorChange(key, list(a.shape), list(b.shape), a.dtype, b.dtype))
        else:
            unchanged += 1
    return KeyDiff(base_path, added, removed, changed, unchanged)


def _entry(ckpt: Checkpoint, key: str) -> dict[str, Any]:
    info = ckpt.info(key)
    return {"name": key, "shape": list(info.shape), "dtype": info.dtype, "file": ckpt.key_to_file[key]}


__all__ = ["Inspection", "FusionSummary", "KeyDiff", "TensorChange", "inspect_checkpoint", "diff_keys"]
