"""``verify``: run every check against a fused checkpoint and return a ``Report``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..arch.config import check_options
from ..errors import CheckpointError, UsageError
from ..io.checkpoint import Checkpoint
from ..io.torch_dtypes import TORCH_DTYPES, parse_dtype
from ..native.loading import resolve_device
from ..surgery.adapter import attach_base, is_adapter, made_on
from ..units import human_bytes
from . import gates, memory, numerics, originals, plain, structure
from .engine import Engine, forward_engine
from .outputs import Outputs
from .probe import make_probe
from .report import PASSED, CheckResult, Report, skipped
from .stream import LayerStream, run_stream

Notify = Callable[[str], None]
MODEL_CHECKS = [("identity", "Identity at init"), ("live", "Fusion path is live"),
                ("backward", "Forward and backward"), ("kv_cache", "KV cache"), ("figures", "Figures")]


def resolve_dtype(ckpt: Checkpoint, dtype: str | torch.dtype | None) -> torch.dtype:
    """``same`` (or None): the checkpoint's embedding dtype; else bf16 / fp16 / fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "same", "auto"):
        key = structure.family_of(ckpt).global_key("tok_embeddings.weight")
        return TORCH_DTYPES[ckpt.info(key).dtype]
    try:
        return parse_dtype(dtype)
    except ValueError as exc:
        raise UsageError(f"`dtype`: {exc}") from None


def verify(path: str | os.PathLike[str], base: str | os.PathLike[str] | None = None, *,
           device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "same",
           stream: bool = False, memory_limit: int | None = None, batch: int = 2, seq_len: int = 16,
           encoder_len: int = 8, bench_len: int | None = None, seed: int = 0, rope_defaults: str | None = None,
           follow_symlinks: bool = False, notify: Notify | None = None) -> Report:
    """Check that the fused checkpoint at ``path`` is sound; every check is run and reported.

    Args:
        path: the fused checkpoint directory (or an adapter, with ``base``).
        base: the base checkpoint: originals are compared byte for byte with it (default: the
            manifest's digests); required for an adapter.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``same`` (the checkpoint's), ``bf16``, ``fp16``, ``fp32`` or a torch dtype.
        stream: load one decoder layer at a time (models larger than the device's memory).
        memory_limit: bytes the device is taken to have at most.
        batch: probe batch size.
        seq_len: probe sequence length (random tokens, ``[batch, seq_len]``).
        encoder_len: probe encoder positions (random states, ``[batch, encoder_len, encoder_dim]``).
        bench_len: tokens per pass of the throughput figure (default: a few times ``seq_len``).
        seed: seed of the random probe.
        rope_defaults: RoPE settings to assume when the config has none (``"llama3"``).
        follow_symlinks: follow symlinks leading outside the checkpoint directories (``io.links``).
        notify: called with a line of text as each stage starts.

    Returns:
        Report: every check's status, summary, details and figures (``report.ok``,
        ``report.failures``, ``report.raise_if_failed()``). A failed check does not raise.

    Raises:
        FusionSurgeryError: bad usage or unreadable input (the CLI exits 2), including a device
            without enough memory for the run.

    Example:
        >>> report = fs.verify("/tmp/tiny-fused", base="examples/tiny-llama")
        >>> report.ok  # originals bit-identical, manifest honest, closed gates = the base's logits ...
        True
    """
    say = notify or (lambda _msg: None)
    if batch < 1 or seq_len < 2 or encoder_len < 1:
        raise UsageError("verify needs batch >= 1, seq_len >= 2 and encoder_len >= 1")
    check_options(rope_defaults=rope_defaults)
    dev = resolve_device(device)
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"{root}: no such file or directory")
    base_ckpt = Checkpoint.open(base, follow_symlinks=follow_symlinks) if base is not None else None
    report = Report(str(path), str(base) if base is not None else None)
    problems = structure.shard_problems(root)
    if problems:
        result = structure.CheckResult(structure.NAME, structure.TITLE)
        for p in problems:
            result.fail(p)
        report.checks.append(result.finish(""))
        report.checks.append(skipped(originals.NAME, originals.TITLE, "index and shards are inconsistent"))
        report.checks += [skipped(n, t, "structure check failed") for n, t in MODEL_CHECKS]
        return report
    ckpt = Checkpoint.open(root, follow_symlinks=follow_symlinks)
    manifest = ckpt.read_manifest()
    adapter = is_adapter(manifest)
    if adapter:  # fuse --adapter-only: the originals come from --base
        if base_ckpt is None:
            raise UsageError(f"{root} holds only the fusion tensors (fuse --adapter-only): pass `base` BASE"
                             f"{made_on(manifest)}")
        ckpt = attach_base(ckpt, base_ckpt, check=False)  # the originals check below compares the digests
    _ensure_fused(ckpt)
    torch_dtype = resolve_dtype(ckpt, dtype)
    report.settings = {"device": str(dev), "dtype": str(torch_dtype).removeprefix("torch."), "stream": stream,
                       "probe": {"batch": batch, "seq_len": seq_len, "encoder_len": encoder_len, "seed": seed}}
    check, layout = structure.check_structure(ckpt, rope_defaults)
    report.checks.append(check)
    bench = bench_len or (512 if dev.type == "cuda" else 64)
    engine = forward_engine(layout.cfg, ckpt.config) if layout.cfg is not None else Engine("native")
    report.settings["engine"] = engine.kind
    if not check.failed and engine.kind == "native":
        _plan_memory(report, ckpt, layout, dev, torch_dtype, stream, memory_limit, batch, seq_len, encoder_len,
                     bench, say)
    say("checking original tensors")
    report.checks.append(originals.check_originals(ckpt, layout, base_ckpt))
    if check.failed:
        report.checks += [skipped(n, t, "structure check failed") for n, t in MODEL_CHECKS]
        return report
    if engine.kind != "native":
        report.checks.append(gates.check_gates(ckpt, layout))  # read from the files, whichever forward follows
    if engine.kind == "skip":
        return _forward_elsewhere(report, engine, layout, say)
    if engine.kind == "hf" and stream:
        stream = False
        report.settings["stream"] = False
        say(f"--stream needs native modules; model type {layout.cfg.model_type!r} runs whole through transformers")
    where = "transformers" if engine.kind == "hf" else "native modules"
    say(f"running the model checks on {dev} ({report.settings['dtype']}{', streamed' if stream else ''}; {where})")
    probe = make_probe(layout.cfg, layout.fusion, dev, torch_dtype, batch=batch, seq_len=seq_len,
                       encoder_len=encoder_len, seed=seed)
    memory.reset_peak(dev)
    if engine.kind == "hf":
        from .hf_engine import run_hf

        extra = [base_ckpt] if adapter and base_ckpt is not None else []
        out = run_hf(ckpt, extra, dev, torch_dtype, probe, bench_len=bench)
    else:
        out = _run_engine(ckpt, layout, dev, torch_dtype, probe, stream, bench)
    report.checks += [numerics.check_identity(out), numerics.check_live(out), numerics.check_forward_backward(out),
                      numerics.check_kv_cache(out, torch_dtype), _figures(out, dev, torch_dtype, stream)]
    return report


def _forward_elsewhere(report: Report, engine: Engine, layout: structure.Layout, say: Notify) -> Report:
    """No transformers for a type without native modules: the forward checks are reported skipped,
    with the one-line hint to install the ``[hf]`` extra."""
    say(engine.reason)
    report.checks += [skipped(n, t, engine.reason) for n, t in MODEL_CHECKS]
    return report


def _ensure_fused(ckpt: Checkpoint) -> None:
    family = structure.family_of(ckpt)
    has_fusion_keys = any(structure.is_fusion_name(family, k) for k in ckpt.keys())
    if not has_fusion_keys and "fusion" not in (ckpt.config or {}) and ckpt.read_manifest() is None:
        raise UsageError(f"{ckpt.root} is not a fused checkpoint (no fusion tensors, no fusion section in "
                         "config.json, no fusion_manifest.json); verify checks fused checkpoints")


def _plan_memory(report: Report, ckpt: Checkpoint, layout: structure.Layout, dev: torch.device,
                 dtype: torch.dtype, stream: bool, memory_limit: int | None, batch: int, seq_len: int,
                 encoder_len: int, bench: int, say: Notify) -> None:
    """Say what the run needs; refuse before starting when the device does not have it."""
    sizes = dict(batch=batch, seq_len=seq_len, encoder_len=encoder_len, bench_len=bench)
    itemsize = torch.empty((), dtype=dtype).element_size()
    args = (ckpt, layout.cfg, layout.fusion, layout.original_keys, itemsize)
    need = memory.estimate(*args, stream=stream, **sizes)
    streamed = None if stream else memory.estimate(*args, stream=True, **sizes)
    have = memory.available_bytes(dev)
    if memory_limit is not None:
        have = min(have, memory_limit)
    report.settings["memory"] = {"estimate": need.to_dict(), "available": have}
    say(f"needs {need.describe()}; {human_bytes(have)} available on {dev}")
    memory.ensure_fits(need, have, dev, streamed)


def _run_engine(ckpt: Checkpoint, layout: structure.Layout, dev: torch.device, dtype: torch.dtype, probe,
                stream: bool, bench: int) -> Outputs:
    cfg, fusion = layout.cfg, layout.fusion
    if stream:
        return run_stream(LayerStream(ckpt, cfg, fusion, dev, dtype), probe)
    base = plain.load_base(ckpt, cfg, layout.original_keys, dev, dtype)
    base_logits = plain.base_logits(base, probe)
    del base
    model = plain.load_fused_model(ckpt, cfg, fusion, dev, dtype)
    return plain.run_plain(model, base_logits, probe, bench_len=bench)


def _figures(out: Outputs, dev: torch.device, dtype: torch.dtype, stream: bool) -> CheckResult:
    peak, what = memory.peak_memory(dev)
    figures = dict(out.figures, device=str(dev), device_name=memory.device_name(dev),
                   dtype=str(dtype).removeprefix("torch."), peak_memory_bytes=peak, peak_memory_kind=what,
                   stream=stream, torch=torch.__version__)
    tps = figures.get("forward_tokens_per_s", 0.0)
    how = "streamed sweep incl. loading" if stream else f"{figures.get('forward_tokens')} tokens per pass"
    summary = (f"{figures['device_name']}, {figures['dtype']}: {what} {human_bytes(peak)}, "
               f"resident weights at most {human_bytes(figures.get('resident_weight_bytes', 0))}, "
               f"forward {tps:,.0f} tokens/s ({how})")
    return CheckResult("figures", "Figures: device, dtype, memory, throughput", PASSED, summary, figures=figures)
