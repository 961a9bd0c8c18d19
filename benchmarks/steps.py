"""The commands a benchmark run times (cp, fuse and its modes, dd, inspect, mergekit), and one size's run."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_checkpoint
import mergekit_env
from measure import (Sample, Step, drop_caches, files_under, inodes, output_size, remove, run_measured, sync_all,
                     warm)
from summary import step_summary, with_floor


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
