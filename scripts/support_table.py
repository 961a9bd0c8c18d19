"""Write ``docs/models.md``: what each command does for every model type in transformers' causal-LM mapping.

    python scripts/support_table.py [--results support.json] [--run] [--probe] [-o docs/models.md]

Sources, all from runs on this machine's transformers:

- ``--run`` runs ``tests/test_any_decoder_forward.py`` with ``FUSIONSURGERY_SUPPORT_JSON`` set: per type,
  which steps of the full chain passed (fuse, open as the base's class, identity, verify, generate,
  train, save_pretrained -> verify --base, unfuse). ``--results PATH`` reads such a file instead.
- ``--probe`` builds every other type tiny (``tests/any_decoder.py``'s sizes, no per-type overrides),
  runs and saves it, fuses it (``--every 2``) and checks that ``fusionsurgery.hf`` opens it with the closed
  gates giving the base's logits exactly; a type that cannot be built that small, or that ``fuse``
  refuses, is listed with the first line of the reason.

The native types (``fusionsurgery.modules``) are marked: their forward needs no transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: A probed model larger than this is not built (its config has sizes the tiny ones do not reach).
MAX_PROBE_PARAMS = 20_000_000
#: Seconds one probe may take.
PROBE_SECONDS = 90
STEPS = ["fuse", "load", "identity", "verify", "generate", "train", "save_pretrained", "unfuse"]
STEP_TITLES = {"fuse": "fuse", "load": "opens as its class", "identity": "closed gates = base",
               "verify": "verify", "generate": "generate", "train": "train", "save_pretrained": "save -> verify --base",
               "unfuse": "unfuse"}


def run_tests(results: Path) -> None:
    """The forward suite, recording each type's outcome in ``results``."""
    env = dict(os.environ, FUSIONSURGERY_SUPPORT_JSON=str(results), PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "tests/test_any_decoder_forward.py"],
                   cwd=ROOT, env=env, check=False)


def probe(model_type: str, tmp: Path) -> dict[str, str]:
    """Build ``model_type`` tiny, fuse it, open it with ``fusionsurgery.hf``: the outcome of each step."""
    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "tests"))
    from any_decoder import TINY

    import fusionsurgery as fs
    import fusionsurgery.hf as hf

    out: dict[str, str] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = transformers.AutoConfig.for_model(model_type, **TINY)
            with torch.device("meta"):  # count first: some types keep big sub-configs the tiny sizes miss
                size = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
            if size > MAX_PROBE_PARAMS:
                return {"build": f"the tiny sizes leave {size / 1e6:.0f}M parameters (sub-configs of their own)"}
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config).eval()
            ids = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                model(ids)  # the tiny base itself runs (else: not ours to judge)
            model.save_pretrained(str(tmp / "base"))
            # the base as transformers loads it (a model in memory may differ from its reload by a rounding)
            reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp / "base"), dtype=torch.float32)
            with torch.no_grad():
                base_logits = reloaded.eval()(ids).logits
    except Exception as exc:  # noqa: BLE001 - the table reports why
        return {"build": _first_line(exc)}
    try:
        fs.fuse(tmp / "base", tmp / "fused", every=2)
        out["fuse"] = "ok"
    except Exception as exc:  # noqa: BLE001
        out["fuse"] = _first_line(exc)
        return out
    try:
        fused = hf.from_pretrained(tmp / "fused", dtype=torch.float32).eval()
        states = torch.randn(1, 4, fused.fusion.encoder_dim)
        with torch.no_grad():
            same = torch.equal(fused(ids, cross_attention_states=states).logits, base_logits)
        out["load"] = "ok"
        out["identity"] = "ok" if same else "closed gates differ from the base's logits"
    except Exception as exc:  # noqa: BLE001
        out["load"] = _first_line(exc)
    return out


def _too_slow(signum: int, frame: Any) -> None:
    raise TimeoutError


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def render(data: dict[str, Any], native: set[str], mapping: dict[str, str], version: str) -> str:
    """The Markdown page."""
    forward, probed = data.get("forward", {}), data.get("probe", {})
    lines = [
        "## Supported model types",
        "",
        f"Generated by `scripts/support_table.py` from test runs against transformers {version}; every "
        f"model type in transformers' causal-LM mapping ({len(mapping)}) is listed.",
        "",
        "- **forward suite**: a tiny model of the type, built and saved by transformers in "
        "`tests/test_any_decoder_forward.py`, went through the steps marked yes (the types issue 20 names take "
        "every step; the others stop after the closed-gate logits and generation, marked -).",
        "- **probed**: built tiny, fused `--every 2`, opened by `fusionsurgery.hf` as its own class, closed "
        "gates gave the base's logits exactly (the other steps use the same code, untested for the type).",
        "- **native**: `fusionsurgery.modules` implements the type: `verify`, `load_fused` and the torchtune "
        "contract run without transformers (`tests/test_hf.py`, `tests/test_verify.py` ...).",
        "- anything else: the reason, as the step that stopped reported it.",
        "",
        "`fuse`, `inspect`, `unfuse`, `--adapter-only`, `--link` and `graft` never import transformers; "
        "`verify`'s forward checks, `fusionsurgery.hf` (loading, `generate`, training, PEFT, gradient "
        "checkpointing, `save_pretrained`) run through the base's own transformers class for every type "
        "without native modules (`pip install \"fusionsurgery[hf]\"`).",
        "",
        "### Forward suite",
        "",
        "| model type | class | native | " + " | ".join(STEP_TITLES[s] for s in STEPS) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in STEPS) + " |",
    ]
    for t in sorted(forward):
        steps = forward[t]
        cells = ["yes" if steps.get(s) == "ok" else (steps.get(s) or "-") for s in STEPS]
        lines.append(f"| `{t}` | `{mapping.get(t, '?')}` | {'yes' if t in native else ''} | " + " | ".join(cells) + " |")
    ok = {t for t, r in probed.items() if r.get("identity") == "ok"}
    ok -= set(forward)
    lines += ["", f"### Probed ({len(ok)})", "", "| model type | class | native |", "| --- | --- | --- |"]
    for t in sorted(ok):
        lines.append(f"| `{t}` | `{mapping.get(t, '?')}` | {'yes' if t in native else ''} |")
    rest = sorted(set(mapping) - set(forward) - ok)
    lines += ["", f"### Not supported, or not built tiny here ({len(rest)})", "",
              "| model type | class | where it stopped | reason |", "| --- | --- | --- | --- |"]
    for t in rest:
        r = probed.get(t)
        if r is None:
            where, why = "not probed", "run `scripts/support_table.py --probe`"
        else:
            where = next((s for s in ("build", "fuse", "load", "identity") if s in r and r[s] != "ok"), "?")
            why = r.get(where, "")
            if where == "build":
                where = "tiny build"
        why = re.sub(r"\S*/probe-[^/\s]+/(base|fused)/", "", why)  # the probe's temporary directory
        lines.append(f"| `{t}` | `{mapping[t]}` | {where} | {why.replace('|', '/')} |")
    lines.append("")
    return "\n".join(lines)


#: Everything above this line of docs/models.md is written by hand and kept; what follows is generated.
GENERATED = "<!-- generated by scripts/support_table.py from the test results: edit above this line -->"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=ROOT / ".pytest_cache" / "support.json",
                    help="per-type outcomes (written by --run / --probe, read to render)")
    ap.add_argument("--run", action="store_true", help="run the forward suite first")
    ap.add_argument("--probe", action="store_true", help="probe every type not in the suite")
    ap.add_argument("-o", "--out", type=Path, default=ROOT / "docs" / "models.md")
    args = ap.parse_args()
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    sys.path.insert(0, str(ROOT))
    from fusionsurgery.arch.config import MODEL_TYPES

    args.results.parent.mkdir(parents=True, exist_ok=True)
    if args.run:
        run_tests(args.results)
    data = json.loads(args.results.read_text()) if args.results.exists() else {}
    mapping = dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if args.probe:
        import torch

        torch.set_num_threads(1)
        probed = data.setdefault("probe", {})
        signal.signal(signal.SIGALRM, _too_slow)
        for t in sorted(set(mapping) - set(data.get("forward", {})) - set(probed)):
            t0 = time.time()
            with tempfile.TemporaryDirectory(prefix=f"probe-{t}-") as tmp:
                signal.alarm(PROBE_SECONDS)
                try:
                    probed[t] = probe(t, Path(tmp))
                except TimeoutError:
                    probed[t] = {"build": f"the probe took more than {PROBE_SECONDS} s"}
                finally:
                    signal.alarm(0)
            print(f"{t}: {probed[t]} ({time.time() - t0:.1f} s)", flush=True)
            args.results.write_text(json.dumps(data, indent=1, sort_keys=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    kept = args.out.read_text().split(GENERATED, 1)[0] if args.out.exists() and GENERATED in args.out.read_text() else ""
    args.out.write_text(kept + GENERATED + "\n\n" + render(data, set(MODEL_TYPES), mapping, transformers.__version__))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
