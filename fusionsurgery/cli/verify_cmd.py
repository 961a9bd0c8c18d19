"""``fusionsurgery verify``: prove a fused checkpoint sound on CPU or GPU (exit 1 when a check fails)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ..errors import CheckFailed, UsageError
from .app import app
from .console import console, err_console, human_bytes, print_json

STATUS_STYLE = {"passed": "[green]passed[/]", "failed": "[bold red]FAILED[/]", "skipped": "[yellow]skipped[/]"}
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str) -> int:
    """``8GiB``, ``512MB``, ``1e9`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"--memory-limit {text!r}: give a size such as 8GiB, 512MB or 1e9")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def run_verify(path: Path, *, base: Optional[Path] = None, device: str = "auto", dtype: str = "same",
               stream: bool = False, memory_limit: Optional[str] = None, seq_len: int = 16,
               rope_defaults: Optional[str] = None, json_out: bool = False, emit: bool = True) -> Any:
    """Run ``verify`` and print the report (JSON with ``json_out``; nothing unless ``emit``); returns the Report."""
    from ..verification import verify as verify_api

    notify = None if json_out else (lambda msg: err_console.print(f"[dim]{msg}[/]", highlight=False))
    report = verify_api(path, base, device=device, dtype=dtype, stream=stream,
                        memory_limit=parse_size(memory_limit) if memory_limit else None, seq_len=seq_len,
                        rope_defaults=rope_defaults, notify=notify)
    if emit:
        print_json(report.to_dict()) if json_out else print_report(report)
    return report


def raise_if_failed(report: Any) -> None:
    """``CheckFailed`` (exit 1) naming the failed checks."""
    if not report.ok:
        names = ", ".join(c.name for c in report.failures)
        raise CheckFailed(f"{report.path}: {len(report.failures)} check(s) failed: {names}")


def print_report(report) -> None:
    settings = report.settings
    where = f"{settings.get('device', '?')}, {settings.get('dtype', '?')}" + (", streamed" if settings.get("stream") else "")
    console.print(f"[bold]verify {report.path}[/]" + (f" against {report.base}" if report.base else "") + f" ({where})")
    table = Table(show_lines=False)
    table.add_column("check")
    table.add_column("status")
    table.add_column("result")
    for c in report.checks:
        table.add_row(c.title.split(":")[0], STATUS_STYLE.get(c.status, c.status), c.summary)
    console.print(table)
    for c in report.checks:
        for d in c.details:
            console.print(f"[red]✗ {c.name}:[/] {d}", highlight=False)
        for n in c.notes:
            console.print(f"[yellow]! {c.name}:[/] {n}", highlight=False)
    mem = settings.get("memory")
    if mem:
        est = mem["estimate"]
        console.print(f"memory: estimated {human_bytes(est['total'])} needed, {human_bytes(mem['available'])} available",
                      highlight=False)
    verdict = "[bold green]all checks passed[/]" if report.ok else f"[bold red]{len(report.failures)} check(s) failed[/]"
    console.print(verdict)


@app.command()
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
    rope_defaults: Annotated[Optional[str], typer.Option("--rope-defaults", help="With no RoPE settings in the config "
                                                         "(a torchtune base fused without one): assume these; "
                                                         "'llama3' is torchtune's Llama 3.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Run every check on a fused checkpoint and report each as passed or failed, with figures.

    Structure; originals bit-identical; identity at init (zero gates give the base's logits
    exactly); a live fusion path; forward and backward with the base frozen; KV-cache decoding;
    device, memory and throughput figures. Exit 0 when all pass, 1 when one fails, 2 on bad usage.
    """
    report = run_verify(path, base=base, device=device, dtype=dtype, stream=stream, memory_limit=memory_limit,
                        seq_len=seq_len, rope_defaults=rope_defaults, json_out=json_out)
    raise_if_failed(report)
