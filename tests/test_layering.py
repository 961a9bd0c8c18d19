"""The package layering ARCHITECTURE.md describes holds: nothing imports upward, the CLI has no circles."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "fusionsurgery"

#: Rank of each top-level part of the package: a part imports only parts of a lower rank (and itself).
LAYERS = {
    "errors": 0, "version": 0, "_requirements": 0, "units": 0,
    "io": 1,
    "arch": 2,
    "modules": 3, "surgery": 3,
    "native": 4, "inspection": 4,
    "exporting": 5, "hf": 5,
    "verification": 6, "transplant": 6,
    "cli": 7,
    "__init__": 8, "__main__": 8,
}


def _imports(path: Path) -> list[tuple[str, ...]]:
    """Absolute module paths (as tuples, inside fusionsurgery) of every relative import in ``path``."""
    here = path.relative_to(ROOT).parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[:len(here) - (node.level - 1)]
            target = (*base, *(node.module.split(".") if node.module else ()))
            found += [target] if node.module else [(*target, a.name) for a in node.names]
    return found


def _part(parts: tuple[str, ...]) -> str:
    return parts[0].removesuffix(".py")


def test_every_part_has_a_rank() -> None:
    parts = {_part(p.relative_to(ROOT).parts) for p in ROOT.rglob("*.py")}
    assert not parts - set(LAYERS), f"add {sorted(parts - set(LAYERS))} to LAYERS (and to ARCHITECTURE.md)"


def test_nothing_imports_upward() -> None:
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        part = _part(path.relative_to(ROOT).parts)
        for target in _imports(path):
            other = _part(target)
            if other != part and LAYERS.get(other, -1) >= LAYERS[part]:
                upward.append(f"{path.relative_to(ROOT)} imports {'.'.join(target)}")
    assert not upward, upward


def test_commands_are_registered_in_one_place_and_never_import_each_other() -> None:
    from fusionsurgery.cli.app import COMMANDS

    cli = ROOT / "cli"
    commands = {module for _, module, _ in COMMANDS}
    assert commands == {p.stem for p in cli.glob("*_cmd.py")}
    for module in commands:
        for target in _imports(cli / f"{module}.py"):
            assert target[:2] != ("cli", "app"), f"{module} imports the app: app.py registers commands"
            assert not (target[0] == "cli" and target[-1].endswith("_cmd")), f"{module} imports {'.'.join(target)}"
