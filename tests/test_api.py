"""The lazy top-level API: names that are also subpackages stay callable after the import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import make_base

ROOT = Path(__file__).resolve().parents[1]


def test_verify_and_export_stay_callable_after_their_subpackages_are_imported(tmp_path: Path) -> None:
    base, _ = make_base(tmp_path)
    code = f"""
import fusionsurgery as fs
import fusionsurgery.verification, fusionsurgery.exporting  # binds the package attributes to the subpackages
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
