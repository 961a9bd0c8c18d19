"""The support table (docs/models.md) and the README's summary of it are what ``scripts/support_table.py``
renders now from the outcomes it recorded (docs/support.json), and that record covers the suites' types."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from any_decoder import ALL_TYPES, REFUSED

from fusionsurgery.arch.model_types import MODEL_TYPES

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("support_table", ROOT / "scripts" / "support_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("support_table", module)
    spec.loader.exec_module(module)
    return module


def test_models_page_is_the_scripts_rendering_of_the_record():
    st = _script()
    data, mapping, version = st.load_record(ROOT / "docs" / "support.json")
    text = (ROOT / "docs" / "models.md").read_text()
    assert st.GENERATED in text
    kept = text.split(st.GENERATED, 1)[0]
    assert text == st.models_page(kept, data, set(MODEL_TYPES), mapping, version), \
        "docs/models.md is stale: run python scripts/support_table.py (add --run --probe to test again)"


def test_readme_summary_is_the_scripts_rendering_of_the_record():
    st = _script()
    data, mapping, version = st.load_record(ROOT / "docs" / "support.json")
    readme = (ROOT / "README.md").read_text()
    assert readme.count(st.README_BEGIN) == 1 and readme.count(st.README_END) == 1
    block = st.summary(data, set(MODEL_TYPES), mapping, version)
    assert block in readme, "README.md's support summary is stale: run python scripts/support_table.py"
    assert f"transformers {version}" in block and "(docs/models.md)" in block
    o = st.outcomes(data, mapping)
    counted = sum(len(o[k]) for k in ("whole_chain", "forward", "probed", "refused", "not_built"))
    assert counted == len(mapping)  # every type of the mapping is counted once
    assert all(f"- `{t}` (" in block for t in o["refused"])


def test_the_record_holds_every_suite_type_and_refusal():
    """Adding a type to tests/any_decoder.py (or a refusal) needs the table run again."""
    st = _script()
    data, mapping, _ = st.load_record(ROOT / "docs" / "support.json")
    missing = sorted(set(ALL_TYPES) - set(data.get("forward", {})))
    assert not missing, f"types of the suite not in the recorded run: {missing} (python scripts/support_table.py --run)"
    refused = st.outcomes(data, mapping)["refused"]
    assert set(REFUSED) <= set(refused), sorted(set(REFUSED) - set(refused))
