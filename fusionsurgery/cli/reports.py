"""What more than one command prints: the files an output holds, and a verification report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from ..units import human_bytes
from .console import console, err_console

STATUS_STYLE = {"passed": "[green]passed[/]", "failed": "[bold red]FAILED[/]", "skipped": "[yellow]skipped[/]"}


def checkpoint_bytes(path: Path, follow_symlinks: bool = False) -> int:
    """Bytes of the tensors of the checkpoint at ``path`` (a progress bar's total); 0 when unreadable.

    Args:
        path: a checkpoint file or directory.
        follow_symlinks: read it under the same link rule as the command (``io.links``).

    Returns:
        The total size of its tensors, or 0 (the command itself then reports the unreadable input).
    """
    from ..io.checkpoint import Checkpoint

    try:
        return Checkpoint.open(path, follow_symlinks=follow_symlinks).total_bytes()
    except Exception:  # noqa: BLE001 - the command itself reports an unreadable input
        return 0


def print_files(output: Path, files: list[dict[str, Any]], title_suffix: str = "") -> None:
    """A "Wrote OUT" table of the files written.

    Args:
        output: the output directory.
        files: ``{"name": ..., "bytes": ..., "linked": bool (optional)}`` per file.
        title_suffix: appended to the title (e.g. how the base's shards got there).
    """
    table = Table(title=f"Wrote {output}{title_suffix}", title_justify="left")
    table.add_column("file")
    table.add_column("size", justify="right")
    for f in files:
        table.add_row(f["name"] + (" (link)" if f.get("linked") else ""), human_bytes(f["bytes"]))
    console.print(table)


def verify_notifier(json_out: bool) -> Callable[[str], None] | None:
    """Where ``verify`` tells what it is doing: dimmed lines on stderr, or nowhere with ``--json``."""
    return None if json_out else (lambda msg: err_console.print(f"[dim]{escape(msg)}[/]", highlight=False))


def print_verify_report(report: Any) -> None:
    """The table of checks, the failures and notes under it, the memory estimate and the verdict.

    Args:
        report: a ``fusionsurgery.verification.Report``.
    """
    settings = report.settings
    where = f"{settings.get('device', '?')}, {settings.get('dtype', '?')}" + (", streamed" if settings.get("stream") else "")
    console.print(f"[bold]verify {report.path}[/]" + (f" against {report.base}" if report.base else "") + f" ({where})")
    table = Table(show_lines=False)
    table.add_column("check")
    table.add_column("status")
    table.add_column("result")
    for c in report.checks:
        table.add_row(c.title.split(":")[0], STATUS_STYLE.get(c.status, c.status), escape(c.summary))
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
