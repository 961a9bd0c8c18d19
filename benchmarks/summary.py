"""Medians, ratios and floors of the measured steps, and the facts of the machine they ran on."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import mergekit_env
from measure import Step


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
