"""Exceptions that the CLI turns into one-line messages and exit codes."""

from __future__ import annotations

from collections.abc import Sequence

#: How many names a message lists before "(+N more)".
MAX_LISTED = 8


def listed(names: Sequence[str], limit: int = MAX_LISTED) -> str:
    """``a, b, c (+N more)``: the first few of ``names`` for a one-line message."""
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


class FusionSurgeryError(Exception):
    """Bad usage or unreadable input: the CLI prints the message and exits 2."""

    exit_code = 2


class CheckpointError(FusionSurgeryError):
    """A checkpoint file or directory is missing, malformed or unsupported."""


class UsageError(FusionSurgeryError):
    """Flags or arguments that cannot be honoured."""


class CheckFailed(Exception):
    """A verification check failed: the CLI exits 1."""

    exit_code = 1


class WriteError(Exception):
    """Writing the output failed (disk full, permissions, a concurrent writer): exit 1."""

    exit_code = 1
