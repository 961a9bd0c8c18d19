"""Model types that need a newer transformers than the ``[hf]`` floor: the library's one table
(``fusionsurgery._requirements.TRANSFORMERS_FOR_TYPE``), the one-line refusal by ``fusionsurgery.hf`` and by
``verify``'s transformers engine below a type's release (the installed version monkeypatched), and the
suite's skip list, which reads the same table. A few seconds in all."""

from __future__ import annotations

from pathlib import Path

import pytest

import fusionsurgery as fs
from fusionsurgery import _requirements
from fusionsurgery._requirements import HF_FLOORS, TRANSFORMERS_FOR_TYPE, TypeFloor, release, type_floor_problem
from fusionsurgery.errors import UsageError
from helpers import error_lines, run_cli

ROOT = Path(__file__).resolve().parents[1]
TEST_FLOOR = TypeFloor("5.99.0", "a test entry")


def _pretend_installed(monkeypatch, version: str) -> None:
    """``installed_version('transformers')`` answers ``version``; every other package as really installed."""
    real = _requirements.installed_version
    monkeypatch.setattr(_requirements, "installed_version", lambda p: version if p == "transformers" else real(p))


def test_every_entry_is_above_the_hf_floor_and_says_why():
    for model_type, floor in TRANSFORMERS_FOR_TYPE.items():
        assert release(floor.release) > release(HF_FLOORS["transformers"]), model_type
        assert floor.reason.strip() and "\n" not in floor.reason, model_type


@pytest.mark.parametrize("model_type", sorted(TRANSFORMERS_FOR_TYPE) or ["llama"])
def test_the_refusal_names_the_type_both_releases_and_the_upgrade(monkeypatch, model_type):
    monkeypatch.setitem(TRANSFORMERS_FOR_TYPE, model_type, TRANSFORMERS_FOR_TYPE.get(model_type, TEST_FLOOR))
    needed = TRANSFORMERS_FOR_TYPE[model_type].release
    message = type_floor_problem(model_type, HF_FLOORS["transformers"])
    assert message is not None and "\n" not in message
    assert message.startswith(f"model type {model_type!r} needs transformers >= {needed} "
                              f"({HF_FLOORS['transformers']} is installed: ")
    assert message.endswith(f'pip install -U "transformers>={needed}"')
    assert TRANSFORMERS_FOR_TYPE[model_type].reason in message
    assert type_floor_problem(model_type, needed) is None  # the release itself is enough
    assert type_floor_problem(model_type, f"{needed}.dev0") is None  # so is a development build of it
    _pretend_installed(monkeypatch, "5.0.1")  # by default the installed release is judged
    assert type_floor_problem(model_type) == type_floor_problem(model_type, "5.0.1")


def test_types_without_an_entry_and_unknown_versions_pass():
    assert type_floor_problem("llama", "5.0.0") is None
    assert type_floor_problem("surely_no_such_type", "5.0.0") is None
    for model_type in TRANSFORMERS_FOR_TYPE:
        assert type_floor_problem(model_type, "not-a-version") is None  # a source checkout: let it run


def test_fusionsurgery_hf_refuses_the_type_below_its_release(monkeypatch, tmp_path):
    hf = pytest.importorskip("fusionsurgery.hf")
    fused = tmp_path / "fused"
    fs.fuse(ROOT / "examples" / "tiny-llama", fused, every=2, seed=1)
    monkeypatch.setitem(TRANSFORMERS_FOR_TYPE, "llama", TEST_FLOOR)
    _pretend_installed(monkeypatch, "5.2.0")
    with pytest.raises(UsageError) as info:
        hf.from_pretrained(fused)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{fused}: model type 'llama' needs transformers >= 5.99.0")
    assert "(5.2.0 is installed: a test entry)" in message
    monkeypatch.setitem(TRANSFORMERS_FOR_TYPE, "llama", TypeFloor("5.2.0", "a test entry"))
    assert hf.from_pretrained(fused).fusion.layers  # at the release itself it loads


def test_verify_refuses_the_type_in_one_line_before_any_check(monkeypatch, tmp_path, capsys):
    pytest.importorskip("fusionsurgery.hf")
    from any_decoder import save_tiny

    fused = tmp_path / "fused"
    fs.fuse(save_tiny("gpt2", tmp_path / "base"), fused, every=2, seed=1)  # not native: transformers' engine
    monkeypatch.setitem(TRANSFORMERS_FOR_TYPE, "gpt2", TEST_FLOOR)
    _pretend_installed(monkeypatch, "5.2.0")
    code, err = run_cli(["verify", str(fused)], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert error_lines(err) == [f"error: {type_floor_problem('gpt2', '5.2.0')}"], err


def test_the_suite_skips_by_the_library_table(monkeypatch):
    transformers = pytest.importorskip("transformers")
    import any_decoder

    monkeypatch.setitem(TRANSFORMERS_FOR_TYPE, "gpt2", TypeFloor("99.0.0", "a test entry"))
    reason = any_decoder.missing_reason("gpt2")
    assert reason == type_floor_problem("gpt2", transformers.__version__) and ">= 99.0.0" in reason
    [param] = any_decoder.type_params(["gpt2"])
    assert [m.kwargs["reason"] for m in param.marks] == [reason]
    monkeypatch.delitem(TRANSFORMERS_FOR_TYPE, "gpt2")
    assert any_decoder.missing_reason("gpt2") is None
