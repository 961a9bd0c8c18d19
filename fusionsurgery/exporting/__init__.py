"""Exports of fused checkpoints to other ecosystems, and ``unfuse``.

``export(path, out, to=...)``: ``mllama`` (transformers' ``MllamaForCausalLM``), ``torchtune``
(torchtune's names and RoPE layout) or ``hf`` (Hugging Face names, this tool's fused layout).
Tensors are streamed one chunk at a time into an atomically renamed output directory; an
``export_manifest.json`` names every tensor, its sources, its digest, and how it was transformed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

from ..errors import UsageError
from .common import EXPORT_MANIFEST_NAME, ExportResult, check_output_location, default_output, open_source
from .mllama import export_mllama
from .tensors import Progress
from .torchtune import export_family
from .unfuse import UnfuseResult, unfuse

#: Each export target and the function that writes it: ``(source, out, *, force, progress) -> ExportResult``.
#: A new target is a module beside ``mllama.py`` / ``torchtune.py`` and a row here.
TARGETS: dict[str, Callable[..., ExportResult]] = {
    "mllama": export_mllama,
    "torchtune": partial(export_family, target_name="torchtune"),
    "hf": partial(export_family, target_name="hf"),
}

__all__ = ["EXPORT_MANIFEST_NAME", "ExportResult", "TARGETS", "UnfuseResult", "export", "unfuse"]


def export(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *, to: str,
           base: str | os.PathLike[str] | None = None, config: str | os.PathLike[str] | None = None,
           rope_defaults: str | None = None, force: bool = False, follow_symlinks: bool = False,
           progress: Progress | None = None) -> ExportResult:
    """Export the checkpoint at ``path`` so another stack loads it.

    Args:
        path: a fused checkpoint (a plain base works for ``torchtune`` and ``hf``).
        out: the output directory (default ``<name>-<to>`` beside ``path``).
        to: one of ``TARGETS``: ``mllama``, ``torchtune`` or ``hf``.
        base: the base checkpoint, when ``path`` is an adapter (``fuse --adapter-only``).
        config: a config.json to use instead of the one beside the weights.
        rope_defaults: ``"llama3"`` to assume torchtune's Llama 3 RoPE settings when no config gives them.
        force: replace an existing output (only once the new one is complete).
        follow_symlinks: follow symlinks that lead outside the input directories (``io.links``).
        progress: told how many bytes were written.

    Returns:
        ExportResult: the output, every tensor with its sources, digest and transform, notes and files.

    Raises:
        UsageError: an unknown target, or an output inside the input.
        CheckpointError: an unreadable input, or one the target cannot express (named).

    Example:
        >>> result = fs.export("/tmp/tiny-fused", "/tmp/tiny-mllama", to="mllama", force=True)
    """
    if to not in TARGETS:
        raise UsageError(f"`to` must be one of {', '.join(TARGETS)}, got {to!r}")
    src = open_source(path, base=base, config=config, rope_defaults=rope_defaults, follow_symlinks=follow_symlinks)
    out_path = Path(out) if out is not None else default_output(Path(path), to)
    check_output_location(Path(path), out_path)
    if base is not None:
        check_output_location(Path(base), out_path)
    return TARGETS[to](src, out_path, force=force, progress=progress)
