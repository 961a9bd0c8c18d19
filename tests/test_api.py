"""The lazy top-level API: every public name resolves, and no function shares its name with a subpackage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import make_base

ROOT = Path(__file__).resolve().parents[1]


def test_verify_and_export_stay_callable_after_every_subpackage_is_imported(tmp_path: Path) -> None:
    base, _ = make_base(tmp_path)
    code = f"""
import fusionsurgery as fs
import fusionsurgery.verification, fusionsurgery.exporting, fusionsurgery.native, fusionsurgery.inspection
fused = fs.fuse({str(base)!r}, every=2).output
report = fs.verify(fused, device="cpu")
assert report.ok, report.failures
result = fs.export(fused, {str(tmp_path / 'tune')!r}, to="torchtune")
assert (result.output / "config.json").exists()
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


def test_no_public_function_is_named_like_a_subpackage() -> None:
    import pkgutil

    import fusionsurgery as fs

    subpackages = {m.name for m in pkgutil.iter_modules(fs.__path__)}
    assert not subpackages & set(fs._API), subpackages & set(fs._API)
    for name in fs._API:
        assert callable(getattr(fs, name)), name


def test_no_module_is_named_like_a_standard_library_module() -> None:
    import pkgutil

    import fusionsurgery as fs

    stdlib = set(sys.stdlib_module_names) - {"io"}  # fusionsurgery.io: a package, only ever imported by its full name
    clashes = sorted(m.name for m in pkgutil.walk_packages(fs.__path__, "fusionsurgery.")
                     if m.name.rsplit(".", 1)[-1] in stdlib)
    assert not clashes, clashes
