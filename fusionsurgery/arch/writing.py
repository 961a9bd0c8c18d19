"""Writing a transformers-readable ``config.json`` for a decoder description."""

from __future__ import annotations

import copy
from typing import Any

from .model_config import INFERRED_MARK, ModelConfig
from .model_types import SUPPORTED_MODEL_TYPES


def to_hf_config(cfg: ModelConfig, base_doc: dict[str, Any] | None) -> dict[str, Any]:
    """A transformers-readable config.json for ``cfg``, keeping every field of the base's own."""
    doc = copy.deepcopy(base_doc) if base_doc else {}
    if not base_doc:
        doc.update({
            "architectures": [SUPPORTED_MODEL_TYPES[cfg.model_type]],
            "model_type": cfg.model_type,
            "hidden_size": cfg.dim,
            "intermediate_size": cfg.intermediate_dim,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab_size,
            "rms_norm_eps": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings,
            "max_position_embeddings": cfg.max_seq_len,
            "hidden_act": cfg.activation,
            # marks a config written from tensor shapes: what it lacks (RoPE settings) stays unknown
            INFERRED_MARK: list(cfg.inferred),
        })
        if cfg.model_type == "llama":
            doc["attention_bias"] = cfg.attn_bias
        if cfg.sliding_window is not None:
            doc["sliding_window"] = cfg.sliding_window
        if cfg.rope_theta is not None:
            doc["rope_theta"] = cfg.rope_theta
            if cfg.rope_scaling:
                doc["rope_scaling"] = dict(cfg.rope_scaling)
    return doc
