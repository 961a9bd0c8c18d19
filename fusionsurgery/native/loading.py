"""``load_fused``: a checkpoint directory (fused or not) as a ready ``TransformerDecoder``."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..arch.config import FusionConfig, ModelConfig, read_fusion_config, read_model_config
from .builders import build_empty
from ..errors import CheckpointError, UsageError, listed
from ..io.checkpoint import Checkpoint
from ..io.torch_dtypes import TORCH_DTYPES, parse_dtype
from ..modules import TransformerDecoder
from ..surgery.adapter import attach_base
from ..surgery.consistency import require_consistent
from ..arch.quantization import Quantization
from .dequantize import native_config, read_dequantized


@dataclass
class LoadedModel:
    """What ``open_model`` returns: the module and the descriptions it was built from."""

    model: TransformerDecoder
    config: ModelConfig
    fusion: FusionConfig | None
    checkpoint: Checkpoint


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None) picks CUDA when present; ``cuda`` without CUDA is a clear error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"`device` {device!s}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CheckpointError(f"device {device!s}: CUDA is not available on this machine (try `device` cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CheckpointError(f"device {device!s}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def open_model(path: str | os.PathLike[str] | Checkpoint, *, dtype: torch.dtype | str | None = None,
               device: str | torch.device | None = "cpu", config: str | os.PathLike[str] | None = None,
               rope_theta: float | None = None, num_heads: int | None = None,
               num_kv_heads: int | None = None, base: str | os.PathLike[str] | None = None,
               rope_defaults: str | None = None, follow_symlinks: bool = False) -> LoadedModel:
    """Build the model described by ``path`` and load its tensors one at a time.

    Args:
        path: a checkpoint file or directory (fused or plain), or an opened ``Checkpoint``.
        dtype: torch dtype, ``"bf16"``/``"fp16"``/``"fp32"`` or ``"same"``; default: the checkpoint's
            embedding dtype.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        config: a config.json to use instead of the one beside the weights.
        rope_theta: RoPE base when no config gives it.
        num_heads: attention heads, when there is no config and shapes cannot tell.
        num_kv_heads: key/value heads, likewise.
        base: the base checkpoint of an adapter output (``fuse --adapter-only``); refused unless its
            digests match the adapter's manifest.
        rope_defaults: the RoPE settings to assume when no config gives them (``"llama3"``: torchtune's
            Llama 3); torchtune checkpoints often come without a config.
        follow_symlinks: follow symlinks that lead outside the checkpoint directories (``io.links``).

    Returns:
        LoadedModel: the model (in eval mode), its ``ModelConfig``, its ``FusionConfig`` (None for a
        plain base) and the ``Checkpoint`` it was read from.

    Raises:
        CheckpointError: an unreadable or inconsistent checkpoint, a wrong base, an unusable device.
        UsageError: an unknown dtype or option.
    """
    ckpt = path if isinstance(path, Checkpoint) else Checkpoint.open(path, config=config,
                                                                      follow_symlinks=follow_symlinks)
    ckpt = attach_base(ckpt, Checkpoint.open(base, follow_symlinks=follow_symlinks) if base is not None else None)
    cfg = read_model_config(ckpt, num_heads=num_heads, num_kv_heads=num_kv_heads, rope_defaults=rope_defaults)
    view = native_config(ckpt, cfg) if not cfg.native else None  # an FP8 release of a native type
    if view is not None:
        cfg = view[0]
    if not cfg.native:
        raise UsageError(f"model type {cfg.model_type!r} has no native modules; its forward is transformers': "
                         "fusionsurgery.hf.from_pretrained(path) opens it as its own class with the fusion blocks "
                         '(pip install "fusionsurgery[hf]")')
    fusion = read_fusion_config(ckpt.config)
    require_consistent(ckpt, cfg, fusion)
    if isinstance(dtype, str):
        try:
            dtype = parse_dtype(dtype) if dtype != "same" else None
        except ValueError as exc:
            raise UsageError(f"dtype: {exc}") from None
    if dtype is None:
        dtype = TORCH_DTYPES[ckpt.info(cfg.family_obj.global_key("tok_embeddings.weight")).dtype]
    model = build_empty(cfg, fusion, dtype=dtype, device=resolve_device(device), rope_theta=rope_theta)
    load_tensors(model, ckpt, quant=view[1] if view is not None else None)
    model.eval()
    return LoadedModel(model, cfg, fusion, ckpt)


def load_tensors(model: torch.nn.Module, ckpt: Checkpoint, quant: Quantization | None = None) -> None:
    """Copy every tensor of ``ckpt`` into ``model``, one at a time.

    Args:
        model: a module whose state-dict keys are exactly the checkpoint's keys.
        ckpt: the checkpoint to read.
        quant: an FP8 checkpoint's quantization: its weights are dequantized by the scales beside them
            (``native.dequantize``), which are no tensors of the model.

    Raises:
        CheckpointError: a key missing on either side, or a shape that differs (both named).
    """
    targets = model.state_dict(keep_vars=True)
    keys = [k for k in ckpt.keys() if quant is None or not quant.is_side(k)]
    missing = sorted(set(targets) - set(keys))
    unexpected = sorted(set(keys) - set(targets))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {listed(missing, 3)}")
        if unexpected:
            parts.append(f"unexpected {listed(unexpected, 3)}")
        raise CheckpointError(f"{ckpt.root}: tensors do not match the model its config describes: {'; '.join(parts)}")
    with torch.no_grad():
        for key, target in targets.items():
            src = ckpt.read_tensor(key) if quant is None else read_dequantized(ckpt, key, quant)
            if tuple(src.shape) != tuple(target.shape):
                raise CheckpointError(f"{key}: shape {list(src.shape)} but the model expects {list(target.shape)}")
            target.copy_(src)


def load_fused(path: str | os.PathLike[str], dtype: torch.dtype | str | None = None,
               device: str | torch.device | None = "cpu", *, config: str | os.PathLike[str] | None = None,
               rope_theta: float | None = None, base: str | os.PathLike[str] | None = None,
               rope_defaults: str | None = None, follow_symlinks: bool = False) -> TransformerDecoder:
    """A fused checkpoint as a module: ``model(tokens, encoder_input=None, encoder_mask=None)`` gives logits.

    Args:
        path: the fused directory (a base checkpoint loads too, as a plain decoder).
        dtype: torch dtype or ``bf16``/``fp16``/``fp32``; default: the checkpoint's embedding dtype.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        config: a config.json to use instead of the one beside the weights.
        rope_theta: RoPE base when no config gives it.
        base: the base checkpoint, when ``path`` is an adapter (``fuse --adapter-only``).
        rope_defaults: ``"llama3"`` assumes torchtune's Llama 3 RoPE (theta 500000, llama3 scaling
            factor 8, low 1, high 4, original context 8192) when no config gives RoPE settings.
        follow_symlinks: follow symlinks that lead outside the checkpoint directories (``io.links``).

    Returns:
        TransformerDecoder: in eval mode; ``model(tokens [b, s], encoder_input=[b, e, encoder_dim])``
        gives logits ``[b, s, vocab]``.

    Raises:
        CheckpointError: an unreadable or inconsistent checkpoint, a wrong base, an unusable device.
        UsageError: an unknown dtype or option.

    Example:
        >>> model = fs.load_fused("/tmp/tiny-fused", dtype=torch.float32)
        >>> tokens = torch.randint(0, 2048, (1, 8))
        >>> model(tokens, encoder_input=torch.randn(1, 4, 128)).shape  # encoder states [b, e, encoder_dim]
        torch.Size([1, 8, 2048])
    """
    return open_model(path, dtype=dtype, device=device, config=config, rope_theta=rope_theta, base=base,
                      rope_defaults=rope_defaults, follow_symlinks=follow_symlinks).model
