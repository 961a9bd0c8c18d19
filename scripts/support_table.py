"""Write ``docs/models.md``: what each command does for every model type in transformers' causal-LM mapping.

    python scripts/support_table.py [--results support.json] [--run] [--probe] [-o docs/models.md] [--readme README.md]

Sources, all from runs on this machine's transformers:

- ``--run`` runs ``tests/test_any_decoder_forward.py`` with ``FUSIONSURGERY_SUPPORT_JSON`` set: per type,
  which steps of the full chain passed (fuse, open as the base's class, identity, verify, generate,
  train, save_pretrained -> verify --base, unfuse). ``--results PATH`` reads such a file instead.
- ``--probe`` builds every other type tiny (``tests/any_decoder.py``'s builder: every sub-config of its
  default config shrunk, a vision or audio tower as deep as the text decoder), runs and saves it, fuses it
  (``--every 2``), inspects and verifies it and checks that ``fusionsurgery.hf`` opens it with the closed
  gates giving the base's logits exactly; a type that cannot be built that small, or that a step refuses,
  is listed with the first line of the reason. The multimodal wrappers of transformers' image-text-to-text
  mapping that its causal-LM mapping leaves out (Mistral 3, Qwen2.5-VL ...) are probed the same way, as
  their own ``*ForConditionalGeneration``, and listed in a section of their own.

The native types (``fusionsurgery.modules``) are marked: their forward needs no transformers.

What it rendered from is kept in ``docs/support.json`` (the outcomes, the transformers version and the
causal-LM mapping), and a short summary goes into ``README.md`` between the ``README_BEGIN`` and
``README_END`` markers; ``tests/test_support_table.py`` renders both again from that file and compares.
Without ``--run``/``--probe`` and without ``--results``, the script re-renders from ``docs/support.json``.
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
#: The probe's steps after the build, in order.
PROBE_STEPS = ["fuse", "inspect", "verify", "load", "identity"]
PROBE_TITLES = {"fuse": "fuse", "inspect": "inspect", "verify": "verify", "load": "opens as its class",
                "identity": "closed gates = base"}
STEP_TITLES = {"fuse": "fuse", "load": "opens as its class", "identity": "closed gates = base",
               "verify": "verify", "generate": "generate", "train": "train", "save_pretrained": "save -> verify --base",
               "unfuse": "unfuse"}


def run_tests(results: Path) -> None:
    """The forward suite, recording each type's outcome in ``results``."""
    env = dict(os.environ, FUSIONSURGERY_SUPPORT_JSON=str(results), PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "tests/test_any_decoder_forward.py"],
                   cwd=ROOT, env=env, check=False)


def probe(model_type: str, tmp: Path, wrapper: bool = False) -> dict[str, str]:
    """Build ``model_type`` tiny (``tests/any_decoder.py``'s builder: every sub-config shrunk), fuse it,
    inspect and verify it, open it with ``fusionsurgery.hf``: the outcome of each step.

    A type of the causal-LM mapping is built as ``AutoModelForCausalLM`` builds it; with ``wrapper``, or
    for a type that mapping leaves out (Mistral 3, Qwen2.5-VL ...), as its multimodal wrapper of the
    image-text-to-text mapping (its ``*ForConditionalGeneration``, towers and all), the class
    ``fusionsurgery.hf`` opens it as (by the ``architectures`` its config.json records).
    """
    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "tests"))
    from any_decoder import build_config, instantiate, text_ids

    import fusionsurgery as fs
    import fusionsurgery.hf as hf

    out: dict[str, str] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = build_config(model_type)
            with torch.device("meta"):  # count first: a size the builder does not know stays big
                size = sum(p.numel() for p in instantiate(model_type, config, wrapper).parameters())
            if size > MAX_PROBE_PARAMS:
                return {"build": f"the tiny sizes leave {size / 1e6:.0f}M parameters (sizes of its own the "
                                 "builder does not shrink)"}
            torch.manual_seed(0)
            model = instantiate(model_type, config, wrapper).eval()
            ids = text_ids(config, 8)
            with torch.no_grad():
                own = model(ids).logits  # the tiny base itself runs (else: not ours to judge)
            model.save_pretrained(str(tmp / "base"))
            # the base as transformers loads it (a model in memory may differ from its reload by a rounding)
            reloaded = type(model).from_pretrained(str(tmp / "base"), dtype=torch.float32)
            with torch.no_grad():
                base_logits = reloaded.eval()(ids).logits
            if not torch.allclose(own, base_logits, atol=1e-4, rtol=1e-4):
                return {"build": f"transformers does not reload its own save of the tiny {type(model).__name__} "
                                 "(the logits differ): no base to compare with"}
    except Exception as exc:  # noqa: BLE001 - the table reports why
        return {"build": _first_line(exc)}
    steps = [("fuse", lambda: fs.fuse(tmp / "base", tmp / "fused", every=2)),
             ("inspect", lambda: fs.inspect_checkpoint(tmp / "fused")),
             ("verify", lambda: fs.verify(tmp / "fused").raise_if_failed())]
    for step, run in steps:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run()
            out[step] = "ok"
        except Exception as exc:  # noqa: BLE001
            out[step] = _no_tmp(_first_line(exc))
            if step == "fuse":
                return out
    try:
        fused = hf.from_pretrained(tmp / "fused", dtype=torch.float32).eval()
        states = torch.randn(1, 4, fused.fusion.encoder_dim)
        with torch.no_grad():
            same = torch.equal(fused(ids, cross_attention_states=states).logits, base_logits)
        out["load"] = "ok"
        out["identity"] = "ok" if same else "closed gates differ from the base's logits"
    except Exception as exc:  # noqa: BLE001
        out["load"] = _no_tmp(_first_line(exc))
    return out


def _too_slow(signum: int, frame: Any) -> None:
    raise TimeoutError


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:REASON_CHARS] if text else ''}"


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
        *_type_floors(),
        "### Forward suite",
        "",
        "| model type | class | native | " + " | ".join(STEP_TITLES[s] for s in STEPS) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in STEPS) + " |",
    ]
    for t in sorted(forward):
        steps = forward[t]
        cells = ["yes" if steps.get(s) == "ok" else (steps.get(s) or "-") for s in STEPS]
        lines.append(f"| `{t}` | `{mapping.get(t, '?')}` | {'yes' if t in native else ''} | " + " | ".join(cells) + " |")
    ok = {t for t in probed if _probed_ok(probed[t])} & set(mapping)
    ok -= set(forward)
    lines += ["", f"### Probed ({len(ok)})", "", *_probe_table(sorted(ok), probed, mapping, native)]
    wrappers, wrapped = data.get("wrappers", {}), data.get("wrapper_probe", {})
    if wrappers:
        passed = [t for t in sorted(wrappers) if _probed_ok(wrapped.get(t, {}))]
        lines += ["", f"### Multimodal wrappers ({len(passed)} of {len(wrappers)} pass)", "",
                  "The types of transformers' image-text-to-text mapping whose class there is not the one its "
                  "causal-LM mapping builds (Mistral 3, Qwen2.5-VL, Idefics 3 ...; Qwen3.5 and Llama 4, whose "
                  "causal LM is the text model alone), built as that multimodal wrapper, tiny with every "
                  "sub-config shrunk and the vision (or audio) tower as deep as the text decoder, fused "
                  "`--every 2`: each command's outcome. The fusion layers go into the text decoder, found from "
                  "the config's text part; `fusionsurgery.hf` opens the checkpoint as the wrapper's own class, "
                  "and text-only logits with closed gates are the base's. Wrappers the causal-LM mapping builds "
                  "itself (`gemma3`: `Gemma3ForConditionalGeneration`) are in the tables above.", "",
                  *_probe_table(sorted(wrappers), wrapped, wrappers, native)]
    rest = sorted(set(mapping) - set(forward) - ok)
    lines += ["", f"### Not supported, or not built tiny here ({len(rest)})", "",
              "| model type | class | where it stopped | reason |", "| --- | --- | --- | --- |"]
    for t in rest:
        r = probed.get(t)
        if r is None:
            where, why = "not probed", "run `scripts/support_table.py --probe`"
        else:
            where, why = _stopped(r)
            if where == "build":
                where = "tiny build"
        lines.append(f"| `{t}` | `{mapping[t]}` | {where} | {why.replace('|', '/')} |")
    lines.append("")
    return "\n".join(lines)


def _probed_ok(r: dict[str, str]) -> bool:
    """Every probe step passed."""
    return bool(r) and all(r.get(step, "ok") == "ok" for step in PROBE_STEPS) and r.get("identity") == "ok"


def _stopped(r: dict[str, str]) -> tuple[str, str]:
    """(the first probe step that did not pass, its reason without the probe's temporary directory)."""
    where = next((s for s in ["build", *PROBE_STEPS] if s in r and r[s] != "ok"), "?")
    return where, _no_tmp(r.get(where, ""))


def _no_tmp(text: str) -> str:
    """``text`` without the probe's temporary directory (``/tmp/probe-gpt2-x1y2/fused`` -> ``fused``)."""
    return re.sub(r"\S*/probe-[^/\s]+/", "", text)


def _probe_table(types: list[str], probed: dict[str, Any], classes: dict[str, str], native: set[str]) -> list[str]:
    """Rows of the probe's outcome per step for ``types``: yes, or where it stopped and why."""
    lines = ["| model type | class | native | " + " | ".join(PROBE_TITLES[s] for s in PROBE_STEPS) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in PROBE_STEPS) + " |"]
    for t in types:
        r = probed.get(t)
        if r is None:
            cells = ["not probed"] + ["-"] * (len(PROBE_STEPS) - 1)
        elif "build" in r:
            cells = [f"not built: {_stopped(r)[1]}"] + ["-"] * (len(PROBE_STEPS) - 1)
        else:
            cells = ["yes" if r.get(s) == "ok" else (_stopped({s: r[s]})[1] if s in r else "-") for s in PROBE_STEPS]
        cells = [c.replace("|", "/") for c in cells]
        lines.append(f"| `{t}` | `{classes.get(t, '?')}` | {'yes' if t in native else ''} | " + " | ".join(cells) + " |")
    return lines


def outcomes(data: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    """Every type of ``mapping`` sorted by outcome: ``whole_chain``, ``forward`` (the further types of the
    suite), ``probed``, ``refused`` (type -> the surgery's reason) and ``not_built`` (type -> why)."""
    forward, probed = data.get("forward", {}), data.get("probe", {})
    whole = sorted(t for t, steps in forward.items() if all(steps.get(s) == "ok" for s in STEPS))
    ok = sorted(t for t, r in probed.items() if _probed_ok(r) and t not in forward and t in mapping)
    refused: dict[str, str] = {}
    not_built: dict[str, str] = {}
    for t in sorted(set(mapping) - set(forward) - set(ok)):
        r = probed.get(t)
        if r is None:
            not_built[t] = "not probed"
            continue
        where, why = _stopped(r)
        (not_built if where == "build" else refused)[t] = why
    wrappers = data.get("wrappers", {})
    return {"whole_chain": whole, "forward": sorted(set(forward) - set(whole)), "probed": ok,
            "refused": refused, "not_built": not_built,
            "wrappers": sorted(t for t in wrappers if _probed_ok(data.get("wrapper_probe", {}).get(t, {})))}


#: The README's generated block lies between these two lines.
README_BEGIN = "<!-- support summary: generated by scripts/support_table.py (edit the script, not this block) -->"
README_END = "<!-- end of support summary -->"


def summary(data: dict[str, Any], native: set[str], mapping: dict[str, str], version: str) -> str:
    """The README's block: counts per outcome, the refused types with their reasons, a link to the table."""
    o = outcomes(data, mapping)
    own = sorted(native & set(mapping))
    lines = [
        README_BEGIN,
        f"Every model type of transformers {version}'s causal-LM mapping ({len(mapping)}), as the tests found "
        "it ([full table](docs/models.md)):",
        "",
        "| outcome | types |",
        "| --- | --- |",
        f"| native ({', '.join(own)}): every command on the project's own modules, also through transformers | "
        f"{len(own)} |",
        "| every command through transformers, the whole chain (fuse, open as its class, closed gates = base, "
        f"verify, generate, train, save -> verify --base, unfuse) | {len(o['whole_chain'])} |",
        "| fuse, inspect, verify's no-forward checks, unfuse; opens as its class, closed gates = base, generates | "
        f"{len(o['forward'])} |",
        f"| probed: fused, inspect, verify, opens as its class, closed gates = base | "
        f"{len(set(o['probed']) - set(own))} |",
        f"| stopped at a step (fuse, inspect, verify, opening through transformers), with the reason below | "
        f"{len(o['refused'])} |",
        f"| not built tiny here (the reason in the table: a package it needs, not a decoder, transformers' own "
        f"build fails at the test sizes) | {len(o['not_built'])} |",
        "",
        *([f"Multimodal wrappers of the image-text-to-text mapping whose class is not the causal-LM mapping's "
           f"(Mistral 3, Qwen2.5-VL, Qwen3.5 and Llama 4 with their towers ...), each tower as deep as the text "
           f"decoder: {len(o['wrappers'])} of {len(data.get('wrappers', {}))} fuse into the text decoder and pass "
           "inspect, verify and closed gates = base through `fusionsurgery.hf` (the others: "
           "[table](docs/models.md)).", ""]
          if data.get("wrappers") else []),
        "Stopped:",
        "",
    ]
    probed = data.get("probe", {})
    lines += [f"- `{t}` ({_stopped(probed.get(t, {}))[0]}): {_reason(why)}"
              for t, why in o["refused"].items()] or ["- none"]
    lines += [README_END]
    return "\n".join(lines)


#: Reasons are kept to their first this many characters (``_first_line``).
REASON_CHARS = 160


def _reason(why: str) -> str:
    """A reason for the README: without the exception's class name; one cut short ends at a separator, with '...'."""
    text = re.sub(r"^\w+(Error|Failed): ", "", why).replace("|", "/").strip()
    if len(why) >= len(why.split(": ", 1)[0]) + 2 + REASON_CHARS:  # cut by _first_line
        cut = max(text.rfind("; "), text.rfind(", "))
        text = (text[:cut] if cut > 0 else text) + " ..."
    return text


def replace_block(text: str, block: str) -> str:
    """``text`` with the lines from ``README_BEGIN`` to ``README_END`` replaced by ``block``.

    Raises:
        ValueError: the markers are missing (or out of order).
    """
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"the markers {README_BEGIN!r} ... {README_END!r} are not in the README")
    return text[:start] + block + text[end + len(README_END):]


def models_page(kept: str, data: dict[str, Any], native: set[str], mapping: dict[str, str], version: str) -> str:
    """docs/models.md: the hand-written part ``kept``, the marker, the generated table."""
    return kept + GENERATED + "\n\n" + render(data, native, mapping, version)


def load_record(path: Path) -> tuple[dict[str, Any], dict[str, str], str]:
    """(results, causal-LM mapping, transformers version) as ``docs/support.json`` keeps them."""
    doc = json.loads(path.read_text())
    return doc["results"], doc["mapping"], doc["transformers"]


def _type_floors() -> list[str]:
    """Lines naming the types that need a newer transformers than the ``[hf]`` floor (the library's own table)."""
    from fusionsurgery._requirements import HF_FLOORS, TRANSFORMERS_FOR_TYPE

    if not TRANSFORMERS_FOR_TYPE:
        return []
    types = ", ".join(f"`{t}` {f.release}" for t, f in sorted(TRANSFORMERS_FOR_TYPE.items()))
    return [f"The suite also runs at transformers {HF_FLOORS['transformers']}, the `[hf]` floor "
            f"(`scripts/check_versions.sh floors`); these types need a newer release, which `fusionsurgery.hf` and "
            f"`verify` ask for in one line: {types} (why: [install](install.md)).", ""]


#: Everything above this line of docs/models.md is written by hand and kept; what follows is generated.
GENERATED = "<!-- generated by scripts/support_table.py from the test results: edit above this line -->"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=None,
                    help="per-type outcomes (written by --run / --probe, read to render) [.pytest_cache/support.json]")
    ap.add_argument("--run", action="store_true", help="run the forward suite first")
    ap.add_argument("--probe", action="store_true", help="probe every type not in the suite")
    ap.add_argument("-o", "--out", type=Path, default=ROOT / "docs" / "models.md")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md", help="the README whose summary block is rewritten")
    ap.add_argument("--record", type=Path, default=ROOT / "docs" / "support.json",
                    help="what the pages were rendered from (written after --run / --probe / --results)")
    args = ap.parse_args()
    args.results_given = args.results is not None
    args.results = args.results or ROOT / ".pytest_cache" / "support.json"
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
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    data["wrappers"] = {t: c for t, c in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.items() if mapping.get(t) != c}
    if args.probe:
        import torch

        torch.set_num_threads(1)
        probed = data.setdefault("probe", {})
        signal.signal(signal.SIGALRM, _too_slow)
        wrapped = data.setdefault("wrapper_probe", {})
        todo = [(t, False, probed) for t in sorted(set(mapping) - set(data.get("forward", {})) - set(probed))]
        todo += [(t, True, wrapped) for t in sorted(set(data["wrappers"]) - set(wrapped))]
        for t, wrapper, record in todo:
            t0 = time.time()
            with tempfile.TemporaryDirectory(prefix=f"probe-{t}-") as tmp:
                signal.alarm(PROBE_SECONDS)
                try:
                    record[t] = probe(t, Path(tmp), wrapper)
                except TimeoutError:
                    record[t] = {"build": f"the probe took more than {PROBE_SECONDS} s"}
                finally:
                    signal.alarm(0)
            print(f"{t}{' (wrapper)' if wrapper else ''}: {record[t]} ({time.time() - t0:.1f} s)", flush=True)
            args.results.write_text(json.dumps(data, indent=1, sort_keys=True))
    version = transformers.__version__
    if not (args.run or args.probe or args.results_given):  # re-render what was recorded
        data, mapping, version = load_record(args.record)
    else:
        args.record.write_text(json.dumps({"transformers": version, "mapping": mapping, "results": data},
                                          indent=1, sort_keys=True) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    kept = args.out.read_text().split(GENERATED, 1)[0] if args.out.exists() and GENERATED in args.out.read_text() else ""
    args.out.write_text(models_page(kept, data, set(MODEL_TYPES), mapping, version))
    args.readme.write_text(replace_block(args.readme.read_text(), summary(data, set(MODEL_TYPES), mapping, version)))
    print(f"wrote {args.out}, {args.readme} and {args.record}")


if __name__ == "__main__":
    main()
