"""The ``Example:`` blocks of the public API's docstrings run and print what they say.

They are written as one session on the shipped example checkpoint (``fuse`` first, then the readers), so
they run here in that order in one namespace, with ``/tmp/`` standing for a test directory.
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest
import torch

import fusionsurgery as fs

ROOT = Path(__file__).resolve().parents[1]
#: (module, object) whose docstring examples run, in the order they build on each other.
SESSION = [
    ("fusionsurgery.units", "human_bytes"), ("fusionsurgery.units", "human_count"),
    ("fusionsurgery.surgery.fuse", "fuse"), ("fusionsurgery.verification.runner", "verify"),
    ("fusionsurgery.native.loading", "load_fused"), ("fusionsurgery.inspection.describe", "inspect_checkpoint"),
    ("fusionsurgery.modules.fusion", "get_fusion_params"), ("fusionsurgery.hf.loading", "from_pretrained"),
    ("fusionsurgery.exporting", "export"), ("fusionsurgery.exporting.unfuse", "unfuse"),
]


def test_the_examples_run_as_one_session(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(ROOT)  # the examples name examples/tiny-llama relative to the repository
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    globs = {"fs": fs, "torch": torch}
    ran = 0
    for module, name in SESSION:
        mod = importlib.import_module(module)
        globs.setdefault(name, getattr(mod, name))  # as the module's own doctests would see it
        doc = getattr(mod, name).__doc__
        assert doc and "Example:" in doc, f"{module}.{name} has no Example block"
        test = parser.get_doctest(doc.replace("/tmp/", f"{tmp_path}/"), globs, f"{module}.{name}", module, 0)
        assert test.examples, f"{module}.{name}"
        result = runner.run(test, clear_globs=False)
        assert result.failed == 0, f"{module}.{name}: {result.failed} example(s) failed (see the output above)"
        ran += result.attempted
    assert ran >= 2 * len(SESSION)
