"""RoPE settings from a config, in either spelling (top-level ``rope_theta`` / ``rope_scaling`` or
transformers 5's ``rope_parameters``)."""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError
from .model_config import INFERRED_MARK

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ROPE_REQUIRED = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}



def read_rope(doc: dict[str, Any], default_theta: float = 10000.0) -> tuple[float | None, dict[str, Any] | None]:
    """(theta, scaling) from either spelling: top-level ``rope_theta``/``rope_scaling`` or ``rope_parameters``.

    A config that this tool wrote from tensor shapes (``INFERRED_MARK``) and that names no theta
    leaves it unknown (None) instead of assuming transformers' default.
    """
    if INFERRED_MARK in doc and "rope_theta" not in doc and not doc.get("rope_parameters"):
        return None, None
    params = doc.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", doc.get("rope_theta", default_theta))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = doc.get("rope_theta", default_theta)
        scaling = dict(doc.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    partial = scaling.pop("partial_rotary_factor", doc.get("partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        raise CheckpointError(
            f"config.json: partial_rotary_factor {partial} (RoPE on part of each head) is not supported"
        )
    rope_type = scaling.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(f"config.json: rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    for key in _ROPE_REQUIRED.get(rope_type, ()):
        if not isinstance(scaling.get(key), (int, float)) or isinstance(scaling.get(key), bool):
            raise CheckpointError(f"config.json: {rope_type} rope scaling needs a number for {key!r}")
    return (float(theta) if theta is not None else None), (scaling if rope_type != "default" else None)
