"""``fusionsurgery fuse``: the main job."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import UsageError
from ..units import human_count
from .console import console, print_json
from .options import FollowSymlinks, Force, JsonOut, RopeDefaults, in_cli_terms
from .progress import byte_progress
from .reports import print_files, print_verify_report, verify_notifier


def fuse(
    base: Annotated[Path, typer.Argument(metavar="BASE", help="Base checkpoint: a .safetensors file, or a directory with "
                                          "model.safetensors or shards and model.safetensors.index.json.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory [default: <base>-fused beside the base].")] = None,
    every: Annotated[Optional[int], typer.Option("--every", help="Fuse layers i with (i+1) % N == 0 (torchtune's fusion_interval; "
                                                 "--every 4 on 32 layers: 3, 7, ..., 31).")] = None,
    layers: Annotated[Optional[str], typer.Option("--layers", help="Explicit layers: indices and slices, e.g. '3,7,-1' or '3:32:4' "
                                                  "(negative counts from the end; '0::4' is IDEFICS' placement).")] = None,
    fusion_after: Annotated[bool, typer.Option("--fusion-after", help="Run each fusion layer after its original layer "
                                               "(default: before, as Flamingo and Llama 3.2 Vision).")] = False,
    encoder_dim: Annotated[Optional[int], typer.Option("--encoder-dim", help="Width of the encoder states the new "
                                                       "cross-attention reads [default: the decoder width].")] = None,
    fusion_vocab: Annotated[int, typer.Option("--fusion-vocab", help="Extra learnable token embeddings for ids >= vocab "
                                              "(FusionEmbedding).")] = 0,
    init: Annotated[str, typer.Option("--init", help="Init of the new projections: normal, xavier, or copy (from the "
                                      "wrapped layer's self-attention and MLP). Gates are always zero, norms one.")] = "normal",
    init_std: Annotated[float, typer.Option("--init-std", help="Standard deviation for --init normal.")] = 0.02,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the new weights (same seed, same bytes).")] = 0,
    dtype: Annotated[str, typer.Option("--dtype", help="dtype of the new weights: same (the base's), bf16, fp16, fp32.")] = "same",
    config: Annotated[Optional[Path], typer.Option("--config", help="config.json to use instead of the one beside the base.")] = None,
    num_heads: Annotated[Optional[int], typer.Option("--num-heads", help="Attention heads, when there is no config and "
                                                     "shapes cannot tell.")] = None,
    num_kv_heads: Annotated[Optional[int], typer.Option("--num-kv-heads", help="Key/value heads (grouped-query attention), "
                                                        "when there is no config.")] = None,
    rope_defaults: RopeDefaults = None,
    layer_prefix: Annotated[Optional[str], typer.Option("--layer-prefix", metavar="PREFIX", help="The decoder's layer "
                                                        "list, e.g. model.language_model.layers: for a multimodal base "
                                                        "whose config's text part cannot tell it from another list "
                                                        "[default: found from the config's text part].")] = None,
    link: Annotated[bool, typer.Option("--link", help="Hard-link the base's shard files into the output instead of copying "
                                       "them: only the new weights cost time and disk. The two directories then SHARE those "
                                       "files: editing one in place edits both. Needs one filesystem (else the shards are "
                                       "copied and the report says so).")] = False,
    adapter_only: Annotated[bool, typer.Option("--adapter-only", help="Write only the new tensors, config and manifest (like "
                                               "a PEFT adapter); the base is named by its digests, and load_fused(adapter, "
                                               "base=BASE) / verify --base refuse any other base.")] = False,
    digest: Annotated[str, typer.Option("--digest", help="Hash of the manifest's content digests: blake3 (fast) or "
                                        "sha256.")] = "blake3",
    force: Force = False,
    follow_symlinks: FollowSymlinks = False,
    json_out: JsonOut = False,
    verify_output: Annotated[bool, typer.Option("--verify", help="Run every `fusionsurgery verify` check on the output "
                                                "right after fusing (against the base).")] = False,
    device: Annotated[str, typer.Option("--device", help="Device for --verify: auto (CUDA when present), cpu, cuda, "
                                        "cuda:N.")] = "auto",
) -> None:
    """Fuse gated cross-attention layers into a decoder checkpoint.

    Every original tensor keeps its key and exact bytes; the new tensors go to new shard files; a
    fusion_manifest.json records settings and digests. The output is written under a temporary
    name and renamed into place at the end, so a failed run leaves nothing behind.
    """
    from ..surgery.fuse import fuse as fuse_api
    from ..surgery.options import FuseOptions

    options = FuseOptions.pick(locals())  # this command's parameters are named like the options
    if verify_output:
        from ..native.loading import resolve_device

        resolve_device(device)  # an unusable --device fails before anything is written
    elif device != "auto":
        raise UsageError("--device chooses where --verify runs; give it with --verify")
    with byte_progress(enabled=not json_out) as progress:
        result = fuse_api(base, out, options, force=force, progress=progress)
    if not verify_output:
        print_json(result.to_dict()) if json_out else _report(result)
        return
    from ..verification import verify as verify_api

    if not json_out:
        _report(result)
    report = verify_api(result.output, base, device=device, follow_symlinks=follow_symlinks,
                        notify=verify_notifier(json_out))
    print_json(dict(result.to_dict(), verify=report.to_dict())) if json_out else print_verify_report(report)
    report.raise_if_failed()


def _report(result) -> None:
    cfg, fusion = result.config, result.fusion
    names = f"{cfg.family} names" if cfg.native else f"layers under {fusion.layer_prefix}.N., wrapped as they are"
    if cfg.inferred:
        console.print(f"[yellow]no config.json: inferred from tensor shapes:[/] {', '.join(cfg.inferred)}")
    console.print(
        f"[bold]{cfg.model_type}[/] ({names}): {cfg.num_layers} layers, width {cfg.dim}, "
        f"{cfg.num_heads} heads / {cfg.num_kv_heads} kv heads of {cfg.head_dim}, vocab {cfg.vocab_size}"
    )
    table = Table(title="Fused layers", title_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("placement")
    table.add_column("new parameters", justify="right")
    for layer, count in result.params_per_layer().items():
        table.add_row(str(layer), "before" if fusion.fusion_first else "after", human_count(count))
    if fusion.fusion_vocab:
        table.add_row("embed", "fusion vocab", human_count(fusion.fusion_vocab * cfg.dim))
    console.print(table)
    pct = 100.0 * result.fusion_params / result.base_params if result.base_params else 0.0
    console.print(
        f"added [bold]{human_count(result.fusion_params)}[/] parameters ({pct:.2f}% of the base's "
        f"{human_count(result.base_params)}); init {fusion.init}, seed {fusion.seed}, dtype {fusion.dtype}, "
        f"encoder width {fusion.encoder_dim}"
    )
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(in_cli_terms(note))}")
    layout = {"copy": "", "link": " (base shards hard-linked)", "adapter": " (adapter only: new tensors and manifest)"}
    print_files(result.output, result.files, layout[result.layout])
