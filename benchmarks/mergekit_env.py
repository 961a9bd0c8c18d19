#!/usr/bin/env python3
"""mergekit in a virtual environment of its own, for the benchmark's "conversion script" baseline.

mergekit pins its own torch and transformers, so it never goes into the project's environment:
it gets a venv under the benchmark's work directory (`benchmarks/work/mergekit-venv` by default),
installed from PyPI with pip. `ensure()` reports why it is unavailable instead of raising, so a
benchmark run goes on without that row.

    python benchmarks/mergekit_env.py [--venv DIR]     # set it up (or report it is there)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path

DEFAULT_VENV = Path(__file__).resolve().parent / "work" / "mergekit-venv"
PACKAGE = "mergekit"


@dataclass
class MergekitEnv:
    venv: Path
    exe: Path | None  # mergekit-yaml, or None when unavailable
    version: str | None
    note: str  # how it was found, or why it is unavailable

    @property
    def ok(self) -> bool:
        return self.exe is not None


def _bin(venv_dir: Path, name: str) -> Path:
    return venv_dir / ("Scripts" if os.name == "nt" else "bin") / name


def _version(venv_dir: Path) -> str | None:
    py = _bin(venv_dir, "python")
    if not py.exists():
        return None
    r = subprocess.run([str(py), "-c", f"import importlib.metadata as m; print(m.version({PACKAGE!r}))"],
                       capture_output=True, text=True, check=False)
    return r.stdout.strip() if r.returncode == 0 else None


def probe(venv_dir: Path = DEFAULT_VENV) -> MergekitEnv:
    """What is there now, installing nothing."""
    exe = _bin(venv_dir, "mergekit-yaml")
    version = _version(venv_dir)
    if exe.exists() and version:
        return MergekitEnv(venv_dir, exe, version, f"mergekit {version} in {venv_dir}")
    return MergekitEnv(venv_dir, None, None, f"mergekit is not installed in {venv_dir}")


def ensure(venv_dir: Path = DEFAULT_VENV, *, install: bool = True, log: Path | None = None,
           pip_args: list[str] | None = None) -> MergekitEnv:
    """mergekit's venv, created and installed when missing (``install``); never raises for pip failures."""
    found = probe(venv_dir)
    if found.ok or not install:
        return found
    log = log or venv_dir.with_name(venv_dir.name + "-install.log")
    print(f"setting up {PACKAGE} in its own venv {venv_dir} (log: {log}); this downloads torch and takes minutes",
          file=sys.stderr)
    try:
        venv_dir.parent.mkdir(parents=True, exist_ok=True)
        if not _bin(venv_dir, "python").exists():
            venv.EnvBuilder(with_pip=True, clear=True).create(venv_dir)
        with open(log, "w") as fh:
            r = subprocess.run([str(_bin(venv_dir, "python")), "-m", "pip", "install", PACKAGE, *(pip_args or [])],
                               stdout=fh, stderr=subprocess.STDOUT, check=False)
    except OSError as exc:
        return MergekitEnv(venv_dir, None, None, f"could not create a venv for mergekit: {exc}")
    if r.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        return MergekitEnv(venv_dir, None, None,
                           f"pip could not install {PACKAGE} for Python {sys.version.split()[0]} "
                           f"(exit {r.returncode}; see {log}): {' | '.join(tail)}")
    found = probe(venv_dir)
    if not found.ok:
        found.note = f"pip installed {PACKAGE} but mergekit-yaml is missing from {venv_dir}"
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("pip_args", nargs="*", help="extra arguments for pip install (e.g. an index for CPU torch)")
    args = ap.parse_args(argv)
    env = ensure(args.venv, pip_args=args.pip_args)
    print(env.note)
    return 0 if env.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
