"""The floors pyproject.toml declares, as pip constraints: ``name==floor`` for every dependency.

Usage::

    python3 scripts/version_pins.py [--extras hf,test,examples] [--torch 2.13.0] > floors.txt
    python scripts/version_pins.py --check-installed floors.txt [--fix]  # in the venv: every pin holds

Each requirement of the project (core and the chosen extras) must carry a ``>=`` lower bound; its
floor is that release, which pip then installs exactly (``==5.0`` matches ``5.0.0``), so a floor that
names no release the registry serves fails the install instead of passing silently. A name in
several extras takes the highest of its floors. torch is the exception: its floor cannot be
installed on a machine without a GPU-sized download (older torch wheels on PyPI are CUDA builds
of several GB), so it is pinned to ``--torch`` (the CPU build on disk) and reported as such.
Standard library only (tomllib: Python 3.11+).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*?)\s*(?:;.*)?$")


def normalise(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def release(version: str) -> tuple[int, ...]:
    """``"5.0"`` -> ``(5, 0, 0)``: the numeric release, padded, for comparing floors."""
    parts = tuple(int(p) for p in re.match(r"\d+(?:\.\d+)*", version).group(0).split("."))
    return parts + (0,) * (3 - len(parts))


def floors(extras: list[str], pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """``{distribution: floor}`` for the core dependencies and ``extras``.

    Raises:
        SystemExit: a requirement has no ``>=`` bound, or an extra is not declared.
    """
    project = tomllib.loads(pyproject.read_text())["project"]
    declared = project.get("optional-dependencies", {})
    requirements = list(project.get("dependencies", []))
    for extra in extras:
        if extra not in declared:
            raise SystemExit(f"pyproject.toml declares no extra [{extra}] (it has: {', '.join(sorted(declared))})")
        requirements += declared[extra]
    out: dict[str, str] = {}
    for req in requirements:
        match = REQUIREMENT.match(req)
        bound = re.search(r">=\s*([0-9][^,\s]*)", match.group(2)) if match else None
        if bound is None:
            raise SystemExit(f"pyproject.toml: {req!r} has no '>=' floor; every dependency must declare one")
        name, floor = normalise(match.group(1)), bound.group(1)
        if name not in out or release(floor) > release(out[name]):
            out[name] = floor
    return out


def check_installed(pins_file: Path, fix: bool = False) -> int:
    """Compare the running environment with ``name==version`` pins; print each mismatch; 0 when all hold.

    A pin also fails when another installed distribution ships files into the same top-level package
    and the package, as imported, reports another version (typer-slim < 0.22 ships ``typer/`` too, and
    transformers 5.0 pulls it in): the code tested would not be the pinned release's. With ``fix``,
    such pins are reinstalled (their files written last) and checked again.
    """
    from importlib import metadata

    dists = {normalise(d.metadata["Name"]): d for d in metadata.distributions()}
    owners: dict[str, set[str]] = {}
    for name, dist in dists.items():
        for top in _top_level(dist):
            owners.setdefault(top, set()).add(name)
    bad, shadowed = 0, []
    for line in pins_file.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, want = (part.strip() for part in line.split("==", 1))
        dist = dists.get(normalise(name))
        if dist is None or release(dist.version) != release(want):
            print(f"  {name}: pinned {want}, installed {dist.version if dist else 'nothing'}")
            bad += 1
            continue
        for top in _top_level(dist):
            if len(owners[top]) > 1:
                imported = _imported_version(top)
                if imported is not None and release(imported) != release(want):
                    others = ", ".join(sorted(owners[top] - {normalise(name)}))
                    print(f"  {name}: pinned {want}, but `import {top}` gives {imported} ({top}/ is also shipped by "
                          f"{others}); reinstall the pin last: pip install --no-deps --force-reinstall {name}=={want}")
                    shadowed.append(f"{name}=={want}")
    if shadowed and fix and not bad:
        print(f"  reinstalling {', '.join(shadowed)} so that its own files are the ones imported")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", *shadowed],
                       check=True)
        return check_installed(pins_file)
    return 1 if bad or shadowed else 0


def _top_level(dist: object) -> set[str]:
    """The top-level packages a distribution installs files into (``typer`` for typer and old typer-slim)."""
    tops = set()
    for f in getattr(dist, "files", None) or []:
        parts = Path(str(f)).parts
        if len(parts) > 1 and parts[1] == "__init__.py" and not parts[0].endswith((".dist-info", ".data")):
            tops.add(parts[0])
    return tops


def _imported_version(module: str) -> str | None:
    """``module.__version__`` as this interpreter imports it (in a subprocess: nothing stays loaded here)."""
    code = f"import {module}; print(getattr({module}, '__version__', ''))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return (run.stdout.strip() or None) if run.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--extras", default="hf,test,examples", help="comma-separated extras (default: hf,test,examples)")
    ap.add_argument("--torch", default="2.13.0", help="the torch release to pin instead of torch's floor")
    ap.add_argument("--check-installed", type=Path, metavar="PINS", help="check the running venv against PINS")
    ap.add_argument("--fix", action="store_true", help="with --check-installed: reinstall pins whose files were overwritten")
    args = ap.parse_args(argv)
    if args.check_installed:
        return check_installed(args.check_installed, fix=args.fix)
    pins = floors([e for e in args.extras.split(",") if e])
    for name, floor in sorted(pins.items()):
        if name == "torch":
            print(f"torch=={args.torch}  # declared floor {floor}: not installable here (CUDA wheels), untested")
        else:
            print(f"{name}=={floor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
