"""How outputs name their inputs: by what they are (a model's name, its digests), never where they lay.

An output is made to be published. A path such as ``/home/<user>/<folders>/base`` recorded in a
manifest or a config tells the world a user name and folder names, and means nothing on another
machine. So manifests name an input by ``input_name`` (the hub-cache repository it is a snapshot
of, or else its directory's name) and ``hub_id`` (the hub id its config carries) next to its
digests, and every JSON
document an output carries over from an input (a config's ``_name_or_path``, an older manifest's
``path`` fields) is passed through ``public_config`` / ``public_manifest`` before it is written.
Commands that need a path back to an input (an adapter's base, ``graft --was``) take it on the
command line. Nothing here imports torch.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from .links import hub_cache_repo

#: A Hugging Face hub id: ``NAME`` or ``ORG/NAME``.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
#: An absolute path inside a longer text (POSIX, ``~/``, or a Windows drive).
_PATH_IN_TEXT = re.compile(r"(?:(?<![\w.~/-])/|~/|\b[A-Za-z]:[\\/])[^\s'\"`(),;]*")
#: Fields of an older manifest that held a path (``section.field``), written by releases before names.
_LEGACY_PATH_FIELDS = (("base", "path"), ("imported_from", "path"), ("adapter", "path"), ("adapter_base", "path"), ("export", "from"),
                       ("source", "path"), ("mllama", "source"), ("was", "was"))


def hub_id(config: dict[str, Any] | None) -> str | None:
    """The hub id a config names in ``_name_or_path`` (None when absent or a local path)."""
    value = (config or {}).get("_name_or_path")
    if not isinstance(value, str) or looks_like_path(value) or not _HUB_ID.fullmatch(value) or ".." in value:
        return None
    return value


def looks_like_path(text: str) -> bool:
    """Whether ``text`` is a filesystem path rather than a name (absolute, ``~``, ``./``, ``../``, backslashes)."""
    return (text.startswith(("/", "~", "./", "../", ".\\", "..\\")) or "\\" in text
            or PureWindowsPath(text).drive != "" or text in (".", ".."))


def input_name(path: str | os.PathLike[str]) -> str:
    """What an input is called, for a manifest: no directory above it, nothing of the machine.

    Args:
        path (str | os.PathLike[str]): the input as given (a directory or a file).

    Returns:
        str: ``ORG/NAME`` of the hub-cache repository it is a snapshot of; else the directory's (or
        file's) own name.
    """
    given = Path(os.path.abspath(path))
    real = Path(os.path.realpath(given))
    repo = hub_cache_repo(real if real.is_dir() else real.parent)
    if repo is not None:
        return repo.name.split("--", 1)[1].replace("--", "/")
    return given.name or str(PurePosixPath(given).name)


def public_text(text: str) -> str:
    """``text`` with every absolute path in it cut to its last component."""
    if looks_like_path(text):
        return _last_part(text)
    return _PATH_IN_TEXT.sub(lambda m: _last_part(m.group()), text)


def _last_part(path: str) -> str:
    parts = [p for p in re.split(r"[\\/]+", path) if p not in ("", "~", ".", "..")]
    return parts[-1] if parts else ""


def public_config(doc: dict[str, Any] | None) -> dict[str, Any] | None:
    """A copy of a ``config.json`` document whose ``_name_or_path`` fields (top level and sub-configs)
    hold no local path: a path is cut to its last component, a hub id stays."""
    if doc is None:
        return None
    out = copy.deepcopy(doc)

    def walk(d: dict[str, Any]) -> None:
        for key, value in d.items():
            if key == "_name_or_path" and isinstance(value, str):
                d[key] = public_text(value)
            elif isinstance(value, dict):
                walk(value)

    walk(out)
    return out


def public_manifest(doc: dict[str, Any]) -> dict[str, Any]:
    """A copy of a manifest (``fusion_manifest.json``, ``export_manifest.json``) with no local path:
    the ``path`` fields older releases wrote become ``name`` (a path cut to its last component),
    and configs carried inside lose their local ``_name_or_path``."""
    out = public_config(doc) or {}

    def walk(d: dict[str, Any], section: str) -> None:
        for key in list(d):
            value = d[key]
            if isinstance(value, dict):
                walk(value, key)
            elif isinstance(value, str) and (section, key) in _LEGACY_PATH_FIELDS:
                named = public_text(value)
                if key == "path":
                    del d[key]
                    d.setdefault("name", named)
                else:
                    d[key] = named

    walk(out, "")
    return out
