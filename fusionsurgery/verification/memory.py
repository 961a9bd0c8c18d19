"""How much memory verification needs, what the device has, and the device's figures."""

from __future__ import annotations

import os
import platform
import resource
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..arch.config import FusionConfig, ModelConfig
from ..errors import UsageError
from ..io.checkpoint import Checkpoint
from ..units import human_bytes
from .stream import HEAD_CHUNK_BYTES

OVERHEAD = 64 * 1024**2  # allocator slack, kernels' workspaces


@dataclass
class MemoryEstimate:
    """Bytes the run needs on the device, by part."""

    weights: int
    activations: int
    total: int
    stream: bool

    def to_dict(self) -> dict[str, int | bool]:
        return asdict(self)

    def describe(self) -> str:
        how = "streamed, one layer at a time" if self.stream else "whole model"
        return (f"about {human_bytes(self.total)} ({how}: weights {human_bytes(self.weights)}, "
                f"activations and caches {human_bytes(self.activations)})")


def estimate(ckpt: Checkpoint, cfg: ModelConfig, fusion: FusionConfig, original_keys: list[str],
             itemsize: int, *, stream: bool, batch: int, seq_len: int, encoder_len: int, bench_len: int) -> MemoryEstimate:
    """An upper-bound estimate of the device memory the checks use."""
    numel = {k: ckpt.info(k).numel for k in ckpt.keys()}
    total_params = sum(numel.values())
    fusion_params = total_params - sum(numel.get(k, 0) for k in original_keys)
    tokens = batch * seq_len
    per_token_layer = (6 * cfg.dim + 2 * cfg.num_heads * cfg.head_dim + 2 * cfg.kv_dim + 3 * cfg.intermediate_dim)
    logits = tokens * cfg.vocab_size * 4 * 4  # fp32 logits, softmax, gradient, a copy
    caches = tokens * cfg.kv_dim * 2 * itemsize * cfg.num_layers + batch * encoder_len * cfg.kv_dim * 2 * itemsize * len(fusion.layers)
    if stream:
        per_layer: dict[int, int] = {}
        for key, n in numel.items():
            canonical = cfg.family_obj.to_canonical(key) if cfg.family_obj.knows(key) else ""
            if canonical.startswith("layers."):
                i = int(canonical.split(".")[1])
                per_layer[i] = per_layer.get(i, 0) + n
        layer_params = max(per_layer.values(), default=0)
        weights = max(layer_params * itemsize * 2, min(HEAD_CHUNK_BYTES, cfg.vocab_size * cfg.dim * itemsize))
        lanes = 8  # probe lanes kept per layer, plus the saved inputs of the backward lane
        acts = tokens * per_token_layer * itemsize * 2 + tokens * cfg.dim * itemsize * (lanes + cfg.num_layers)
        acts += logits * 7 + caches // max(cfg.num_layers, 1)
    else:
        weights = total_params * itemsize + fusion_params * itemsize  # the model and the fusion gradients
        acts = tokens * per_token_layer * itemsize * cfg.num_layers + logits * 8 + caches
        acts += bench_len * (per_token_layer * itemsize * 2 + cfg.vocab_size * itemsize)
    return MemoryEstimate(int(weights), int(acts + OVERHEAD), int(weights + acts + OVERHEAD), stream)


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free memory, or the host's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def ensure_fits(need: MemoryEstimate, have: int, device: torch.device, stream_need: MemoryEstimate | None) -> None:
    """Refuse (exit 2) before anything runs when the estimate exceeds what the device has."""
    if need.total <= have:
        return
    msg = f"verify needs {need.describe()} on {device} but only {human_bytes(have)} is available"
    if stream_need is not None and stream_need.total <= have:
        msg += f"; `stream` needs {human_bytes(stream_need.total)}"
    elif stream_need is not None:
        msg += f"; even `stream` needs {human_bytes(stream_need.total)}"
    raise UsageError(msg + "; or choose another `device`")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()}"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what they measure): CUDA's peak allocation, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "peak CUDA memory allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "peak process RSS (CPU run)"
