"""The types of the ``fusion_manifest.json`` fields this tool reads, checked once when it is read.

A manifest comes from inside a checkpoint, so it may be damaged or hostile. Every command reads it
through ``Checkpoint.read_manifest``, which refuses a document whose fields have the wrong types
with one line naming the field; the code after it can trust the types (not the values: whether
the manifest agrees with the tensors is ``verify``'s structure check).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CheckpointError

#: Top-level fields and the JSON type each must have when present.
TOP_LEVEL: dict[str, type | tuple[type, ...]] = {
    "format": str, "format_version": int, "digest_algorithm": str, "layout": str, "created": str,
    "tool": dict, "base": dict, "fusion": dict, "totals": dict,
    "new_tensors": list, "original_tensors": list,
}
#: Fields of a tensor entry (``new_tensors`` / ``original_tensors``): name, shape and dtype required.
TENSOR_FIELDS: dict[str, type | tuple[type, ...]] = {
    "name": str, "shape": list, "dtype": str, "digest": (str, type(None)), "file": (str, type(None)),
}
#: Fields of a base file entry (``base.files``).
FILE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "name": str, "bytes": int, "digest": (str, type(None)),
}


def check_manifest_types(doc: dict[str, Any], path: Path) -> dict[str, Any]:
    """Return ``doc`` when every field this tool reads has its type; else a one-line ``CheckpointError``."""
    where = f"{path}: manifest"
    _fields(doc, TOP_LEVEL, where, required=())
    for section in ("new_tensors", "original_tensors"):
        for i, entry in enumerate(doc.get(section, [])):
            _entry(entry, TENSOR_FIELDS, f"{where} {section}[{i}]", required=("name", "shape", "dtype"))
            if not all(is_int(d) and d >= 0 for d in entry["shape"]):
                raise CheckpointError(f"{where} {section}[{i}].shape is not a list of sizes")
    base = doc.get("base", {})
    _fields(base, {"files": list, "config": dict, "num_params": int, "num_tensors": int, "inferred": list,
                   "family": str, "name": str, "path": str}, f"{where} base", required=())
    for i, entry in enumerate(base.get("files", [])):
        _entry(entry, FILE_FIELDS, f"{where} base.files[{i}]", required=("name",))
    return doc


def _entry(entry: Any, spec: dict[str, type | tuple[type, ...]], where: str, required: tuple[str, ...]) -> None:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where} is not an object")
    _fields(entry, spec, where, required)


def _fields(doc: dict[str, Any], spec: dict[str, type | tuple[type, ...]], where: str,
            required: tuple[str, ...]) -> None:
    for name in required:
        if name not in doc:
            raise CheckpointError(f"{where} has no {name!r}")
    for name, kind in spec.items():
        if name in doc and not has_type(doc[name], kind):
            raise CheckpointError(f"{where}: {name!r} is {_json_name(doc[name])}, expected {_type_name(kind)}")


def is_int(value: Any) -> bool:
    """Is ``value`` a JSON integer? (``True`` is an ``int`` to Python, not to JSON.)"""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """Is ``value`` a JSON number (an integer or a float, not a boolean)?"""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def has_type(value: Any, kind: type | tuple[type, ...]) -> bool:
    """Is ``value`` of ``kind`` (a type or a tuple of types), a boolean counting as an ``int`` only where
    ``bool`` is one of the kinds?"""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if int in kinds and not is_int(value) and not any(k is not int and isinstance(value, k) for k in kinds):
        return False
    return isinstance(value, kinds)


_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list",
               dict: "an object", type(None): "null"}


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_JSON_NAMES.get(k, k.__name__) for k in kinds)


def _json_name(value: Any) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)
