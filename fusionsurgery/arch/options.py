"""Option values checked before any checkpoint is read (``--rope-defaults``, ``--num-heads`` ...)."""

from __future__ import annotations

from typing import Any

from ..errors import UsageError

#: ``--rope-defaults NAME``: RoPE settings to assume when no config.json gives them (torchtune's builders
#: carry these; a checkpoint's tensors cannot tell them).
ROPE_DEFAULTS: dict[str, tuple[float, dict[str, Any] | None]] = {
    "llama3": (500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}),
}

def check_options(*, rope_defaults: str | None = None, num_heads: int | None = None,
                  num_kv_heads: int | None = None) -> None:
    """Refuse (``UsageError``) option values no checkpoint could make sense of."""
    if rope_defaults is not None and rope_defaults not in ROPE_DEFAULTS:
        raise UsageError(f"`rope_defaults` must be one of {', '.join(ROPE_DEFAULTS)}, got {rope_defaults!r}")
    for flag, value in (("`num_heads`", num_heads), ("`num_kv_heads`", num_kv_heads)):
        if value is not None and value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")
