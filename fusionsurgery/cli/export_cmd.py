"""``fusionsurgery export`` and ``fusionsurgery unfuse``: fused checkpoints into other ecosystems, and back."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .console import console, print_json
from .options import FollowSymlinks, Force, JsonOut, RopeDefaults, in_cli_terms
from .progress import byte_progress
from .reports import checkpoint_bytes, print_files


def export(
    fused: Annotated[Path, typer.Argument(metavar="FUSED", help="A fused checkpoint directory (a plain base works "
                                          "for --to torchtune and --to hf).")],
    to: Annotated[str, typer.Option("--to", help="mllama: transformers' MllamaForCausalLM (Llama 3.2 Vision's text "
                                    "model); torchtune: torchtune names and interleaved RoPE; hf: Hugging Face names "
                                    "(e.g. back from torchtune).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory [default: <input>-<target> "
                                                "beside the input].")] = None,
    base: Annotated[Optional[Path], typer.Option("--base", help="The base, when FUSED is an adapter "
                                                 "(fuse --adapter-only).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="config.json to use instead of the one beside "
                                                   "the weights.")] = None,
    rope_defaults: RopeDefaults = None,
    force: Force = False,
    follow_symlinks: FollowSymlinks = False,
    json_out: JsonOut = False,
) -> None:
    """Export a fused checkpoint so another stack loads it.

    Tensors are renamed, never altered, except where the target needs it: q/k rows permuted per
    head between RoPE layouts (exact), Mllama's embedding table with the fusion vocabulary folded
    in, a tied lm_head written out. export_manifest.json names each such tensor and how; every
    tensor's digest is recorded. Tokenizer, generation and chat-template files are carried along.
    """
    from ..exporting import export as export_api

    total = checkpoint_bytes(fused, follow_symlinks)
    with byte_progress(enabled=not json_out) as progress:
        result = export_api(fused, out, to=to, base=base, config=config, rope_defaults=rope_defaults, force=force,
                            follow_symlinks=follow_symlinks, progress=lambda n: progress("export", n, total))
    if json_out:
        print_json(result.to_dict())
        return
    console.print(f"exported [bold]{fused}[/] ({result.source_family} names) to [bold]{result.target}[/]: "
                  f"{len(result.tensors)} tensors, {len(result.transformed)} transformed")
    if result.layer_map:
        cross = [f"{m['mllama_layer']} (fusion of layer {m['source_layer']})" for m in result.layer_map
                 if m["kind"] == "cross"]
        console.print(f"cross-attention layers: {', '.join(cross)} of {len(result.layer_map)}")
    if result.transformed:
        table = Table(title="Transformed tensors", title_justify="left")
        table.add_column("tensor")
        table.add_column("how")
        for t in result.transformed:
            table.add_row(t["name"], t["transform"])
        console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {in_cli_terms(note)}", highlight=False)
    print_files(result.output, result.files)


def unfuse(
    fused: Annotated[Path, typer.Argument(metavar="FUSED", help="A fused checkpoint directory.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory [default: <input>-unfused "
                                                "beside the input].")] = None,
    force: Force = False,
    follow_symlinks: FollowSymlinks = False,
    json_out: JsonOut = False,
) -> None:
    """Give back the base of a fused checkpoint: the same keys, dtypes, shapes and bytes, and its config.

    Shards holding only original tensors are copied byte for byte; the fusion tensors and the
    config's fusion section are dropped. Original tensors whose digests differ from those recorded
    at fusion (trained since) are reported.
    """
    from ..exporting import unfuse as unfuse_api

    total = checkpoint_bytes(fused, follow_symlinks)
    with byte_progress(enabled=not json_out) as progress:
        result = unfuse_api(fused, out, force=force, follow_symlinks=follow_symlinks,
                            progress=lambda n: progress("copy", n, total))
    if json_out:
        print_json(result.to_dict())
        return
    console.print(f"removed {len(result.removed)} fusion tensor(s); kept {result.kept} original tensor(s)")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {in_cli_terms(note)}", highlight=False)
    print_files(result.output, result.files)
