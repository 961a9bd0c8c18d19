"""Where an output directory may go (never the input, inside it, or around it) and the files a checkpoint
carries besides its tensors (tokenizer, generation config, chat template), copied into an output."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import UsageError
from .checkpoint import Checkpoint


def default_output(source: Path, suffix: str) -> Path:
    """``<source name>-<suffix>`` beside the source (a file's stem for a single file); beside the
    path as given, not where a symlink leads (a DVC or annex store names its files by hash)."""
    source = Path(os.path.abspath(source))
    name = source.stem if source.is_file() else source.name
    return source.parent / f"{name}-{suffix}"


def check_output_location(source: Path, out: Path) -> None:
    """Refuse an output that is the input, lies inside it, or contains it (``--force`` would delete it)."""
    s, o = source.resolve(), out.resolve()
    if o == s or (s.is_dir() and s in o.parents):
        raise UsageError(f"output {out} is the input or inside it; choose another -o")
    if o in s.parents:
        raise UsageError(f"output {out} contains the input {source}; choose another -o")


def copy_sidecars(ckpt: Checkpoint, directory: Path) -> list[str]:
    """Tokenizer, generation-config and chat-template files, copied as real files (a symlink is followed
    where ``io.links`` allows it; ``Checkpoint.sidecar_files`` refuses the others)."""
    names = []
    for sidecar in ckpt.sidecar_files():
        shutil.copyfile(sidecar, directory / sidecar.name)
        names.append(sidecar.name)
    return names
