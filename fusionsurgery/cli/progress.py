"""Progress bars for long byte-moving stages, shown only on a terminal."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from .console import err_console

STAGE_NAMES = {"copy": "copying originals", "digest": "digesting originals", "init": "creating fusion weights"}


@contextmanager
def byte_progress(enabled: bool = True) -> Iterator:
    """Yields a ``progress(stage, n, total)`` callback drawing one bar per stage."""
    bars = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=err_console, transient=True,
                    disable=not (enabled and err_console.is_terminal))
    tasks: dict[str, int] = {}

    def update(stage: str, n: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(STAGE_NAMES.get(stage, stage), total=total)
        bars.advance(tasks[stage], n)

    with bars:
        yield update
