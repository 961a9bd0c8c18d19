"""The documentation cannot rot: every link resolves, and every command it shows runs.

- Links: every relative link and image in README.md, ARCHITECTURE.md, docs/**.md and
  benchmarks/README.md points at a file inside the repository, and an anchor (``page.md#part``)
  at a heading of that page.
- Commands: every line of a ```bash block of those pages is run, page by page and in order, in a
  sandbox: a temporary directory holding a copy of ``examples/tiny-llama``, where ``/tmp/`` means
  the sandbox's own ``tmp/`` and the few stand-in model names the guides use (``FIXTURES``) are
  tiny models of the same kind, built by transformers. A plain ``fusionsurgery ...`` line runs in
  this process (``cli.main``); any other line runs in bash, with ``fusionsurgery`` meaning this
  Python's ``-m fusionsurgery``. Each must exit 0. Lines that install packages or start long runs
  (``SKIPPED_LINES``: pip, torchrun, the examples' and benchmarks' scripts, the version venvs) are
  not run; a ``fusionsurgery`` command chained after them with ``&&`` still is. Python blocks
  listed in ``PYTHON_BLOCKS`` run too, in the same sandbox and order. A command another test runs
  is listed in ``NOT_RUN`` with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "ARCHITECTURE.md", ROOT / "benchmarks" / "README.md",
                *(ROOT / "docs").rglob("*.md")])

#: Python blocks that run with the page's commands, by page and by index among its python blocks
#: (the others are fragments: ``my_encoder``, a LoRA run elided with ``...``, an 8B torchtune model).
PYTHON_BLOCKS = {"README.md": [0], "docs/guides/training.md": [0], "docs/python-api.md": [0]}

#: Commands shown but not run here, each with the reason: (page, start of the command) -> why.
NOT_RUN: dict[tuple[str, str], str] = {
    ("docs/transformers.md", "fusionsurgery verify /tmp/tiny-trained"):
        "tests/test_hf_training.py::test_documented_example_runs_and_verifies runs the page's first python "
        "block, which writes /tmp/tiny-trained, and then this verify (and asserts the fusion tensors trained)",
    ("docs/cli/export.md", "fusionsurgery export my-gemma2-fused"):
        "tests/test_torchtune_gemma2.py runs this export on a tiny Gemma 2 that transformers builds in the test",
    ("docs/cli/export.md", "fusionsurgery export my-gemma2-tune"):
        "tests/test_torchtune_gemma2.py runs this round trip and compares the bytes",
}

#: Lines shown but not run (each pattern with why): they install software or take minutes, and the
#: scripts they start have tests of their own.
SKIPPED_LINES = {
    r"\bpip install\b": "installs packages (CI's set-up runs the README's command itself)",
    r"^torchrun\b": "needs several processes (tests/test_hf_training.py runs the script's training on 2 over gloo)",
    r"^python examples/(real_parts|vision|train_fusion|hf_fsdp_train)": "a long example run (tests/test_real_parts.py, "
                                                                      "test_vision.py, test_train.py, "
                                                                      "test_hf_training.py run short versions)",
    r"^python benchmarks/": "a benchmark (minutes to hours; `--size tiny` is its smoke test)",
    r"^bash scripts/": "builds virtual environments at the version floors (CI runs it)",
    r"^python -m pytest\b": "the test suite itself",
}

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _blocks(page: Path) -> list[tuple[str, str]]:
    """The fenced code blocks of ``page``: (language, text), in order."""
    return [(m.group(1), m.group(2)) for m in _FENCE.finditer(page.read_text())]


def _lines(script: str) -> list[str]:
    """The command lines of a bash block: continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", script)
    lines = (line.split(" # ", 1)[0].strip() for line in joined.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _skipped(line: str) -> bool:
    return any(re.search(pattern, line) for pattern in SKIPPED_LINES)


def _plain(command: str) -> bool:
    """A ``fusionsurgery`` command with no shell syntax around it (it can run in this process)."""
    return command.startswith("fusionsurgery ") and not re.search(r"[|;<>$`]", command)


def _steps(script: str) -> list[str]:
    """What runs of a bash block: whole lines, or the ``fusionsurgery`` parts of a skipped line."""
    steps = []
    for line in _lines(script):
        if _skipped(line):
            steps += [part.strip() for part in line.split("&&") if part.strip().startswith("fusionsurgery ")]
        else:
            steps.append(line)
    return steps


def _commands(script: str) -> list[str]:
    """The ``fusionsurgery ...`` commands a bash block shows."""
    return [part.strip() for line in _lines(script) for part in re.split(r"&&|\|\||;", line)
            if part.strip().startswith("fusionsurgery ")]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def test_the_pages_exist() -> None:
    from fusionsurgery.cli.app import COMMANDS

    for name, _, _ in COMMANDS:
        assert (ROOT / "docs" / "cli" / f"{name}.md").is_file(), f"no docs/cli/{name}.md for the {name} command"
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200, "README.md is the front door: keep it short"
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in (ROOT / "README.md").read_text(), "CI runs the README's test command verbatim"


def test_every_option_of_a_command_is_on_its_page() -> None:
    import typer

    from fusionsurgery.cli.app import COMMANDS, _register, app

    _register()
    commands = typer.main.get_command(app).commands
    missing = []
    for name, _, _ in COMMANDS:
        text = (ROOT / "docs" / "cli" / f"{name}.md").read_text()
        missing += [f"{name} {opt}" for param in commands[name].params for opt in param.opts
                    if opt.startswith("--") and opt != "--help" and not re.search(re.escape(opt) + r"\b", text)]
    assert not missing, f"options no page mentions: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_links_resolve_inside_the_repository(page: Path) -> None:
    broken = []
    text = _FENCE.sub("", page.read_text())
    assert "shared/DESIGN.md" not in text, f"{_rel(page)} links to DESIGN.md, which users do not have"
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.is_relative_to(ROOT) or not dest.exists():
            broken.append(f"{target} (no such file in the repository)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {_rel(dest)})")
    assert not broken, f"{_rel(page)}: {broken}"


def _runnable_pages() -> list[Path]:
    return [p for p in PAGES if _rel(p) in PYTHON_BLOCKS or any(
        lang == "bash" and any(not _not_run(_rel(p), c) for c in _steps(code)) for lang, code in _blocks(p))]


def _not_run(page: str, command: str) -> bool:
    return any(page == p and command.startswith(start) for p, start in NOT_RUN)


def test_not_run_lists_only_commands_the_docs_show() -> None:
    shown = {(_rel(p), c) for p in PAGES for lang, code in _blocks(p) if lang == "bash" for c in _commands(code)}
    for page, start in NOT_RUN:
        assert any(p == page and c.startswith(start) for p, c in shown), (page, start)


# ---- the sandbox --------------------------------------------------------------------------------

def _mllama(path: Path) -> None:
    from helpers import mllama_model

    mllama_model(True).save_pretrained(str(path))
    (path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "MllamaImageProcessor"}))


def _finetune(path: Path) -> None:
    from helpers import hf_model, save_sharded

    save_sharded(hf_model("llama", seed=3), path)  # the dimensions of _mllama's text model
    (path / "tokenizer.json").write_text('{"version": "1.0"}')


#: Stand-in model names the guides use -> how the sandbox makes a tiny model of that kind.
FIXTURES = {"Llama-3.2-11B-Vision-Instruct": _mllama, "my-llama-3.1-8b-finetune": _finetune}


def _sandbox(tmp: Path) -> Path:
    shutil.copytree(ROOT / "examples" / "tiny-llama", tmp / "examples" / "tiny-llama")
    for script in (ROOT / "examples").glob("*.py"):  # linked: a script finds the repository from its real path
        (tmp / "examples" / script.name).symlink_to(script)
    (tmp / "tmp").mkdir()
    return tmp


def _localise(text: str, box: Path) -> str:
    return text.replace("/tmp/", f"{box}/tmp/")


def _run_step(step: str, box: Path, page: str) -> None:
    from fusionsurgery.cli import main

    for word in shlex.split(step):
        if word in FIXTURES and not (box / word).exists():
            FIXTURES[word](box / word)
    if _plain(step):
        code = main(shlex.split(_localise(step, box))[1:])
        assert code == 0, f"{page}: `{step}` exited {code}"
        return
    script = f'fusionsurgery() {{ {shlex.quote(sys.executable)} -m fusionsurgery "$@"; }}\nset -e\n{_localise(step, box)}\n'
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               # `python` in a documented command is the interpreter running the tests (an unactivated venv too)
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    proc = subprocess.run(["bash", "-c", script], cwd=box, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{page}: `{step}` exited {proc.returncode}: {proc.stderr[-2000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("page", _runnable_pages(), ids=_rel)
def test_documented_commands_run(page: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    box = _sandbox(tmp_path)
    monkeypatch.chdir(box)
    rel = _rel(page)
    python_index = 0
    ran = 0
    for lang, code in _blocks(page):
        if lang == "bash":
            for step in _steps(code):
                if not _not_run(rel, step):
                    _run_step(step, box, rel)
                    ran += 1
        elif lang == "python":
            if python_index in PYTHON_BLOCKS.get(rel, []):
                exec(compile(_localise(code, box), f"{rel} python block {python_index}", "exec"), {})
                ran += 1
            python_index += 1
    capsys.readouterr()
    assert ran, f"{rel}: nothing ran"
