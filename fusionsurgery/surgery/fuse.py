"""The fuse engine: base checkpoint in, fused checkpoint directory out, one tensor at a time.

One thread brings the base's shard files over (copied, written around the page cache where the
filesystem allows, or hard-linked) and digests them on the way, while the main thread writes the
new tensors, whose chunks a pool of ``GENERATOR_THREADS`` creates ahead of it. Nothing holds more
than a few chunks in memory.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from ..arch.config import FusionConfig, ModelConfig, read_model_config, to_hf_config
from ..arch.discovery import family_of_checkpoint
from ..arch.families import is_fusion_key
from ..errors import CheckpointError, UsageError, listed
from ..io.checkpoint import CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, Checkpoint
from ..io.copying import Cancelled, copy_and_digest, link_and_digest, same_filesystem
from ..io.digest import tensor_digests
from ..io.progress import StageProgress
from ..io.identity import input_name, public_config, public_manifest
from ..io.atomic import AtomicDirectory
from ..io.json_files import write_index, write_json
from ..io.outputs import check_output_location, copy_sidecars, default_output
from ..io.writer import SafetensorsWriter, group_into_shards
from ..version import __version__
from .init import chunk_stream, num_chunks
from .manifest import build_manifest, describe_base
from .options import DTYPE_CHOICES, FuseOptions
from .plan import NewTensor, check_copy_sources, plan_new_tensors
from .quantized import param_count, quantization_of, with_fusion_skipped
from .selection import select_layers

#: Threads creating new-weight chunks (numpy fills arrays without the GIL).
GENERATOR_THREADS = max(1, min(4, os.cpu_count() or 1))


@dataclass
class FuseResult:
    """What ``fuse`` did, for reports and ``--json`` (``to_dict()``).

    Attributes:
        output: the fused directory.
        config: the base's architecture.
        fusion: the fusion settings written into ``config.json``.
        new_tensors: every tensor fusion added (key, shape, dtype, init).
        layout: ``copy``, ``link`` or ``adapter``.
        files: ``{"name", "bytes", "linked"}`` of every file written.
        base_params: the base's parameter count.
        notes: what the report should say besides (shards copied instead of linked ...).
    """

    output: Path
    config: ModelConfig
    fusion: FusionConfig
    new_tensors: list[NewTensor]
    layout: str = "copy"
    files: list[dict[str, Any]] = field(default_factory=list)
    base_params: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def fusion_params(self) -> int:
        return sum(t.numel for t in self.new_tensors)

    def params_per_layer(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for t in self.new_tensors:
            if t.layer is not None:
                out[t.layer] = out.get(t.layer, 0) + t.numel
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "layout": self.layout,
            "family": self.config.family,
            "model_type": self.config.model_type,
            "native": self.config.native,
            "layer_prefix": self.fusion.layer_prefix,
            "embedding_key": self.fusion.embedding_key,
            "num_layers": self.config.num_layers,
            "inferred": self.config.inferred,
            "fused_layers": self.fusion.layers,
            "fusion_first": self.fusion.fusion_first,
            "encoder_dim": self.fusion.encoder_dim,
            "fusion_vocab": self.fusion.fusion_vocab,
            "init": self.fusion.init,
            "seed": self.fusion.seed,
            "dtype": self.fusion.dtype,
            "params_per_layer": {str(k): v for k, v in self.params_per_layer().items()},
            "base_params": self.base_params,
            "fusion_params": self.fusion_params,
            "fusion_percent_of_base": round(100.0 * self.fusion_params / self.base_params, 4) if self.base_params else None,
            "files": self.files,
            "notes": self.notes,
        }


def fused_layers_of(ckpt: Checkpoint, layer_prefix: str | None = None) -> list[int]:
    """Layer indices that hold fusion tensors (``layer_prefix``: the layer list a user named)."""
    family = family_of_checkpoint(ckpt, layer_prefix)
    canon = (family.to_canonical(k) for k in ckpt.keys())
    return sorted({int(c.split(".")[1]) for c in canon if is_fusion_key(c) and c.startswith("layers.")})


def check_not_fused(ckpt: Checkpoint, layer_prefix: str | None = None) -> None:
    """Refuse a checkpoint that already holds fusion layers."""
    fused = fused_layers_of(ckpt, layer_prefix)
    if fused or (ckpt.config or {}).get("fusion") or (ckpt.is_dir and (ckpt.root / MANIFEST_NAME).exists()):
        where = f" (fused layers {fused})" if fused else ""
        raise UsageError(
            f"{ckpt.root} is already a fused checkpoint{where}; fuse its base instead "
            "(`fusionsurgery unfuse` gives the base back)"
        )


def fuse(base: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, options: FuseOptions | None = None,
         *, force: bool = False, progress: StageProgress | None = None, **settings: Any) -> FuseResult:
    """Fuse gated cross-attention layers into a decoder checkpoint and write the fused directory.

    Every original tensor keeps its key and bytes (its shard file is copied as is, or hard-linked
    with ``link``, or left out with ``adapter_only``); the new tensors go to
    ``fusion-*.safetensors`` files; an index maps every key; ``config.json`` gains a ``fusion``
    section; ``fusion_manifest.json`` records settings and digests (``digest``: blake3 or sha256)
    and names the base by its name, never its path. A symlink in the base leading outside it is
    refused unless ``follow_symlinks`` (``io.links``).

    Args:
        base: a ``.safetensors`` file, or a directory with ``model.safetensors`` or shards and an index.
        out: the output directory (default ``<base name>-fused`` beside the base).
        options: what to fuse and how (``FuseOptions``, whose fields the CLI's flags are).
        force: replace an existing output (only once the new one is complete).
        progress: told ``(stage, bytes, total)`` as originals are copied and new weights written.
        **settings: ``FuseOptions`` fields as keywords (``every=4, seed=1``), over ``options``.

    Returns:
        FuseResult: the output, the base's config, the fusion settings, the new tensors, the files
        written and notes.

    Raises:
        UsageError: an option that cannot be honoured (named), an already fused base, an output
            inside the base or existing without ``force``.
        CheckpointError: an unreadable, unsupported or inconsistent base.
        TypeError: a keyword that is not a ``FuseOptions`` field.

    Example:
        >>> import fusionsurgery as fs
        >>> result = fs.fuse("examples/tiny-llama", "/tmp/tiny-fused", every=4, force=True)
        >>> result.fusion.layers  # (i + 1) % 4 == 0 of 8 layers
        [3, 7]
    """
    opts = (options or FuseOptions()).with_settings(settings)
    opts.check()
    base_path = Path(base)
    ckpt = Checkpoint.open(base_path, config=opts.config, follow_symlinks=opts.follow_symlinks)
    check_not_fused(ckpt, opts.layer_prefix)
    cfg = read_model_config(ckpt, num_heads=opts.num_heads, num_kv_heads=opts.num_kv_heads,
                            rope_defaults=opts.rope_defaults, layer_prefix=opts.layer_prefix)
    chosen = select_layers(cfg.num_layers, opts.every, opts.layers)
    fusion = _fusion_config(cfg, ckpt, chosen, opts)
    new = plan_new_tensors(cfg, fusion)
    check_copy_sources(ckpt, cfg, new)
    out_path = Path(out) if out is not None else default_output(base_path, "fused")
    check_output_location(base_path, out_path)
    layout = "adapter" if opts.adapter_only else "link" if opts.link else "copy"
    digest = opts.digest
    quant = quantization_of(ckpt)
    result = FuseResult(out_path, cfg, fusion, new, layout, base_params=param_count(ckpt))
    if quant is not None:
        result.notes.append(f"quantized base ({quant.detail}): its tensors are kept as they are, the fusion blocks "
                            f"are {fusion.dtype} and config.json's quantization_config keeps them out "
                            f"({' / '.join(quant.skip_fields)})")
    if not cfg.native and quant is not None:
        result.notes.append(f"a quantized {cfg.model_type} (layers under {fusion.layer_prefix}.N.): its forward "
                            "(verify's model checks, loading, generation, training) runs through transformers' own "
                            "class, which reads the format (pip install \"fusionsurgery[hf]\")")
    elif not cfg.native:
        result.notes.append(f"model type {cfg.model_type} (layers under {fusion.layer_prefix}.N.) has no native "
                            "modules: its forward (verify's model checks, loading, generation, training) runs "
                            "through transformers' own class (pip install \"fusionsurgery[hf]\")")
    if layout == "link" and out_path.parent.exists() and not same_filesystem(ckpt.root, out_path.parent):
        result.layout = layout = "copy"
        result.notes.append("--link: the base and the output are on different filesystems, so the shards were copied")

    cancel = threading.Event()
    with AtomicDirectory(out_path, force=force) as staging:
        tmp = staging.tmp
        with ThreadPoolExecutor(1, thread_name_prefix="originals") as mover, \
                ThreadPoolExecutor(GENERATOR_THREADS, thread_name_prefix="init") as generator:
            try:
                originals_job = mover.submit(bring_originals, ckpt, tmp, layout, digest, progress, cancel)
                new_files, new_digests = _write_new(ckpt, new, fusion.seed, tmp, digest, progress, generator)
                originals, file_digests = originals_job.result()
            except BaseException:
                cancel.set()
                raise
        if layout != "adapter":
            _write_index(tmp, ckpt, new, new_files)
            copy_sidecars(ckpt, tmp)
        doc = to_hf_config(cfg, ckpt.config)
        doc["fusion"] = fusion.to_dict()
        doc = with_fusion_skipped(doc, ckpt, fusion, fusion.layer_prefix, fusion.embedding_key)
        write_json(tmp / CONFIG_NAME, public_config(doc))
        base_desc = describe_base(ckpt, cfg, input_name(base_path), file_digests)
        manifest = build_manifest(base_desc=base_desc, fusion=fusion, new=new, new_files=new_files,
                                  new_digests=new_digests, originals=originals, layout=layout,
                                  digest_algorithm=digest)
        write_json(tmp / MANIFEST_NAME, public_manifest(manifest))
        result.files = [{"name": f.name, "bytes": f.stat().st_size, "linked": f.stat().st_nlink > 1}
                        for f in sorted(tmp.iterdir())]
        copied = [f["name"] for f in result.files if layout == "link" and f["name"] in ckpt.files and not f["linked"]]
        if copied:
            result.notes.append(f"--link: {len(copied)} shard(s) live on another filesystem (through a symlink), so "
                                f"they were copied: {listed(copied)}")
        staging.commit()
    return result


def _fusion_config(cfg: ModelConfig, ckpt: Checkpoint, chosen: list[int], opts: FuseOptions) -> FusionConfig:
    embedding = cfg.family_obj.global_key("tok_embeddings.weight")
    info = ckpt.info(embedding)
    base_dtype, width = info.dtype, info.shape[1]
    if opts.fusion_vocab and width != cfg.dim:
        raise UsageError(
            f"`fusion_vocab` needs a token embedding as wide as the decoder: {embedding} is {width} wide and the "
            f"decoder {cfg.dim} (a factorised embedding the base projects to its width); fuse without `fusion_vocab`"
        )
    if DTYPE_CHOICES[opts.dtype] is None and base_dtype not in ("BF16", "F16", "F32"):
        if quantization_of(ckpt) is not None:  # never the base's quantized dtype: bf16 unless `dtype` says
            base_dtype = "BF16"
        else:
            raise CheckpointError(f"base embeddings are {base_dtype}; pass `dtype` bf16, fp16 or fp32 for the new weights")
    return FusionConfig(
        layers=chosen, fusion_first=not opts.fusion_after, encoder_dim=opts.encoder_dim or cfg.dim,
        fusion_vocab=opts.fusion_vocab, init=opts.init, init_std=opts.init_std, seed=opts.seed,
        dtype=DTYPE_CHOICES[opts.dtype] or base_dtype, qk_norm_eps=1e-5, norm_eps=cfg.norm_eps, tool_version=__version__,
    ).block(cfg)


def bring_originals(ckpt: Checkpoint, tmp: Path, layout: str, algorithm: str, progress: StageProgress | None,
                     cancel: threading.Event) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Copy (or link, or only digest) every base shard; digests describe the bytes in the output."""
    total = ckpt.total_bytes()
    stage = {"copy": "copy", "link": "digest", "adapter": "digest"}[layout]
    step = (lambda n: progress(stage, n, total)) if progress else None
    originals: list[dict[str, Any]] = []
    file_digests: dict[str, str] = {}
    for name, header in ckpt.files.items():
        if cancel.is_set():
            raise Cancelled()
        src = ckpt.path_of(name)
        if layout == "copy":
            digests, file_digests[name] = copy_and_digest(src, tmp / name, header, step, cancel, algorithm)
        elif layout == "link" and same_filesystem(src, tmp):  # a symlinked shard may live elsewhere
            # link the file a symlink ends at, never the symlink itself (os.link does not follow it on Linux)
            digests, file_digests[name] = link_and_digest(src.resolve(), tmp / name, header, step, algorithm)
        elif layout == "link":
            digests, file_digests[name] = copy_and_digest(src, tmp / name, header, step, cancel, algorithm)
        else:
            digests, file_digests[name] = tensor_digests(src, header, step, algorithm)
        for key, info in header.tensors.items():
            originals.append({"name": key, "shape": list(info.shape), "dtype": info.dtype, "file": name,
                              "digest": digests[key]})
    return originals, file_digests


def _write_new(ckpt: Checkpoint, new: list[NewTensor], seed: int, tmp: Path, algorithm: str,
               progress: StageProgress | None, pool: ThreadPoolExecutor) -> tuple[dict[str, str], dict[str, str]]:
    """Write the new tensors into ``fusion-XXXXX-of-YYYYY.safetensors``, one tensor at a time."""
    shards = group_into_shards(new)
    total = sum(t.nbytes for t in new)
    step = (lambda n: progress("init", n, total)) if progress else None
    files: dict[str, str] = {}
    digests: dict[str, str] = {}
    chunks = chunk_stream(new, seed, ckpt, pool)  # generated ahead, across tensor boundaries
    stream = (chunk for _, chunk in chunks)
    try:
        for s, shard in enumerate(shards, 1):
            name = f"fusion-{s:05d}-of-{len(shards):05d}.safetensors"
            if name in ckpt.files:
                raise CheckpointError(f"base already has a file named {name}")
            with SafetensorsWriter(tmp / name, [(t.key, t.dtype, t.shape) for t in shard],
                                   {"format": "pt", "producer": f"fusionsurgery {__version__}"}, algorithm) as writer:
                for t in shard:
                    digests[t.key] = writer.write(t.key, islice(stream, num_chunks(t)), step)
                    files[t.key] = name
    finally:
        chunks.close()  # stops the generation ahead
    return files, digests


def _write_index(tmp: Path, ckpt: Checkpoint, new: list[NewTensor], new_files: dict[str, str]) -> None:
    weight_map = {k: ckpt.key_to_file[k] for k in ckpt.keys()}
    weight_map.update({t.key: new_files[t.key] for t in new})
    total = sum(ckpt.info(k).nbytes for k in ckpt.keys()) + sum(t.nbytes for t in new)
    write_index(tmp / INDEX_NAME, weight_map, total)
