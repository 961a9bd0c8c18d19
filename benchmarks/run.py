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
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_checkpoint
import mergekit_env

DEFAULT_WORK = HERE / "work"
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
READ_CHUNK = 64 * 1024 * 1024


# --------------------------------------------------------------------------- running and measuring
@dataclass
class Sample:
    wall: float
    maxrss_kib: int
    rc: int
    cpu: float = 0.0  # user + system seconds of the command (its threads and waited-for children)


GNU_TIME = shutil.which("time") if Path("/usr/bin/time").exists() or shutil.which("time") else None


def run_measured(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Sample:
    """Run ``argv`` (no shell), wall-clock it and read its peak RSS.

    The peak comes from GNU time (`time -f %M`) when installed: a small C process forks the command,
    so the figure is the command's own. Without it, wait4's ru_maxrss of a direct child is used, which
    on Linux is at least this Python's own peak (the child is vforked from it), so small peaks are
    overstated.
    """
    rss_file = log.with_suffix(".rss")
    cmd = [GNU_TIME, "-f", "%M %U %S", "-o", str(rss_file), *argv] if GNU_TIME else argv
    with open(log, "ab") as fh:
        fh.write(f"\n$ {' '.join(argv)}\n".encode())
        fh.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    maxrss, cpu = int(usage.ru_maxrss), usage.ru_utime + usage.ru_stime
    if GNU_TIME:
        try:
            rss, user, system = rss_file.read_text().strip().splitlines()[-1].split()
            maxrss, cpu = int(rss), float(user) + float(system)
        except (OSError, ValueError, IndexError):
            pass
        rss_file.unlink(missing_ok=True)
    return Sample(wall, maxrss, proc.returncode, cpu)


def sync_all() -> None:
    os.sync()


def drop_caches() -> None:
    os.sync()
    DROP_CACHES.write_text("3\n")


def can_drop_caches() -> bool:
    try:
        with open(DROP_CACHES, "w") as fh:
            fh.write("1\n")
        return True
    except OSError:
        return False


def warm(paths: list[Path]) -> None:
    """Read every file under ``paths`` so it sits in the page cache."""
    buf = bytearray(READ_CHUNK)
    for p in paths:
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file():
                with open(f, "rb", buffering=0) as fh:
                    while fh.readinto(buf):
                        pass


def files_under(p: Path) -> list[Path]:
    if not p.exists():
        return []
    return [f for f in sorted(p.rglob("*")) if f.is_file() and not f.is_symlink()]


def inodes(p: Path) -> set[tuple[int, int]]:
    return {(st.st_dev, st.st_ino) for st in (f.stat() for f in files_under(p))}


def output_size(out: Path, base_inodes: set[tuple[int, int]]) -> tuple[int, int]:
    """(apparent bytes, disk bytes of blocks not shared with the base; each inode once)."""
    apparent, disk, seen = 0, 0, set(base_inodes)
    for f in files_under(out):
        st = f.stat()
        apparent += st.st_size
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            disk += st.st_blocks * 512
    return apparent, disk


def remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()
    for stale in p.parent.glob(f".{p.name}.tmp-*"):  # an interrupted fuse's staging directory
        shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------- the steps
@dataclass
class Step:
    key: str
    label: str  # the command as a user would type it
    what: str  # one line: what it does
    argv: list[str] | None = None  # None: derived or skipped
    out: Path | None = None
    env: dict[str, str] | None = None
    expect_bytes: int = 0  # free disk needed for its output
    skip: str | None = None  # why it is not run
    samples: list[Sample] = field(default_factory=list)
    apparent: int | None = None
    new_disk: int | None = None


def cli_help(exe: list[str], *args: str) -> str:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    r = subprocess.run([*exe, *args, "--help"], check=False, capture_output=True, text=True, env=env)
    return r.stdout + r.stderr


def find_cli(arg: str | None) -> list[str]:
    if arg:
        return [arg]
    beside = Path(sys.executable).parent / "fusionsurgery"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("fusionsurgery")
    return [found] if found else [sys.executable, "-m", "fusionsurgery"]


def mergekit_config(base: Path, num_layers: int, path: Path) -> Path:
    path.write_text(
        "# fusionsurgery benchmark baseline: mergekit's passthrough over every layer of one base model.\n"
        "# It loads each tensor and writes it again (same bytes) into new shards: a model rewrite, the\n"
        "# 'conversion script' way of moving the bytes. It cannot add cross-attention layers.\n"
        "slices:\n"
        "  - sources:\n"
        f"      - model: {base}\n"
        f"        layer_range: [0, {num_layers}]\n"
        "merge_method: passthrough\n"
        "dtype: bfloat16\n"
    )
    return path


def build_steps(size: str, base: Path, work: Path, cli: list[str], mk: mergekit_env.MergekitEnv | None,
                new_bytes: int, every: int, wanted: set[str]) -> list[Step]:
    preset = make_checkpoint.PRESETS[size]
    base_bytes = make_checkpoint.total_bytes(preset)
    fuse_help = cli_help(cli, "fuse")
    top_help = cli_help(cli)
    has_link = "--link" in fuse_help
    has_adapter = "--adapter-only" in fuse_help
    has_inspect = re.search(r"^\W*inspect\b", top_help, re.MULTILINE) is not None
    fuse = [*cli, "fuse", str(base), "--every", str(every), "-o"]
    o = lambda name: work / f"out-{size}-{name}"
    steps = [
        Step("cp", "cp -r BASE OUT", "copies the base's files (coreutils cp: copy_file_range, no fsync)",
             ["cp", "-r", str(base), str(o("cp"))], o("cp"), expect_bytes=base_bytes),
        Step("cp+sync", "cp -r BASE OUT; sync OUT/*", "cp -r, then fsync of every copied file (a durable copy, as fuse makes)"),
        Step("fuse", f"fusionsurgery fuse BASE --every {every} -o OUT",
             "copies every base shard (digesting it), writes the new weights, fsyncs",
             [*fuse, str(o("fuse"))], o("fuse"), expect_bytes=base_bytes + new_bytes),
        Step("fuse-link", f"fusionsurgery fuse BASE --every {every} --link -o OUT",
             "hard-links the base shards (digesting them), writes the new weights, fsyncs",
             [*fuse, str(o("link")), "--link"], o("link"), expect_bytes=new_bytes,
             skip=None if has_link else "this fusionsurgery has no `fuse --link`"),
        Step("fuse-adapter", f"fusionsurgery fuse BASE --every {every} --adapter-only -o OUT",
             "writes only the new weights + config/manifest (digests the base)",
             [*fuse, str(o("adapter")), "--adapter-only"], o("adapter"), expect_bytes=new_bytes,
             skip=None if has_adapter else "this fusionsurgery has no `fuse --adapter-only`"),
        Step("dd-new", "dd if=/dev/zero of=OUT/x conv=fsync (new weights' size)",
             "writes as many bytes as the new weights and fsyncs: the floor of --link",
             ["dd", "if=/dev/zero", f"of={o('dd') / 'new.bin'}", "bs=16M", f"count={new_bytes}",
              "iflag=count_bytes", "conv=fsync", "status=none"], o("dd"), expect_bytes=new_bytes,
             skip=None if new_bytes else "size of the new weights unknown"),
        Step("dd-new-direct", "dd if=/dev/zero of=OUT/x oflag=direct conv=fsync (new weights' size)",
             "writes as many bytes as the new weights around the page cache (O_DIRECT, as fuse does) and fsyncs",
             ["dd", "if=/dev/zero", f"of={o('dd') / 'new.bin'}", "bs=16M", f"count={new_bytes}",
              "iflag=count_bytes", "oflag=direct", "conv=fsync", "status=none"], o("dd"), expect_bytes=new_bytes,
             skip=None if new_bytes else "size of the new weights unknown"),
        Step("inspect", "fusionsurgery inspect BASE", "reads every shard's header and the config, prints a summary",
             [*cli, "inspect", str(base)], skip=None if has_inspect else "this fusionsurgery has no `inspect`"),
        Step("startup", "fusionsurgery --version", "CLI start-up alone", [*cli, "--version"]),
    ]
    if mk is not None:
        cfg = mergekit_config(base, preset.layers, work / f"mergekit-{size}.yml")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
        steps.append(Step(
            "mergekit", "mergekit-yaml passthrough.yml OUT --no-copy-tokenizer",
            f"mergekit {mk.version or '?'} passthrough of layers [0, {preset.layers}) of the one base: loads every "
            "tensor with torch and writes it again (same bytes, its own 5B-param shards, config, README)",
            [str(mk.exe), str(cfg), str(o("mergekit")), "--no-copy-tokenizer"] if mk.ok else None,
            o("mergekit"), env=env, expect_bytes=base_bytes, skip=None if mk.ok else mk.note))
    return [s for s in steps if s.key in wanted]


# --------------------------------------------------------------------------- one size
def ensure_base(size: str, work: Path, seed: int) -> Path:
    base = work / f"base-{size}"
    if not (base / "config.json").exists():
        print(f"generating the {size} base in {base} ...", file=sys.stderr)
        make_checkpoint.write_checkpoint(size, base, seed, force=True)
    return base


def measure_new_bytes(cli: list[str], base: Path, work: Path, every: int, log: Path) -> int:
    """Warm-up run (untimed): fuse once and read the size of the new weights' shards."""
    out = work / "out-warmup"
    remove(out)
    argv = [*cli, "fuse", str(base), "--every", str(every), "-o", str(out)]
    if "--adapter-only" in cli_help(cli, "fuse"):
        argv.append("--adapter-only")
    s = run_measured(argv, log)
    try:
        if s.rc != 0:
            print(f"warm-up fuse failed (exit {s.rc}); see {log}", file=sys.stderr)
            return 0
        return sum(f.stat().st_size for f in out.glob("fusion-*.safetensors"))
    finally:
        remove(out)


def run_size(size: str, args: argparse.Namespace, cli: list[str], mk: mergekit_env.MergekitEnv | None,
             cold: bool) -> dict:
    work: Path = args.work_dir
    base = ensure_base(size, work, args.seed)
    log = work / f"run-{size}.log"
    log.write_text("")
    new_bytes = measure_new_bytes(cli, base, work, args.every, log)
    steps = build_steps(size, base, work, cli, mk, new_bytes, args.every, set(args.steps))
    base_inodes = inodes(base)
    runnable = [s for s in steps if s.argv is not None and s.skip is None]
    by_key = {s.key: s for s in steps}
    for s in runnable:
        if s.out is not None:
            remove(s.out)
    for r in range(args.repeats):
        order = runnable[r % len(runnable):] + runnable[:r % len(runnable)] if runnable else []
        for s in order:
            free = shutil.disk_usage(work).free
            if s.expect_bytes and free < s.expect_bytes + 2 * 2**30:
                raise SystemExit(f"{s.label}: needs {s.expect_bytes / 1e9:.1f} GB (+2 GB margin), only "
                                 f"{free / 1e9:.1f} GB free in {work}")
            if s.key.startswith("dd-new"):
                s.out.mkdir(parents=True, exist_ok=True)
            sync_all()
            if cold:
                drop_caches()
            else:
                warm([base])
            sample = run_measured(s.argv, log, s.env)
            if sample.rc != 0:
                s.skip = f"exit status {sample.rc} (see {log})"
                print(f"  {s.key}: {s.skip}", file=sys.stderr)
                if s.out is not None:
                    remove(s.out)
                runnable = [x for x in runnable if x is not s]
                continue
            s.samples.append(sample)
            if s.key == "cp" and "cp+sync" in by_key:
                synced = run_measured(["sync", *map(str, files_under(s.out))], log)
                by_key["cp+sync"].samples.append(
                    Sample(sample.wall + synced.wall, max(sample.maxrss_kib, synced.maxrss_kib), synced.rc,
                           sample.cpu + synced.cpu))
            if s.out is not None:
                s.apparent, s.new_disk = output_size(s.out, base_inodes)
                if s.key == "cp" and "cp+sync" in by_key:
                    by_key["cp+sync"].apparent, by_key["cp+sync"].new_disk = s.apparent, s.new_disk
                remove(s.out)
            print(f"  round {r + 1}/{args.repeats} {s.key:13s} {sample.wall:8.2f} s  "
                  f"{sample.maxrss_kib / 1024:8.0f} MiB  cpu {sample.cpu:6.2f} s", file=sys.stderr)
    sync_all()
    preset = make_checkpoint.PRESETS[size]
    return {
        "size": size,
        "model_shapes": preset.model,
        "base": str(base),
        "base_bytes": make_checkpoint.total_bytes(preset),
        "base_files": len(list(base.glob("*.safetensors"))),
        "new_bytes": new_bytes,
        "steps": with_floor([step_summary(s, by_key.get("cp"), by_key.get("cp+sync")) for s in steps],
                            make_checkpoint.total_bytes(preset), new_bytes),
    }


def with_floor(rows: list[dict], base_bytes: int, new_bytes: int) -> list[dict]:
    """Add the floors and each step's ratio to them:

    - floor: the durable copy plus writing the new bytes (medians of cp -r; sync and of dd);
    - scaled: the durable copy scaled to the bytes a full fuse writes, (cp -r; sync) x (base + new) / base
      (#15's target for `fuse`: at most 1.1x);
    - new: writing the new bytes alone, the faster of the two dd runs (#15's target for --link and
      --adapter-only: at most 1.2x)."""
    by = {r["key"]: r for r in rows}
    cps = by.get("cp+sync")
    dds = [by[k]["median_s"] for k in ("dd-new", "dd-new-direct") if k in by and by[k]["median_s"]]
    cps_med = cps["median_s"] if cps and cps["median_s"] else None
    floor = cps_med + min(dds) if cps_med and dds else None
    scaled = cps_med * (base_bytes + new_bytes) / base_bytes if cps_med and base_bytes else None
    new_floor = min(dds) if dds else None
    for r in rows:
        med = r["median_s"]
        r["ratio_floor"] = med / floor if floor and med is not None else None
        r["ratio_scaled"] = med / scaled if scaled and med is not None else None
        r["ratio_new"] = med / new_floor if new_floor and med is not None else None
    if floor is not None:
        cp = by.get("cp")
        at = max(rows.index(by[k]) for k in ("dd-new", "dd-new-direct") if k in by) + 1
        rows.insert(at, {
            "key": "floor", "command": "floor: (cp -r; sync) + faster dd", "skip": None,
            "what": "medians of cp -r; sync and of the faster dd added: the base copied once plus the new bytes written",
            "walls_s": [], "median_s": floor, "min_s": None, "max_s": None,
            "ratio_cp": floor / cp["median_s"] if cp and cp["median_s"] else None,
            "ratio_cp_sync": floor / cps_med, "ratio_floor": 1.0, "ratio_scaled": floor / scaled if scaled else None,
            "ratio_new": floor / new_floor, "peak_rss_bytes": None, "cpu_s": None, "output_bytes": None,
            "output_new_disk_bytes": None,
        })
    return rows


def step_summary(s: Step, cp: Step | None, cpsync: Step | None) -> dict:
    walls = [x.wall for x in s.samples]
    med = statistics.median(walls) if walls else None

    def ratio(ref: Step | None) -> float | None:
        if med is None or ref is None or not ref.samples:
            return None
        return med / statistics.median(x.wall for x in ref.samples)

    return {
        "key": s.key, "command": s.label, "what": s.what, "skip": s.skip,
        "walls_s": [round(w, 4) for w in walls],
        "median_s": med, "min_s": min(walls) if walls else None, "max_s": max(walls) if walls else None,
        "ratio_cp": ratio(cp), "ratio_cp_sync": ratio(cpsync),
        "peak_rss_bytes": max(x.maxrss_kib for x in s.samples) * 1024 if s.samples else None,
        "cpu_s": statistics.median(x.cpu for x in s.samples) if s.samples else None,
        "output_bytes": s.apparent, "output_new_disk_bytes": s.new_disk,
    }


# --------------------------------------------------------------------------- machine facts
def machine_facts(work: Path, cli: list[str], cold: bool, mk: mergekit_env.MergekitEnv | None) -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        pass
    fs, dev = "?", "?"
    try:
        real, best = str(work.resolve()), ""
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            mnt = parts[1]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, dev, fs = mnt, parts[0], parts[2]
    except OSError:
        pass

    def out(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, check=False, capture_output=True, text=True, cwd=HERE).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"

    commit = out(["git", "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, capture_output=True, text=True,
                           cwd=HERE).stdout.strip()
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_bytes": mem,
        "work_dir": str(work),
        "filesystem": f"{fs} on {dev}",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fusionsurgery": out([*cli, "--version"]),
        "git_commit": commit + ("+dirty" if dirty else ""),
        "cp": out(["cp", "--version"]),
        "mergekit": (mk.note if mk is not None else "not requested (--no-mergekit)"),
        "page_cache": ("cold: page cache dropped before every command" if cold else
                       "warm: the base read into the page cache before every command"),
    }


# --------------------------------------------------------------------------- printing
def human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def secs(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def print_report(report: dict, part: str = "all") -> None:
    """part: 'head' (machine facts), 'last' (the latest size's table), 'notes', or 'all'."""
    from rich.console import Console

    console = Console(width=max(120, shutil.get_terminal_size((160, 40)).columns))
    m = report["machine"]
    if part in ("head", "all"):
        _print_head(console, report, m)
    results = report["results"] if part == "all" else report["results"][-1:] if part == "last" else []
    for res in results:
        _print_table(console, report, res)
    if part in ("notes", "all"):
        _print_notes(console, report)


def _print_head(console, report: dict, m: dict) -> None:
    console.print(f"[bold]fusionsurgery benchmark[/]  {m['date']}  ({report['command']})")
    console.print(f"machine: {m['cpu']}, {m['cores']} cores, {human(m['ram_bytes'])} RAM; work dir {m['work_dir']} "
                  f"({m['filesystem']}); Linux {m['kernel']}; Python {m['python']}")
    console.print(f"tools: {m['fusionsurgery']} (git {m['git_commit']}); {m['cp']}; {m['mergekit']}")
    console.print(f"page cache: {m['page_cache']}; {report['repeats']} rounds, commands in rotating order; "
                  "medians (min-max)")


def _print_table(console, report: dict, res: dict) -> None:
    from rich.table import Table

    title = (f"{res['size']} ({res['model_shapes']} shapes): base {human(res['base_bytes'])} in "
             f"{res['base_files']} file(s); new weights (--every {report['every']}) {human(res['new_bytes'])}")
    t = Table(title=title, title_justify="left")
    for col, just in (("step", "left"), ("median s", "right"), ("min-max s", "right"), ("cpu s", "right"),
                      ("x cp -r", "right"),
                      ("x cp+sync", "right"), ("x floor", "right"), ("x scaled", "right"), ("x dd new", "right"),
                      ("peak RSS", "right"), ("output", "right"),
                      ("new disk", "right")):
        t.add_column(col, justify=just)
    for s in res["steps"]:
        if s["skip"] or s["median_s"] is None and s["key"] != "cp+sync":
            t.add_row(s["command"], "skipped", s["skip"] or "", "", "", "", "", "", "", "", "", "")
            continue
        rng = f"{secs(s['min_s'])}-{secs(s['max_s'])}" if s["min_s"] is not None else "-"
        moves = s["key"] not in ("inspect", "startup")  # a ratio to a copy means nothing for these
        t.add_row(s["command"], secs(s["median_s"]), rng, secs(s.get("cpu_s")),
                  f"{s['ratio_cp']:.2f}" if moves and s["ratio_cp"] is not None else "-",
                  f"{s['ratio_cp_sync']:.2f}" if moves and s["ratio_cp_sync"] is not None else "-",
                  f"{s['ratio_floor']:.2f}" if moves and s.get("ratio_floor") is not None else "-",
                  f"{s['ratio_scaled']:.2f}" if moves and s.get("ratio_scaled") is not None else "-",
                  f"{s['ratio_new']:.2f}" if moves and s.get("ratio_new") is not None else "-",
                  human(s["peak_rss_bytes"]), human(s["output_bytes"]), human(s["output_new_disk_bytes"]))
    console.print(t)


def _print_notes(console, report: dict) -> None:
    console.print("What each step does:")
    seen: set[str] = set()
    for res in report["results"]:
        for s in res["steps"]:
            if s["key"] not in seen:
                seen.add(s["key"])
                console.print(f"  {s['command']}: {s['what']}", highlight=False)
    console.print(f"peak RSS: the command's maximum resident set ({report['rss_source']}), file pages it maps "
                  "included; output: apparent size; new disk: blocks not shared with the base (hard links once).",
                  highlight=False)
    console.print("cpu s: median user + system seconds of the command, all its threads (on a shared machine, "
                  "wall time waits for the CPU; this does not).", highlight=False)
    console.print("x scaled: over (cp -r; sync) x (base + new bytes) / base, the durable copy of as many bytes as a "
                  "full fuse writes; x dd new: over the faster dd of the new bytes alone.", highlight=False)


# --------------------------------------------------------------------------- main
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
