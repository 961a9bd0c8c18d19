"""Exceptions that the CLI turns into one-line messages and exit codes.

Messages speak the library's terms: an argument is named as the Python keyword in backticks
(`` `encoder_dim` must be positive, got 0``). The CLI prints the same message with its flags
(``--encoder-dim must be positive, got 0``) through ``in_flag_terms``.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from pathlib import Path

#: How many names a message lists before "(+N more)".
MAX_LISTED = 8


def listed(names: Sequence[str], limit: int = MAX_LISTED) -> str:
    """``a, b, c (+N more)``: the first few of ``names`` for a one-line message."""
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


_ARGUMENT = re.compile(r"`([a-z][a-z0-9_]*)`")


def in_flag_terms(message: str, flags: Collection[str]) -> str:
    """A library message as the CLI says it: each `` `name` `` that is a flag becomes ``--name``.

    Args:
        message: the exception's message.
        flags: the CLI's option names as Python keywords (``encoder_dim`` for ``--encoder-dim``).

    Returns:
        The message with those arguments spelled as flags; everything else as it was.
    """
    return _ARGUMENT.sub(lambda m: "--" + m.group(1).replace("_", "-") if m.group(1) in flags else m.group(0),
                         message)


class FusionSurgeryError(Exception):
    """Bad usage or unreadable input: the CLI prints the message and exits 2."""

    exit_code = 2


class CheckpointError(FusionSurgeryError):
    """A checkpoint file or directory is missing, malformed or unsupported."""


class LinkRefused(CheckpointError):
    """A file of a checkpoint directory is a symlink leading outside it (``io.links``; exit 2).

    Args:
        link (Path): the path inside the checkpoint directory.
        target (Path): where it finally points.
        what (str): what the file is, for the message ("sidecar file", "shard" ...).
    """

    def __init__(self, link: Path, target: Path, what: str) -> None:
        self.link, self.target, self.what = link, target, what
        super().__init__(self.message("follow_symlinks=True"))  # the CLI names --follow-symlinks

    def message(self, option: str) -> str:
        """The one-line refusal, naming ``option`` as the way to follow the link anyway."""
        return (f"{self.link}: {self.what} is a symlink to {self.target}, outside the checkpoint's directory; "
                f"refused (pass {option} to follow it anyway)")


class UsageError(FusionSurgeryError):
    """Flags or arguments that cannot be honoured."""


class CheckFailed(Exception):
    """A verification check failed: the CLI exits 1."""

    exit_code = 1


class WriteError(Exception):
    """Writing the output failed (disk full, permissions, a concurrent writer): exit 1."""

    exit_code = 1
