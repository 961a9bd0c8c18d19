"""Options that several commands take with the same meaning, declared once."""

from __future__ import annotations

from typing import Annotated

import typer

#: ``--force``: replace an existing output, only once the new one is complete.
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output (only once the new one is complete).")]
#: ``--json``: a machine-readable summary on stdout instead of the rich report.
JsonOut = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary instead of the report.")]
