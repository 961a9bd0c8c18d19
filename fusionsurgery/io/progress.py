"""The two shapes of progress callback the engines take (the CLI draws them as bars)."""

from __future__ import annotations

from collections.abc import Callable

#: ``progress(n)``: ``n`` more bytes were processed (copied, digested, written or compared).
Progress = Callable[[int], None]

#: ``progress(stage, n, total)``: ``n`` more of the ``total`` bytes of ``stage`` (``"copy"``,
#: ``"digest"``, ``"init"``) were processed; for engines with several stages (``fuse``, ``graft``).
StageProgress = Callable[[str, int, int], None]
