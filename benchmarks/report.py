"""Printing a benchmark report: the machine, one table per size, and the notes under it."""

from __future__ import annotations

import shutil



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
