"""``fusionsurgery verify``: prove a fused checkpoint sound on CPU or GPU (exit 1 when a check fails)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from .console import print_json
from .options import FollowSymlinks, RopeDefaults
from .reports import print_verify_report, verify_notifier

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str) -> int:
    """``8GiB``, ``512MB``, ``1e9`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"--memory-limit {text!r}: give a size such as 8GiB, 512MB or 1e9")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def verify(
    path: Annotated[Path, typer.Argument(metavar="FUSED", help="The fused checkpoint directory.")],
    base: Annotated[Optional[Path], typer.Option("--base", help="The base checkpoint: originals are compared "
                                                 "byte for byte with it (default: the manifest's digests).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="same (the checkpoint's), bf16, fp16 or fp32.")] = "same",
    stream: Annotated[bool, typer.Option("--stream", help="Load one decoder layer at a time to the device: "
                                         "verifies models larger than its memory (or RAM).")] = False,
    memory_limit: Annotated[Optional[str], typer.Option("--memory-limit", help="Treat the device as having at "
                                                        "most this much free memory, e.g. 8GiB.")] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Probe sequence length (random tokens).")] = 16,
    rope_defaults: RopeDefaults = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    follow_symlinks: FollowSymlinks = False,
) -> None:
    """Run every check on a fused checkpoint and report each as passed or failed, with figures.

    Structure; originals bit-identical; identity at init (zero gates give the base's logits
    exactly); a live fusion path; forward and backward with the base frozen; KV-cache decoding;
    device, memory and throughput figures. Exit 0 when all pass, 1 when one fails, 2 on bad usage.
    """
    from ..verification import verify as verify_api

    report = verify_api(path, base, device=device, dtype=dtype, stream=stream,
                        memory_limit=parse_size(memory_limit) if memory_limit else None, seq_len=seq_len,
                        rope_defaults=rope_defaults, follow_symlinks=follow_symlinks,
                        notify=verify_notifier(json_out))
    print_json(report.to_dict()) if json_out else print_verify_report(report)
    report.raise_if_failed()
