"""``fusionsurgery import`` and ``fusionsurgery graft``: a released Mllama's fusion layers onto your own base."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..units import human_count
from .console import console, print_json
from .options import FollowSymlinks, Force, JsonOut, in_cli_terms
from .progress import byte_progress
from .reports import checkpoint_bytes, print_files


def import_(
    mllama: Annotated[Path, typer.Argument(metavar="MLLAMA_DIR", help="A Hugging Face Mllama checkpoint: "
                                           "MllamaForCausalLM, or MllamaForConditionalGeneration (Llama 3.2 Vision) "
                                           "with its vision tower and projector.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory [default: <input>-imported "
                                                "beside the input].")] = None,
    adapter_only: Annotated[bool, typer.Option("--adapter-only", help="Write only the fusion tensors and the vision "
                                               "parts, naming the imported text base by its digests (like "
                                               "fuse --adapter-only): the input of `graft`.")] = False,
    force: Force = False,
    follow_symlinks: FollowSymlinks = False,
    json_out: JsonOut = False,
) -> None:
    """Import a trained deep-fusion model into the fused layout.

    The text decoder becomes a plain Llama base (layers renumbered 0..N-1, embed_tokens' first
    vocab_size rows, lm_head as is); each cross-attention layer becomes the fusion layer of the layer
    after it; the 8 extra embedding rows become the fusion vocabulary. The vision tower and projector
    keep their names and bytes in vision/. `export --to mllama` rebuilds the same checkpoint;
    `unfuse` gives the text base.
    """
    from ..transplant import import_mllama

    total = checkpoint_bytes(mllama, follow_symlinks)
    with byte_progress(enabled=not json_out) as progress:
        result = import_mllama(mllama, out, adapter_only=adapter_only, force=force, follow_symlinks=follow_symlinks,
                               progress=lambda n: progress("import", n, total))
    if json_out:
        print_json(result.to_dict())
        return
    fusion = ", ".join(f"{c} -> fusion layer of {i}" for c, i in zip(result.cross_attention_layers,
                                                                      result.fused_layers))
    console.print(f"imported [bold]{mllama}[/] ({result.architecture}, {result.source_layout} names): "
                  f"{result.num_layers} decoder layers; cross-attention {fusion} "
                  f"({'before' if result.fusion_first else 'after'} it)")
    parts = ", ".join(f"{k} {human_count(v)} parameters in {result.counts[k]} tensors"
                      for k, v in result.params.items() if result.counts[k])
    kept = "adapter only: fusion tensors and vision parts; the text base is named by its digests" \
        if result.layout == "adapter" else "the whole model"
    console.print(f"{parts} ({kept})")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {in_cli_terms(note)}", highlight=False)
    print_files(result.output, result.files)


def graft(
    adapter: Annotated[Path, typer.Argument(metavar="ADAPTER", help="An adapter: the output of fuse --adapter-only "
                                            "or import --adapter-only.")],
    onto: Annotated[Path, typer.Option("--onto", help="The base to attach it to: same layers, width, heads, MLP "
                                       "width and vocabulary as the adapter's own base.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory [default: <base>-grafted "
                                                "beside the base].")] = None,
    was: Annotated[Optional[Path], typer.Option("--was", help="The adapter's own base (or the import it came from): "
                                                "report how far BASE is from it, tensor by tensor and per layer.")] = None,
    link: Annotated[bool, typer.Option("--link", help="Hard-link BASE's shard files instead of copying them (the two "
                                       "directories then share those files).")] = False,
    force: Force = False,
    follow_symlinks: FollowSymlinks = False,
    json_out: JsonOut = False,
) -> None:
    """Attach an adapter's fusion layers (and vision parts) to another base of the same dimensions.

    The output is an ordinary fused checkpoint of BASE: its shards copied (or linked) byte for byte,
    the adapter's tensors copied, and a manifest recording the graft, so verify, export, unfuse and
    load_fused read it.
    """
    from ..transplant import graft as graft_api

    with byte_progress(enabled=not json_out) as progress:
        result = graft_api(adapter, onto, out, was=was, link=link, force=force, follow_symlinks=follow_symlinks,
                           progress=progress)
    if json_out:
        print_json(result.to_dict())
        return
    cfg = result.config
    console.print(f"grafted [bold]{adapter}[/] onto [bold]{onto}[/] ({cfg.model_type}, {cfg.num_layers} layers, "
                  f"width {cfg.dim}): fusion layers {result.fusion.layers}, {result.fusion_tensors} tensors"
                  + (f", {result.vision_tensors} vision tensors" if result.vision_tensors else "")
                  + f"; adapter digest {result.adapter_digest[:16]}")
    if result.drift is not None:
        _drift(result.drift)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {in_cli_terms(note)}", highlight=False)
    print_files(result.output, result.files)


def _drift(drift) -> None:
    s = drift.summary()
    console.print(f"BASE vs --was {drift.was}: {s['tensors']} tensors, {s['identical']} identical; relative "
                  f"difference overall {s['overall']:.3g}, per tensor median {s['median']:.3g}, mean {s['mean']:.3g}, "
                  f"max {s['max']:.3g} ({s['max_tensor']})", highlight=False)
    if drift.matches_adapter_base is not None:
        console.print(f"--was matches the adapter's record of its base in {drift.matches_adapter_base} of "
                      f"{s['tensors']} tensors", highlight=False)
    doc = drift.to_dict()
    table = Table(title="Layers that moved most", title_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("relative difference", justify="right")
    table.add_column("fusion layer")
    for row in doc["layers_moved_most"]:
        table.add_row(str(row["layer"]), f"{row['relative']:.3g}", "yes" if row["has_fusion_layer"] else "")
    console.print(table)
