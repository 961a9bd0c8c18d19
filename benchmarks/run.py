#!/usr/bin/env python3
"""Time `fusionsurgery fuse` and `inspect` against the floor (`cp -r`) and mergekit, side by side.

    python benchmarks/run.py --size 3b --repeats 3

For each size it generates a Llama 3.x-shaped base with random bf16 weights (make_checkpoint.py,
kept in the work directory for later runs), then runs, in rotating order each round:

  cp -r BASE OUT                                  the floor: the base's bytes copied once
  sync OUT/*  (right after cp -r, timed apart)     cp leaves data in the page cache; fuse fsyncs
  fusionsurgery fuse BASE --every 4 -o OUT        full copy + new weights, fsynced
  fusionsurgery fuse BASE --every 4 --link -o OUT hard links + new weights
  fusionsurgery fuse BASE --every 4 --adapter-only -o OUT
  dd ... conv=fsync                               writing as many bytes as the new weights: the floor of --link
  dd ... oflag=direct conv=fsync                  the same around the page cache (as fuse writes)
  fusionsurgery inspect BASE                      headers only
  mergekit-yaml passthrough.yml OUT               mergekit rewriting every layer of the one base (own venv)

Every command runs as a direct child (no shell) and is timed wall-clock; its peak RSS is the
child's own ru_maxrss from wait4 (descendants it waited for included). Outputs are measured
(apparent size, and disk blocks not shared with the base: hard links count once) and removed
before the next command. Before each command: `sync`, then either the base is read into the page
cache (--cache warm, the default) or the page cache is dropped (--cache cold; needs root).
Medians (and min-max) over the rounds; ratios are medians over cp -r's median.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_checkpoint
import mergekit_env
from measure import DROP_CACHES, GNU_TIME, can_drop_caches, remove
from report import print_report
from steps import find_cli, run_size
from summary import machine_facts

DEFAULT_WORK = HERE / "work"


STEP_KEYS = ("cp", "cp+sync", "fuse", "fuse-link", "fuse-adapter", "dd-new", "dd-new-direct", "inspect", "startup",
             "mergekit")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1b", help="preset(s), comma-separated: " + ", ".join(make_checkpoint.PRESETS))
    ap.add_argument("--repeats", type=int, default=3, help="rounds (each command once per round)")
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--work-dir", type=Path, default=DEFAULT_WORK, help="bases, outputs, logs (default %(default)s)")
    ap.add_argument("--cache", choices=("warm", "cold"), default="warm",
                    help="warm: read the base into the page cache before each command; cold: drop the page "
                         "cache before each command (root only)")
    ap.add_argument("--steps", default=",".join(STEP_KEYS), help="which steps, comma-separated: %(default)s")
    ap.add_argument("--no-mergekit", action="store_true", help="leave mergekit out (no venv set-up)")
    ap.add_argument("--mergekit-venv", type=Path, default=None, help="mergekit's own venv (default WORK/mergekit-venv)")
    ap.add_argument("--fusionsurgery", default=None, help="the CLI to time (default: the one beside this Python)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated base")
    ap.add_argument("--remove-base", action="store_true", help="delete the generated base after its size's run")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    sizes = [s.strip() for s in args.size.split(",") if s.strip()]
    for s in sizes:
        if s not in make_checkpoint.PRESETS:
            ap.error(f"unknown size {s!r}; choose from {', '.join(make_checkpoint.PRESETS)}")
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = set(args.steps) - set(STEP_KEYS)
    if bad:
        ap.error(f"unknown step(s) {', '.join(sorted(bad))}; choose from {', '.join(STEP_KEYS)}")
    if "cp" not in args.steps:
        args.steps.insert(0, "cp")  # the reference every ratio divides by
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    args.work_dir = args.work_dir.resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    cold = args.cache == "cold"
    if cold and not can_drop_caches():
        ap.error(f"--cache cold needs to write {DROP_CACHES} (root); run warm instead")

    cli = find_cli(args.fusionsurgery)
    mk = None
    if not args.no_mergekit and "mergekit" in args.steps:
        mk = mergekit_env.ensure(args.mergekit_venv or args.work_dir / "mergekit-venv")
    report = {
        "command": "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "repeats": args.repeats, "every": args.every,
        "rss_source": "GNU time %M" if GNU_TIME else "wait4 ru_maxrss (overstates small peaks)",
        "machine": machine_facts(args.work_dir, cli, cold, mk),
        "results": [],
    }
    print_report(report, "head")
    for size in sizes:
        print(f"== {size}", file=sys.stderr)
        report["results"].append(run_size(size, args, cli, mk, cold))
        if args.remove_base:
            remove(args.work_dir / f"base-{size}")
        print_report(report, "last")  # each size's table as soon as it is measured
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report, "notes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
