"""Every command's --help shows its help texts as written (no markup eating "[default: ...]")."""

from __future__ import annotations

import inspect
import re

import pytest
import typer

from fusionsurgery.cli import main
from fusionsurgery.cli.app import _register, app


def _flat(text: str) -> str:
    """Whitespace collapsed, lines re-joined where the formatter broke a word after a hyphen."""
    return " ".join(re.sub(r"-\n\s+", "-", text).split())


def _commands() -> dict[str, object]:
    _register()
    return dict(typer.main.get_command(app).commands)


def test_every_command_is_covered():
    assert {"fuse", "inspect", "verify", "export", "unfuse", "import", "graft"} <= set(_commands())


@pytest.mark.parametrize("name", [None, *sorted(_commands())])
def test_help_shows_every_text_intact(name, capsys):
    command = typer.main.get_command(app) if name is None else _commands()[name]
    code = main(["--help"] if name is None else [name, "--help"])
    out = capsys.readouterr().out
    assert code == 0
    shown = _flat(out)
    texts = [inspect.cleandoc(command.help or "").partition("\f")[0]]
    texts += [p.help for p in command.params if getattr(p, "help", None)]
    assert len(texts) > 1
    for text in texts:
        assert _flat(text) in shown, f"{name} --help lost part of: {text!r}"
    assert "()" not in shown and "[]" not in shown
    dangling = re.search(r".{0,30} [.,;:)](?= |$)", shown)  # "Output directory ." where text was eaten
    assert dangling is None, dangling
    flags = [opt for param in command.params for opt in param.opts if opt.startswith("-")]
    assert all(flag in shown for flag in flags), flags  # every option's names are listed


def test_bracketed_defaults_are_shown(capsys):
    for name, default in (("fuse", "<base>-fused beside the base"), ("export", "<input>-<target> beside the input"),
                          ("unfuse", "<input>-unfused"), ("import", "<input>-imported beside the input"),
                          ("graft", "<base>-grafted beside the base")):
        main([name, "--help"])
        assert f"[default: {default}" in _flat(capsys.readouterr().out), name
