"""Options that several commands take with the same meaning, declared once."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..errors import in_flag_terms

#: ``--force``: replace an existing output, only once the new one is complete.
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output (only once the new one is complete).")]
#: ``--json``: a machine-readable summary on stdout instead of the rich report.
JsonOut = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary instead of the report.")]
#: ``--rope-defaults``: RoPE settings for a checkpoint whose config has none (fuse, verify, export).
RopeDefaults = Annotated[Optional[str], typer.Option("--rope-defaults", help="With no RoPE settings in a config (a "
                                                     "torchtune checkpoint without config.json): assume these, and "
                                                     "fuse writes them into the output's config. 'llama3' is "
                                                     "torchtune's Llama 3: theta 500000, llama3 scaling factor 8, "
                                                     "low 1, high 4, context 8192.")]
#: ``--follow-symlinks``: follow symlinks leading outside the input directories (``io.links``).
FollowSymlinks = Annotated[bool, typer.Option(
    "--follow-symlinks", help="Follow symlinks in the input directories wherever they point, as cp -L does. "
    "Without it a file that is a symlink leading outside its checkpoint's directory (or outside the hub-cache "
    "repository a snapshot belongs to) is refused, so that no file from elsewhere on the machine lands in an "
    "output.")]

#: Every long option of every command as a Python keyword (``encoder_dim`` for ``--encoder-dim``);
#: ``cli/app.py`` fills it when it registers the commands.
FLAGS: set[str] = set()


def in_cli_terms(text: str) -> str:
    """A library message or note as the CLI says it: `` `encoder_dim` `` becomes ``--encoder-dim``."""
    return in_flag_terms(text, FLAGS)
