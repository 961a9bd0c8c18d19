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


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (module -> modules it imports) as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for other in sorted(graph.get(node, ())):
            if state.get(other) == 1:
                return path[path.index(other):] + [other]
            if other not in state and (found := visit(other)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_package_has_a_circle() -> None:
    """Within every package, modules import each other in one direction: no module reaches itself again
    through the others (imports inside functions count too: a deferred import hides a circle, it does
    not remove it)."""
    circles = []
    for package in sorted({p.parent for p in ROOT.rglob("*.py")}):
        here = package.relative_to(ROOT).parts
        graph: dict[str, set[str]] = {}
        for path in package.glob("*.py"):
            if path.stem == "__init__":  # the package's front door re-exports its modules
                continue
            graph[path.stem] = {target[len(here)] for target in _imports(path)
                                if target[:len(here)] == here and len(target) > len(here)
                                and target[len(here)] != path.stem and (package / f"{target[len(here)]}.py").exists()}
        cycle = _cycle(graph)
        if cycle:
            circles.append(f"{'/'.join(here) or 'fusionsurgery'}: {' -> '.join(cycle)}")
    assert not circles, circles
