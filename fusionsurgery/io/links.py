"""Which symlinks in a checkpoint directory are followed: the one rule every command and the hf save apply.

A checkpoint's files (shards, index, config, manifest, tokenizer and other sidecars) are read, and
many are copied into outputs meant to be published. A file reached through a symlink is therefore
followed only when the link's final target lies

- inside the checkpoint's own directory tree (the real path of the directory), or
- inside the model-hub cache repository the directory is a snapshot of: a Hugging Face cache keeps
  ``models--ORG--NAME/snapshots/REV/<file>`` as links into ``models--ORG--NAME/blobs/``.

Any other link (to a content store, a shared folder, ``~/.cache/huggingface/token`` ...) is refused
with ``LinkRefused``, which names the link and where it points; ``follow_symlinks=True`` (the CLI's
``--follow-symlinks``) follows every link, as ``cp -L`` does. A path the user names explicitly (a
single ``.safetensors`` file, ``--config PATH``) is the user's choice and is not subject to the rule.
Nothing here imports torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import LinkRefused

#: Directory-name prefixes of the repositories in a Hugging Face hub cache (``huggingface_hub``'s layout).
HUB_CACHE_KINDS = ("models--", "datasets--", "spaces--")


def hub_cache_repo(directory: Path) -> Path | None:
    """The hub-cache repository (``.../models--ORG--NAME``) whose ``snapshots/REV`` holds ``directory``
    (a real path), or None when ``directory`` is not in a snapshot."""
    for d in (directory, *directory.parents):
        if d.parent.name == "snapshots" and d.parent.parent.name.startswith(HUB_CACHE_KINDS):
            return d.parent.parent
    return None


def _within(path: str, tree: Path) -> bool:
    return os.path.commonpath([path, str(tree)]) == str(tree)


@dataclass(frozen=True)
class LinkRule:
    """Where the files of one checkpoint directory may lead.

    Attributes:
        trees (tuple[Path, ...]): real paths under which a file's final target may lie.
        follow (bool): follow every link (``--follow-symlinks``).
    """

    trees: tuple[Path, ...]
    follow: bool = False

    @classmethod
    def at(cls, root: str | os.PathLike[str], follow: bool = False) -> "LinkRule":
        """The rule for the checkpoint directory ``root``: its own tree, and its hub-cache ``blobs/``.

        Args:
            root (str | os.PathLike[str]): the checkpoint directory (as given; links in it are resolved).
            follow (bool): follow every link.

        Returns:
            LinkRule: the rule.
        """
        real = Path(os.path.realpath(root))
        trees = [real]
        repo = hub_cache_repo(real)
        if repo is not None:
            trees.append(repo / "blobs")
        return cls(tuple(trees), follow)

    def allows(self, path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` (a file of the directory) may be read: its final target stays inside."""
        return self.follow or any(_within(os.path.realpath(path), tree) for tree in self.trees)

    def check(self, path: Path, what: str) -> Path:
        """``path`` when the rule allows it.

        Args:
            path (Path): a file of the checkpoint directory.
            what (str): what it is, for the message.

        Returns:
            Path: ``path`` itself (readers open it as given).

        Raises:
            LinkRefused: ``path`` leads outside the allowed trees and links are not followed.
        """
        if not self.allows(path):
            raise LinkRefused(path, Path(os.path.realpath(path)), what)
        return path


__all__ = ["HUB_CACHE_KINDS", "LinkRefused", "LinkRule", "hub_cache_repo"]
