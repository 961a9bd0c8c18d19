"""fusionsurgery: turn a pretrained text decoder into a deep-fusion (Flamingo / Llama 3.2 Vision) model.

The public API is imported lazily so that ``import fusionsurgery`` (and CLI commands that read
headers only) do not pay for importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .version import __version__

_API = {
    "fuse": "fusionsurgery.surgery.fuse",
    "FuseResult": "fusionsurgery.surgery.fuse",
    "FuseOptions": "fusionsurgery.surgery.options",
    "load_fused": "fusionsurgery.native.loading",
    "export": "fusionsurgery.exporting",
    "unfuse": "fusionsurgery.exporting",
    "import_mllama": "fusionsurgery.transplant",
    "graft": "fusionsurgery.transplant",
    "verify": "fusionsurgery.verification",
    "inspect_checkpoint": "fusionsurgery.inspection",
    "open_model": "fusionsurgery.native.loading",
    "build_decoder": "fusionsurgery.native.builders",
    "generate": "fusionsurgery.native.generation",
    "FusionLayer": "fusionsurgery.modules.fusion",
    "FusionEmbedding": "fusionsurgery.modules.fusion",
    "get_fusion_params": "fusionsurgery.modules.fusion",
    "register_fusion_module": "fusionsurgery.modules.fusion",
    "DeepFusionModel": "fusionsurgery.modules.deep_fusion",
    "ProjectedEncoder": "fusionsurgery.modules.deep_fusion",
    "project_encoder": "fusionsurgery.modules.deep_fusion",
    "ImageEncoder": "fusionsurgery.modules.image_encoder",
    "ImageTokens": "fusionsurgery.modules.image_encoder",
    "set_trainable_params": "fusionsurgery.modules.fusion",
    "GatedCrossAttentionLayer": "fusionsurgery.modules.layers",
    "DecoderLayer": "fusionsurgery.modules.layers",
    "TransformerDecoder": "fusionsurgery.modules.decoder",
    "Checkpoint": "fusionsurgery.io.checkpoint",
    "ModelConfig": "fusionsurgery.arch.config",
    "FusionConfig": "fusionsurgery.arch.config",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'fusionsurgery' has no attribute {name!r}")
