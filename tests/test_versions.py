"""Declared versions: the floors in pyproject.toml, the one-line refusal of a missing or too-old transformers,
and the examples extra's own floor (matplotlib) where it is installed (scripts/check_versions.sh installs it)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from fusionsurgery import _requirements
from fusionsurgery._requirements import HF_FLOORS, MissingDependencyError, release, require, require_hf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import version_pins  # noqa: E402


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_every_dependency_declares_a_floor_and_the_extras_agree():
    project = _project()
    extras = list(project["optional-dependencies"])
    pins = version_pins.floors(extras)  # raises SystemExit for a requirement without '>='
    assert {"torch", "transformers", "accelerate", "safetensors", "typer"} <= set(pins)
    # A package named in several extras has one floor: the same bound everywhere.
    for extra in extras:
        for name, floor in version_pins.floors([extra]).items():
            assert release(floor) == release(pins[name]), f"[{extra}] declares {name}>={floor}, elsewhere >={pins[name]}"


def test_the_code_checks_the_floors_pyproject_declares():
    hf = version_pins.floors(["hf"])
    for name, floor in HF_FLOORS.items():
        assert release(hf[name]) == release(floor), f"pyproject [hf] says {name}>={hf[name]}, _requirements {floor}"


def test_release_reads_the_numeric_part():
    assert release("5.0") == (5, 0, 0)
    assert release("5.0.0rc1") == release("5.0.0.dev0") == (5, 0, 0)
    assert release("2.13.0+cpu") == (2, 13, 0)
    assert release("4.57.6") < release("5.0") < release("5.10.1")
    with pytest.raises(ValueError):
        release("unknown")


def _installed(versions: dict[str, str | None]):
    """A stand-in for ``installed_version``: the given packages as given, the rest as really installed."""
    real = _requirements.installed_version

    def fake(package: str) -> str | None:
        return versions[package] if package in versions else real(package)

    return fake


@pytest.mark.parametrize("found, state", [(None, "it is not installed"), ("4.57.6", "4.57.6 is installed")])
def test_a_missing_or_old_transformers_is_refused_in_one_line(monkeypatch, found, state):
    monkeypatch.setattr(_requirements, "installed_version", _installed({"transformers": found}))
    with pytest.raises(MissingDependencyError) as info:
        require_hf()
    message = str(info.value)
    assert "\n" not in message
    assert f"transformers >= {HF_FLOORS['transformers']} ({state})" in message
    assert 'pip install "fusionsurgery[hf]"' in message
    assert isinstance(info.value, ImportError)  # `except ImportError` around an optional import still works


def test_accelerate_may_be_missing_but_not_too_old(monkeypatch):
    monkeypatch.setattr(_requirements, "installed_version", _installed({"transformers": "5.0.0", "accelerate": None}))
    require_hf()
    monkeypatch.setattr(_requirements, "installed_version", _installed({"transformers": "5.0.0", "accelerate": "1.1.1"}))
    with pytest.raises(MissingDependencyError, match=r"accelerate >= 1\.3\.0 \(1\.1\.1 is installed\)"):
        require_hf()


def test_the_floor_itself_and_newer_releases_pass(monkeypatch):
    monkeypatch.setattr(_requirements, "installed_version",
                        _installed({"transformers": HF_FLOORS["transformers"], "accelerate": "99.0"}))
    require_hf()
    require("transformers", "5.0", extra="hf", user="x")  # "5.0" and "5.0.0" are the same floor


def test_a_copy_without_metadata_is_read_from_its_module(monkeypatch):
    def no_metadata(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(_requirements.metadata, "version", no_metadata)
    monkeypatch.setitem(sys.modules, "fake_dependency", type(sys)("fake_dependency"))
    sys.modules["fake_dependency"].__version__ = "3.1"
    assert _requirements.installed_version("fake_dependency") == "3.1"
    assert _requirements.installed_version("surely_no_such_module_here") is None


IMPORT_WITH = """
import sys
from importlib import metadata
real = metadata.version
def version(name):
    if name == "transformers":
        if {found!r} is None:
            raise metadata.PackageNotFoundError(name)
        return {found!r}
    return real(name)
metadata.version = version
if {found!r} is None:
    sys.modules["transformers"] = None  # not importable either
try:
    import fusionsurgery.hf
except ImportError as exc:
    print(type(exc).__name__ + ": " + str(exc))
    sys.exit(3)
"""


@pytest.mark.parametrize("found", [None, "4.46.0"])
def test_importing_fusionsurgery_hf_without_the_floor_says_what_to_install(found):
    run = subprocess.run([sys.executable, "-c", IMPORT_WITH.format(found=found)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert run.returncode == 3, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("MissingDependencyError: fusionsurgery.hf needs transformers >= 5.0.0")
    assert 'pip install "fusionsurgery[hf]"' in lines[0]
    assert ("not installed" if found is None else f"{found} is installed") in lines[0]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="matplotlib is in the [examples] extra only (scripts/check_versions.sh installs it)")
def test_the_examples_loss_plot_draws_with_the_installed_matplotlib(tmp_path, monkeypatch):
    example = ROOT / "examples" / "real_parts"
    monkeypatch.syspath_prepend(str(example))  # run.py imports its sibling parts.py
    spec = importlib.util.spec_from_file_location("real_parts_run_for_versions", example / "run.py")
    run = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, run)  # its dataclasses look their module up there
    spec.loader.exec_module(run)
    out = tmp_path / "loss.png"
    run.plot([4.0, 3.1, 2.7, 2.2, 2.0, 1.7, 1.6, 1.5], out, "loss")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 2000
