"""The JSON files an output holds (config, manifests, the shard index), written durably."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` as indented JSON and make it durable."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_index(path: Path, weight_map: dict[str, str], total_size: int) -> None:
    """A Hugging Face ``model.safetensors.index.json``: every key to its file, and the tensor bytes."""
    write_json(path, {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})
