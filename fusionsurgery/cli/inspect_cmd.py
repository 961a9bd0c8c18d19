"""``fusionsurgery inspect``: a checkpoint's architecture, fusion and tensors, from headers only (no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..inspection import Inspection, inspect_checkpoint
from ..units import human_bytes, human_count
from .console import console, print_json
from .options import FollowSymlinks, in_cli_terms


def inspect(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="A .safetensors file or a checkpoint directory (base or fused).")],
    base: Annotated[Optional[Path], typer.Option("--base", help="Compare keys with this checkpoint: added, removed, "
                                                 "changed shape or dtype.")] = None,
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor (name, shape, dtype, file).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of the report.")] = False,
    follow_symlinks: FollowSymlinks = False,
) -> None:
    """Describe a checkpoint: naming family, architecture, dtypes, sizes, shards and, for a fused one,
    which layers are fused and how.

    Reads safetensors headers only, never tensor data.
    """
    report = inspect_checkpoint(path, base=base, tensors=tensors, follow_symlinks=follow_symlinks)
    if json_out:
        print_json(report.to_dict())
        return
    _print_model(report)
    if report.fusion is not None:
        _print_fusion(report)
    if report.diff is not None:
        _print_diff(report)
    if report.tensors is not None:
        _print_tensors(report)


def _opt(value: object) -> str:
    return "?" if value is None else str(value)


def _print_model(r: Inspection) -> None:
    kind = "fused checkpoint" if r.is_fused else "checkpoint"
    console.print(f"[bold]{r.path}[/]: {kind}, {r.family_description}")
    for note in r.notes:
        note = in_cli_terms(note)
        kind, _, text = note.partition(": ") if note.startswith("warning: ") else ("note", "", note)
        console.print(f"[{'bold red' if kind == 'warning' else 'yellow'}]{kind}:[/] {text}", highlight=False)
    if r.inferred:
        console.print(f"[yellow]no config.json: inferred from tensor shapes:[/] {', '.join(r.inferred)}")
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="dim")
    t.add_column()
    t.add_row("architecture", f"{_opt(r.architecture)} (model_type {_opt(r.model_type)})")
    t.add_row("layers", f"{r.num_layers} under {r.layer_prefix}.N." if r.layer_prefix else str(r.num_layers))
    if r.forward == "transformers":
        why = "quantized weights" if r.quantization is not None else "no native modules"
        t.add_row("forward", escape(f"transformers' own class (pip install \"fusionsurgery[hf]\"); {why}"))
    t.add_row("width", f"{r.dim} (MLP {_opt(r.intermediate_dim)})")
    t.add_row("heads", f"{_opt(r.num_heads)} / {_opt(r.num_kv_heads)} kv heads, head_dim {_opt(r.head_dim)}")
    t.add_row("vocab", f"{r.vocab_size}, {'tied' if r.tie_embeddings else 'untied'} embeddings")
    t.add_row("rope theta", _opt(r.rope_theta))
    t.add_row("dtypes", ", ".join(f"{d} ({human_count(n)})" for d, n in r.dtypes.items()))
    if r.quantization is not None:
        q = r.quantization
        packed = f"; packed values in {', '.join(q['packed_tensors'])} (counted unpacked)" if q["packed_tensors"] else ""
        modules = f"; {q['quantized_modules']} quantized modules" if q["quantized_modules"] is not None else \
            " (the base's tensors are in the base)"
        t.add_row("quantization", escape(f"{q['method']}, {_opt(q['bits'])}-bit: {q['format']}{modules}{packed}"))
        if q["side_tensors"] is not None:
            held = ", ".join(q["side_tensors"]) or "none"
            t.add_row("quant tensors", escape(f"{held}: {human_count(q['side_elements'])} values, "
                                              f"{human_bytes(q['side_bytes'])} (not counted as parameters)"))
        for name, entries in q["skip"].items():
            t.add_row("kept float", escape(f"{name}: {', '.join(map(str, entries)) if entries else 'unset'}"))
    t.add_row("parameters", f"{human_count(r.num_params)} ({r.num_params:,}) in {r.num_tensors} tensors, "
                            f"{human_bytes(r.nbytes)}")
    console.print(t)
    files = Table(title="Files" + (" (model.safetensors.index.json)" if r.has_index else ""), title_justify="left")
    files.add_column("file")
    files.add_column("tensors", justify="right")
    files.add_column("size", justify="right")
    for f in r.files:
        files.add_row(f["name"], str(f["tensors"]), human_bytes(f["bytes"]))
    console.print(files)


def _print_fusion(r: Inspection) -> None:
    f = r.fusion
    assert f is not None
    table = Table(title="Fusion layers", title_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("placement")
    table.add_column("new parameters", justify="right")
    for layer, count in f.params_per_layer.items():
        table.add_row(str(layer), f.placement, human_count(count))
    if f.embedding_params:
        table.add_row("embed", f"fusion vocab {f.fusion_vocab}", human_count(f.embedding_params))
    console.print(table)
    pct = f"{f.percent_of_base:.2f}%" if f.percent_of_base is not None else "?"
    console.print(
        f"fusion adds [bold]{human_count(f.fusion_params)}[/] parameters ({pct} of the base's "
        f"{human_count(f.base_params)}); encoder width {_opt(f.encoder_dim)}, fusion vocab {f.fusion_vocab}"
    )
    source = "manifest" if f.has_manifest else "config.json (no fusion_manifest.json)"
    std = f", std {f.init_std:g}" if f.init == "normal" and f.init_std is not None else ""
    console.print(f"init {_opt(f.init)}{std}, seed {_opt(f.seed)}, dtype {_opt(f.dtype)} (from the {source})"
                  + (f", created {f.created}" if f.created else ""))


def _print_diff(r: Inspection) -> None:
    d = r.diff
    assert d is not None
    console.print(f"[bold]against {d.base}[/]: {len(d.added)} added, {len(d.removed)} removed, "
                  f"{len(d.changed)} changed, {d.unchanged} unchanged keys")
    table = Table(show_header=True, title_justify="left")
    table.add_column("")
    table.add_column("key")
    table.add_column("shape / dtype")
    for e in d.added:
        table.add_row("[green]+[/]", e["name"], f"{e['shape']} {e['dtype']}")
    for e in d.removed:
        table.add_row("[red]-[/]", e["name"], f"{e['shape']} {e['dtype']}")
    for c in d.changed:
        table.add_row("[yellow]~[/]", c.name, f"{c.base_shape} {c.base_dtype} -> {c.shape} {c.dtype}")
    if table.row_count:
        console.print(table)


def _print_tensors(r: Inspection) -> None:
    table = Table(title=f"Tensors ({len(r.tensors or [])})", title_justify="left")
    for col in ("name", "shape", "dtype", "file"):
        table.add_column(col)
    for t in r.tensors or []:
        table.add_row(t["name"], str(t["shape"]), t["dtype"], t["file"])
    console.print(table)
