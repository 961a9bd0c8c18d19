"""The Typer application and the one place where exceptions become one-line errors and exit codes."""

from __future__ import annotations

import errno
import os
import signal
import sys
from collections.abc import Sequence
from importlib import import_module

import typer
from rich.markup import escape

try:  # typer >= 0.20 vendors its own click
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover - older typer on real click
    import click.exceptions as _cx

#: click >= 8.2 raises this for a command run without arguments that shows its help; click 8.1 (which
#: typer 0.15.4, the floor, installs) exits through typer.Exit instead: an empty tuple catches nothing.
_NO_ARGS_IS_HELP = getattr(_cx, "NoArgsIsHelpError", ())

from ..errors import CheckFailed, FusionSurgeryError, LinkRefused, WriteError
from ..version import __version__
from .console import err_console
from .options import FLAGS, in_cli_terms

app = typer.Typer(
    name="fusionsurgery",
    help="Model surgery for deep fusion: fuse gated cross-attention layers into a pretrained decoder "
    "checkpoint, inspect checkpoints, and verify fused ones.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Help texts are plain text, shown as written: rich markup would eat bracketed words such as
    # "[default: <base>-fused beside the base]" (and so would Markdown's rules other characters).
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fusionsurgery {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """fusionsurgery: deep-fusion model surgery."""


#: Every command, in the order ``--help`` lists them: (command name, module of ``fusionsurgery.cli``,
#: function). This is the one place commands are registered; command modules never import ``app``.
COMMANDS = (
    ("fuse", "fuse_cmd", "fuse"),
    ("inspect", "inspect_cmd", "inspect"),
    ("verify", "verify_cmd", "verify"),
    ("export", "export_cmd", "export"),
    ("unfuse", "export_cmd", "unfuse"),
    ("import", "transplant_cmd", "import_"),
    ("graft", "transplant_cmd", "graft"),
)


def _register() -> None:
    """Add every command of ``COMMANDS`` to ``app`` (once; the modules are imported here, not at start-up)."""
    if app.registered_commands:
        return
    for name, module, function in COMMANDS:
        app.command(name)(getattr(import_module(f"{__package__}.{module}"), function))
    FLAGS.update(_flags())


_interrupted: list[int] = []


def _terminate(signum: int, frame: object) -> None:
    """SIGINT/SIGTERM: unwind (so temporary outputs are removed), remembering why."""
    _interrupted.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


def _flags() -> set[str]:
    """Every long option of every command, as a Python keyword (``--encoder-dim`` -> ``encoder_dim``)."""
    group = typer.main.get_command(app)
    return {opt[2:].replace("-", "_") for command in getattr(group, "commands", {}).values()
            for param in command.params for opt in param.opts if opt.startswith("--")}


def _error(message: str) -> None:
    # the message is text, not markup: `pip install "fusionsurgery[quant]"` keeps its brackets
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 a check or write failed, 2 bad usage or input)."""
    _register()
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file-size limit becomes an EFBIG error
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=list(argv) if argv is not None else None, prog_name="fusionsurgery",
                          standalone_mode=False)
        if _interrupted:  # typer turns KeyboardInterrupt into a silent exit 130
            _error("interrupted; nothing was written")
            return 130
        return rv if isinstance(rv, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except _NO_ARGS_IS_HELP as exc:
        typer.echo(exc.format_message())
        return 0
    except _cx.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        _error(f"{exc.format_message()}{hint}")
        return 2
    except _cx.ClickException as exc:
        _error(exc.format_message())
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        _error("interrupted; nothing was written")
        return 130
    except LinkRefused as exc:  # the library names its keyword; the CLI names its flag
        _error(exc.message("--follow-symlinks"))
        return exc.exit_code
    except (FusionSurgeryError, CheckFailed, WriteError) as exc:
        _error(in_cli_terms(str(exc)))
        return exc.exit_code
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            _error(f"out of disk space or over a file-size limit ({exc.strerror}); nothing was written")
        elif exc.errno == errno.EPIPE:
            return 1
        else:
            where = f"{exc.filename}: " if exc.filename else ""
            _error(f"{where}{exc.strerror or exc}")
        return 1
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        if os.environ.get("FUSIONSURGERY_DEBUG"):
            raise
        _error(f"internal error: {type(exc).__name__}: {exc} (set FUSIONSURGERY_DEBUG=1 for a traceback)")
        return 1


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
