"""Build and save a tiny random checkpoint of any decoder type transformers knows (needs transformers).

    python examples/make_any_decoder.py gemma3_text examples/out/tiny-gemma3

The sizes per type are the test suite's (``tests/any_decoder.py``: 4 layers, width 64, vocabulary
128, plus what each type's config needs to stay small); run without arguments to list the types.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the shared builder of the tests

from any_decoder import ALL_TYPES, missing_reason, save_tiny  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: make_any_decoder.py MODEL_TYPE OUT_DIR\nmodel types: {', '.join(ALL_TYPES)}", file=sys.stderr)
        return 2
    model_type, out = argv
    reason = missing_reason(model_type)
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    save_tiny(model_type, Path(out))
    print(f"{out}: a tiny {model_type} checkpoint")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
