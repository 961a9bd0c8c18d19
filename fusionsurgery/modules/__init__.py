"""Torch modules of a Llama-family decoder and of deep fusion (torchtune's names and contract)."""

from .attention import CrossAttention, KVCache, SelfAttention
from .decoder import TransformerDecoder
from .deep_fusion import DeepFusionModel, ProjectedEncoder, project_encoder
from .image_encoder import ImageEncoder, ImageTokens
from .fusion import FusionEmbedding, FusionLayer, get_fusion_params, register_fusion_module, set_trainable_params
from .layers import DecoderLayer, GatedCrossAttentionLayer, TanhGate
from .mlp import FeedForward
from .norm import RMSNorm
from .rope import RotaryEmbedding

__all__ = [
    "CrossAttention", "DecoderLayer", "DeepFusionModel", "FeedForward", "FusionEmbedding", "FusionLayer",
    "GatedCrossAttentionLayer", "ImageEncoder", "ImageTokens", "KVCache", "ProjectedEncoder", "RMSNorm", "RotaryEmbedding", "SelfAttention",
    "TanhGate", "TransformerDecoder", "get_fusion_params", "project_encoder", "register_fusion_module",
    "set_trainable_params",
]
