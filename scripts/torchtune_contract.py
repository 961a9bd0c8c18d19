#!/usr/bin/env python
"""Run torchtune's own ``model_fusion`` unit tests against fusionsurgery's classes.

    python scripts/torchtune_contract.py PATH/TO/TORCHTUNE-SOURCE [-- extra pytest arguments]

PATH is an extracted torchtune source tree (any release from 0.3.0 on, or main): its
``tests/torchtune/modules/model_fusion/`` files run unchanged, with ``torchtune.modules.model_fusion``
redirected to ``fusionsurgery`` (``FusionLayer``, ``FusionEmbedding``, ``DeepFusionModel``,
``register_fusion_module``, ``get_fusion_params``). The other torchtune pieces the tests import
(``torchtune.training.seed``, the tree's ``tests/test_utils.py`` helpers) are the real ones: an
installed ``torchtune`` must import (``pip install --no-deps torchtune==0.6.1 torchao==0.10.0`` and
its import dependencies; see the README). A test file that imports a name fusionsurgery does not
provide (``EarlyFusionModel``) is listed as outside the contract and not run.

Prints one line per test file and the totals; exits 0 when every test that ran passed, 1 when one
failed, 2 on unusable input.
"""

from __future__ import annotations

import ast
import sys
import tempfile
import types
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path("tests/torchtune/modules/model_fusion")
TARGET = "torchtune.modules.model_fusion"


def ours() -> dict[str, object]:
    """The names ``torchtune.modules.model_fusion`` is redirected to."""
    from fusionsurgery.modules import (DeepFusionModel, FusionEmbedding, FusionLayer, get_fusion_params,
                                       register_fusion_module)

    return {"DeepFusionModel": DeepFusionModel, "FusionEmbedding": FusionEmbedding, "FusionLayer": FusionLayer,
            "get_fusion_params": get_fusion_params, "register_fusion_module": register_fusion_module}


def imported_names(path: Path) -> set[str]:
    """The names a test file imports from ``torchtune.modules.model_fusion``."""
    tree = ast.parse(path.read_text(), str(path))
    return {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == TARGET
            for a in node.names}


def redirect(names: dict[str, object]) -> None:
    """Import the real torchtune, then point ``torchtune.modules.model_fusion`` at ``names``."""
    import torchtune.modules
    import torchtune.training.seed  # noqa: F401  (the tests' set_seed: the real one)

    alias = types.ModuleType(TARGET, "fusionsurgery's model-fusion classes, standing in for torchtune's")
    alias.__dict__.update(names)
    alias.__all__ = sorted(names)
    sys.modules[TARGET] = alias
    torchtune.modules.model_fusion = alias


def used_ours(path: Path, names: dict[str, object]) -> bool:
    """Whether the loaded test module ``path`` holds fusionsurgery's objects under the names it imported."""
    module = next((m for m in list(sys.modules.values())
                   if Path(getattr(m, "__file__", None) or "/").resolve() == path.resolve()), None)
    return module is not None and all(getattr(module, n, None) is names[n] for n in imported_names(path))


class Tally:
    """A pytest plugin counting outcomes per test file."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter] = {}

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or report.outcome != "passed":
            outcome = "error" if report.failed and report.when != "call" else report.outcome
            self.counts.setdefault(report.nodeid.split("::")[0], Counter())[outcome] += 1

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.counts.setdefault(report.nodeid, Counter())["error"] += 1


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    src = Path(argv[0]).resolve()
    extra = argv[2:] if argv[1:2] == ["--"] else argv[1:]
    folder = src / TESTS
    files = sorted(folder.glob("test_*.py")) if folder.is_dir() else []
    if not files:
        print(f"error: {src} has no {TESTS}/test_*.py (give an extracted torchtune source tree)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    names = ours()
    try:
        redirect(names)
    except Exception as e:  # noqa: BLE001  (any import failure of torchtune: say so in one line)
        print(f"error: torchtune does not import here ({type(e).__name__}: {e}); see the README's "
              "'torchtune's own tests' section for what to install", file=sys.stderr)
        return 2
    run, outside = [], []
    for f in files:
        missing = sorted(imported_names(f) - set(names))
        (outside if missing else run).append((f, missing))
    import pytest

    tally = Tally()
    with tempfile.TemporaryDirectory() as tmp:
        ini = Path(tmp) / "pytest.ini"
        ini.write_text("[pytest]\n")  # not the tree's own settings (its plugins are not needed here)
        args = ["-q", "-c", str(ini), "--rootdir", str(src), "--noconftest", "-p", "no:cacheprovider",
                *[str(f) for f, _ in run], *extra]
        code = pytest.main(args, plugins=[tally])
    stray = [f.name for f, _ in run if not used_ours(f, names)]
    if stray:
        print(f"error: {', '.join(stray)} did not run against fusionsurgery's classes", file=sys.stderr)
        return 1
    total: Counter = Counter()
    print(f"\ntorchtune's model_fusion tests from {src}, against fusionsurgery:")
    for f, _ in run:
        c = tally.counts.get(str(f.relative_to(src)), Counter())
        total += c
        print(f"  {f.name:28s} {c['passed']} passed, {c['failed']} failed, {c['error']} errors, {c['skipped']} skipped")
    for f, missing in outside:
        print(f"  {f.name:28s} not run: imports {', '.join(missing)}, which fusionsurgery does not provide")
    print(f"{total['passed']} passed, {total['failed'] + total['error']} failed")
    return 0 if code == 0 and not total["failed"] and not total["error"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
