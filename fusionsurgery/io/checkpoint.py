"""A checkpoint on disk: one safetensors file, or a directory of shards with an index.

``Checkpoint.open`` validates every header and the index but reads no tensor data; tensors are
read one at a time on demand. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .links import LinkRule
from .manifest_schema import check_manifest_types
from .safetensors_format import (MAX_HEADER_BYTES, SafetensorsHeader, TensorInfo, _no_duplicates, read_exact,
                                read_header)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MANIFEST_NAME = "fusion_manifest.json"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
#: Files beside the weights that describe the tokenizer and generation; carried to outputs.
SIDECAR_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "generation_config.json", "chat_template*",
    "vocab.json", "merges.txt", "*.tiktoken", "added_tokens.json", "preprocessor_config.json",
)


@dataclass
class Checkpoint:
    """Headers of every shard of a checkpoint, and where each key lives; tensors are read on demand.

    Made by ``Checkpoint.open(path)``, which reads and validates every safetensors header (offsets,
    sizes, dtypes), the index and ``config.json``, and no tensor data. ``keys()``, ``info(key)``
    (shape, dtype, offsets), ``read_bytes(key)`` (the raw bytes), ``read_tensor(key)`` (torch),
    ``read_manifest()`` (``fusion_manifest.json``, type-checked) and ``sidecar_files()``.

    Attributes:
        root: the directory (or a single file's parent).
        files: ``{file name relative to root: header}``.
        key_to_file: ``{tensor key: file name}``.
        config: the parsed ``config.json``, or None.
    """

    root: Path  # the directory (or the file's parent for a single file)
    files: dict[str, SafetensorsHeader]  # file name (relative to root) -> header
    key_to_file: dict[str, str]
    config: dict[str, Any] | None = None
    config_path: Path | None = None
    index_metadata: dict[str, Any] = field(default_factory=dict)
    has_index: bool = False
    #: which symlinks in ``root`` are followed (``io.links``); None: the default rule at ``root``
    links: LinkRule | None = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike[str], config: str | os.PathLike[str] | None = None, *,
             follow_symlinks: bool = False, links: LinkRule | None = None) -> "Checkpoint":
        """Open ``path`` (a .safetensors file or a checkpoint directory) and validate it.

        Args:
            path (str | os.PathLike[str]): a ``.safetensors`` file or a checkpoint directory.
            config (str | os.PathLike[str] | None): a ``config.json`` to use instead of the one beside.
            follow_symlinks (bool): follow symlinks that lead outside the directory (see ``io.links``).
            links (LinkRule | None): the rule to apply instead (a sub-directory of another checkpoint).

        Returns:
            Checkpoint: the headers, validated.

        Raises:
            CheckpointError: a missing, malformed or unsupported checkpoint; ``LinkRefused`` for a
                symlink leading outside the directory.
        """
        p = Path(path)
        if not p.exists():
            raise CheckpointError(f"{p}: no such file or directory")
        rule = links or LinkRule.at(p if p.is_dir() else p.parent, follow_symlinks)
        if p.is_dir():
            ckpt = cls._open_dir(p, rule)
        else:
            _refuse_pickle(p)
            header = read_header(p)
            ckpt = cls(p.parent, {p.name: header}, {k: p.name for k in header.tensors}, links=rule)
            ckpt._load_config(p.parent / CONFIG_NAME, explicit=False)
        if config is not None:
            ckpt._load_config(Path(config), explicit=True)
        if not ckpt.key_to_file:
            raise CheckpointError(f"{p}: checkpoint holds no tensors")
        return ckpt

    @classmethod
    def _open_dir(cls, d: Path, rule: LinkRule) -> "Checkpoint":
        index_path = d / INDEX_NAME
        if index_path.exists():
            weight_map, meta = _read_index(rule.check(index_path, "index"))
            names = sorted(set(weight_map.values()))
            files = {name: read_header(_inside(d, name, rule)) for name in names}
            key_to_file: dict[str, str] = {}
            for key, name in weight_map.items():
                if key not in files[name].tensors:
                    raise CheckpointError(f"{index_path}: key {key!r} is not in its shard {name}")
                key_to_file[key] = name
            for name, header in files.items():
                for key in header.tensors:
                    if weight_map.get(key) != name:
                        if key in weight_map:
                            raise CheckpointError(f"{d}: key {key!r} is in both {name} and {weight_map[key]}")
                        raise CheckpointError(f"{d}: key {key!r} in shard {name} is missing from {INDEX_NAME}")
            ckpt = cls(d, files, key_to_file, index_metadata=meta, has_index=True, links=rule)
        else:
            candidates = sorted(f.name for f in d.iterdir() if f.suffix == ".safetensors" and not f.name.startswith("."))
            if not candidates:
                pickles = sorted(f.name for f in d.iterdir() if f.suffix in PICKLE_SUFFIXES)
                if pickles:
                    _refuse_pickle(d / pickles[0])
                raise CheckpointError(f"{d}: no .safetensors files and no {INDEX_NAME} in this directory")
            files = {name: read_header(_inside(d, name, rule)) for name in candidates}
            key_to_file = {}
            for name, header in files.items():
                for key in header.tensors:
                    if key in key_to_file:
                        raise CheckpointError(f"{d}: key {key!r} is in both {key_to_file[key]} and {name}")
                    key_to_file[key] = name
            ckpt = cls(d, files, key_to_file, links=rule)
        ckpt._load_config(d / CONFIG_NAME, explicit=False)
        return ckpt

    def _load_config(self, path: Path, explicit: bool) -> None:
        if not path.exists():
            if explicit:
                raise CheckpointError(f"{path}: config file not found")
            return
        if not explicit:
            self.link_rule.check(path, "config")
        self.config, self.config_path = read_json_object(path, "config"), path

    # ------------------------------------------------------------------ queries
    @property
    def link_rule(self) -> LinkRule:
        """Which symlinks in ``root`` are followed."""
        return self.links or LinkRule.at(self.root)

    @property
    def follow_symlinks(self) -> bool:
        return self.link_rule.follow

    @property
    def is_dir(self) -> bool:
        return self.has_index or len(self.files) > 1 or (self.root / MANIFEST_NAME).exists()

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def info(self, key: str) -> TensorInfo:
        return self.files[self.key_to_file[key]].tensors[key]

    def tensors(self) -> Iterator[tuple[str, TensorInfo]]:
        """(file name, info) for every tensor, shard by shard in file order."""
        for name, header in self.files.items():
            for info in header.tensors.values():
                yield name, info

    def path_of(self, file_name: str) -> Path:
        return self.files[file_name].path

    @classmethod
    def combine(cls, base: "Checkpoint", extra: "Checkpoint") -> "Checkpoint":
        """One view over a base and an adapter's files (the adapter's config describes both)."""
        clash = set(base.files) & set(extra.files)
        if clash:
            raise CheckpointError(f"{extra.root}: file name(s) {sorted(clash)} also in the base {base.root}")
        both = set(base.key_to_file) & set(extra.key_to_file)
        if both:
            raise CheckpointError(f"{extra.root}: tensor(s) {sorted(both)[:3]} are also in the base {base.root}")
        return cls(extra.root, {**base.files, **extra.files}, {**base.key_to_file, **extra.key_to_file},
                   config=extra.config, config_path=extra.config_path, has_index=False, links=extra.links)

    def total_bytes(self) -> int:
        return sum(h.file_size for h in self.files.values())

    def read_bytes(self, key: str) -> bytes:
        """The raw bytes of one tensor."""
        info = self.info(key)
        with open(self.path_of(self.key_to_file[key]), "rb") as fh:
            return read_exact(fh, info.start, info.nbytes)

    def read_tensor(self, key: str):  # -> torch.Tensor
        """One tensor as a torch tensor (imports torch)."""
        from .torch_dtypes import tensor_from_bytes

        info = self.info(key)
        return tensor_from_bytes(self.read_bytes(key), info.dtype, info.shape)

    def sidecar_files(self) -> list[Path]:
        """Tokenizer, generation and chat-template files beside the weights.

        Raises:
            LinkRefused: one of them is a symlink leading outside the directory (``io.links``).
        """
        found: dict[str, Path] = {}
        for pattern in SIDECAR_PATTERNS:
            for f in sorted(self.root.glob(pattern)):
                if f.is_file() and f.suffix != ".safetensors":  # a symlink counts when it ends at a file
                    found[f.name] = self.link_rule.check(f, "sidecar file")
        return list(found.values())

    def read_manifest(self) -> dict[str, Any] | None:
        """``fusion_manifest.json`` (None when absent); fields of the wrong type are refused in one line."""
        path = self.root / MANIFEST_NAME
        if not path.exists():
            return None
        return check_manifest_types(read_json_object(self.link_rule.check(path, "manifest"), "manifest"), path)


def _refuse_pickle(p: Path) -> None:
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{p}: pickle checkpoints are refused (loading them can run arbitrary code); "
            "convert it to safetensors first"
        )


def _inside(root: Path, name: Any, rule: LinkRule) -> Path:
    """Resolve a shard name from an index, refusing any name that escapes ``root``.

    The *name* comes from inside the checkpoint (a downloaded index), so it must be a plain file
    name. A shard that is a symlink must end at a regular file (whose header must then parse as
    safetensors) inside what ``rule`` allows: the directory's own tree or its hub cache's ``blobs/``
    (a Hugging Face cache snapshot); elsewhere (DVC's cache, git-annex, a shared model directory)
    only with ``follow_symlinks``.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{root}: invalid shard file name {name!r} in {INDEX_NAME}")
    if os.path.isabs(name) or "/" in name or "\\" in name or name in (".", ".."):
        raise CheckpointError(f"{root}: shard name {name!r} escapes the checkpoint directory; refused")
    path = root / name
    if path.is_symlink():
        followed_file(path, "shard")
        rule.check(path, "shard")
    elif not path.is_file():
        if path.exists():
            raise CheckpointError(f"{path}: shard is not a regular file")
        raise CheckpointError(f"{root}: shard {name} named in {INDEX_NAME} is missing")
    _refuse_pickle(path)
    return path


def followed_file(link: Path, what: str) -> Path:
    """Where the symlink ``link`` finally points; it must be an existing regular file."""
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # dangling, a loop (RuntimeError before Python 3.13), unreadable
        reason = "a symlink loop" if "loop" in str(exc).lower() else "a target that does not exist"
        raise CheckpointError(f"{link}: {what} is a symlink to {reason} ({os.readlink(link)})") from None
    if not target.is_file():
        raise CheckpointError(f"{link}: {what} is a symlink to {target}, which is not a regular file")
    return target


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path`` (duplicate keys refused), or a one-line ``CheckpointError``.

    Only a regular file of at most ``MAX_HEADER_BYTES`` is read: a symlink to a device or a pipe
    (``/dev/zero``) would otherwise be read forever.
    """
    try:
        st = path.stat()
    except OSError as exc:
        raise CheckpointError(f"{path}: {what} is not readable ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: {what} is not a regular file")
    if st.st_size > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: {what} is {st.st_size} bytes, over the {MAX_HEADER_BYTES}-byte limit")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: {what} is not readable JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return doc


def _read_index(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    doc = read_json_object(path, "index")
    if not isinstance(doc.get("weight_map"), dict):
        raise CheckpointError(f"{path}: index has no weight_map object")
    weight_map = doc["weight_map"]
    for key, name in weight_map.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: weight_map entry for {key!r} is not a file name")
    meta = doc.get("metadata") or {}
    return dict(weight_map), meta if isinstance(meta, dict) else {}
