"""The model description: read from ``config.json`` or inferred from tensor shapes.

``ModelConfig`` holds what building the decoder needs; ``FusionConfig`` what fusion added. Both
round-trip through the ``config.json`` that ``fuse`` writes (the base's config plus a ``fusion``
section). Nothing here imports torch. This module names the public surface; the work is split by
job:

- ``model_config``: the two dataclasses and the fusion section's reader;
- ``model_types``: what a config cannot tell (per-type overrides; the types with native modules);
- ``fields`` / ``discovery`` / ``generic``: any decoder, by its config's fields and its tensor names;
- ``reading``: a native decoder from its config, ``shape_inference``: from its shapes alone;
- ``shape_checks``: tensors against the shapes a config implies; ``options``: option values;
- ``rope_config``: RoPE settings in either spelling; ``writing``: a config.json for a description.
"""

from __future__ import annotations

from .discovery import discover_layout, family_of_checkpoint, find_embedding_key, find_layer_prefix
from .generic import fusion_activation, read_generic_config
from .model_config import INFERRED_MARK, FusionConfig, ModelConfig, read_fusion_config
from .model_types import (MODEL_TYPES, SUPPORTED_ACTIVATIONS, SUPPORTED_MODEL_TYPES, ModelType, is_native,
                          norm_offset_of)
from .options import ROPE_DEFAULTS, check_options
from .reading import activation_of, config_from_shapes, read_model_config
from .rope_config import SUPPORTED_ROPE_TYPES, read_rope
from .shape_checks import check_shapes, expected_shapes
from .writing import to_hf_config

__all__ = [
    "INFERRED_MARK", "MODEL_TYPES", "ROPE_DEFAULTS", "SUPPORTED_ACTIVATIONS", "SUPPORTED_MODEL_TYPES",
    "SUPPORTED_ROPE_TYPES", "FusionConfig", "ModelConfig", "ModelType", "activation_of", "check_options",
    "check_shapes", "config_from_shapes", "discover_layout", "expected_shapes", "family_of_checkpoint",
    "find_embedding_key", "find_layer_prefix", "fusion_activation", "is_native", "norm_offset_of",
    "read_fusion_config", "read_generic_config", "read_model_config", "read_rope", "to_hf_config",
]
