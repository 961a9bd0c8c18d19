"""The two descriptions a fused checkpoint carries: ``ModelConfig`` (the decoder) and ``FusionConfig``
(what fusion added, the ``fusion`` section of ``config.json``). Nothing here imports torch."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import CheckpointError
from ..io.manifest_schema import has_type, is_int
from .families import FAMILIES, Family, generic_family
from .model_types import MODEL_TYPES, ModelType, rope_layout_of

#: Key of a config.json written from tensor shapes (no base config): the fields that were inferred.
INFERRED_MARK = "fusionsurgery_inferred"


@dataclass
class ModelConfig:
    """Everything needed to build the (unfused) decoder, or, for a type without native modules
    (``native`` false), what the surgery needs: the layer list, the width and the head layout.

    Made by ``arch.reading.read_model_config(ckpt)`` from ``config.json`` (or inferred from the
    tensor shapes, listed in ``inferred``).

    Attributes:
        family: the naming family (``hf``, ``torchtune``) or the generic one of a non-native type.
        model_type: the config's ``model_type``.
        num_layers: decoder layers.
        dim: the width (hidden size).
        num_heads: attention heads.
        num_kv_heads: key/value heads (grouped-query attention when fewer).
        head_dim: width of one head.
        intermediate_dim: the MLP's inner width.
        vocab_size: rows of the token embedding.
        rope_theta: RoPE base; ``rope_scaling`` its scaling (Llama 3's ``rope_type: llama3`` ...).
        tie_embeddings: the output projection is the token embedding.
        layer_prefix: where the layers are numbered (``model.layers``), for a non-native type.
        embedding_key: the token embedding's key, for a non-native type.
    """

    family: str
    model_type: str
    num_layers: int
    dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float | None = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_embeddings: bool = False
    attn_bias: bool = False
    qk_norm: bool = False
    max_seq_len: int = 4096
    activation: str = "silu"
    inferred: list[str] = field(default_factory=list)
    norm_offset: float = 0.0
    norm_fp32_scale: bool = False
    embed_scale: float | None = None
    fused_qkv: bool = False
    fused_gate_up: bool = False
    sliding_window: int | None = None
    layer_prefix: str = ""  # dotted, no trailing dot ("model.layers"); "" = the family's own
    embedding_key: str = ""  # the token embedding's key; "" = the family's own

    @property
    def native(self) -> bool:
        """Whether the native modules implement this decoder (else its forward is transformers')."""
        return self.family in FAMILIES and self.model_type in MODEL_TYPES

    @property
    def family_obj(self) -> Family:
        if self.family in FAMILIES:
            return FAMILIES[self.family]
        return generic_family(self.layer_prefix, self.embedding_key, self.model_type)

    @property
    def rope_layout(self) -> str:
        """The RoPE layout its self-attention q/k rows follow: the naming family's, except in torchtune's
        names, where it is the layout of torchtune's builder for the type (``half`` for Qwen2, Qwen3, Phi-3)."""
        return rope_layout_of(self.family, self.family_obj.rope_layout, self.model_type)

    @property
    def model_type_obj(self) -> ModelType:
        return MODEL_TYPES[self.model_type]

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def rope_parameters(self) -> dict[str, Any]:
        """RoPE settings in transformers 5's ``rope_parameters`` spelling."""
        params: dict[str, Any] = {"rope_type": "default"}
        if self.rope_scaling:
            params.update(self.rope_scaling)
        params["rope_theta"] = self.rope_theta
        return params


@dataclass
class FusionConfig:
    """What fusion added: the ``fusion`` section of a fused checkpoint's ``config.json``.

    The block fields (``layer_prefix`` ... ``norm_offset``) let every reader build the same fusion
    block without knowing the base's type. Sections written by older versions lack them (empty /
    zero / None): ``block(cfg)`` fills them from the base's config the old way.

    Attributes:
        layers: the fused layers' indices.
        fusion_first: each fusion layer runs before its original layer (else after).
        encoder_dim: width of the encoder states ``[b, e, encoder_dim]`` the cross-attention reads.
        fusion_vocab: extra learnable token embeddings (ids ``>= vocab_size``).
        init, init_std, seed, dtype: how the new weights were made, and their safetensors dtype.
        qk_norm_eps, norm_eps: the fusion block's norm epsilons.
        tool_version: the fusionsurgery version that fused.
    """

    layers: list[int]
    fusion_first: bool = True
    encoder_dim: int = 0
    fusion_vocab: int = 0
    init: str = "normal"
    init_std: float = 0.02
    seed: int = 0
    dtype: str = "BF16"
    qk_norm_eps: float = 1e-5
    norm_eps: float = 1e-5
    tool_version: str = ""
    layer_prefix: str = ""  # where the decoder layers are numbered, e.g. "model.layers", "transformer.h"
    embedding_key: str = ""  # the token embedding's key, e.g. "model.embed_tokens.weight"
    dim: int = 0  # the fusion block's width (the decoder's)
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    intermediate_dim: int = 0  # the fusion MLP's width
    activation: str = ""  # the fusion MLP's activation ("silu", "gelu_pytorch_tanh", "gelu")
    norm_offset: float | None = None  # fusion norms scale by (norm_offset + w): 0.0 plain RMSNorm, 1.0 Gemma's

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def block(self, cfg: ModelConfig) -> "FusionConfig":
        """This section with every unset block field taken from ``cfg`` (sections of older versions)."""
        family = cfg.family_obj
        return dataclasses.replace(
            self,
            layer_prefix=self.layer_prefix or family.layer_prefix.removesuffix(".{i}."),
            embedding_key=self.embedding_key or family.global_key("tok_embeddings.weight"),
            dim=self.dim or cfg.dim, num_heads=self.num_heads or cfg.num_heads,
            num_kv_heads=self.num_kv_heads or cfg.num_kv_heads, head_dim=self.head_dim or cfg.head_dim,
            intermediate_dim=self.intermediate_dim or cfg.intermediate_dim,
            activation=self.activation or cfg.activation,
            norm_offset=cfg.norm_offset if self.norm_offset is None else self.norm_offset,
        )

    @classmethod
    def from_dict(cls, doc: Any, where: str = "config.json") -> "FusionConfig":
        """Read a ``fusion`` section, refusing fields of the wrong type with one line."""
        if not isinstance(doc, dict):
            raise CheckpointError(f"{where}: 'fusion' section is not an object")
        known = {k: doc[k] for k in cls.__dataclass_fields__ if k in doc}
        if "layers" not in known:
            raise CheckpointError(f"{where}: 'fusion' section has no 'layers'")
        fc = cls(**known)
        if not isinstance(fc.layers, list) or not all(is_int(i) for i in fc.layers):
            raise CheckpointError(f"{where}: fusion.layers must be a list of layer indices")
        for name, kinds in _FUSION_FIELD_TYPES.items():
            value = getattr(fc, name)
            if not has_type(value, kinds):
                raise CheckpointError(f"{where}: fusion.{name} is {value!r}, expected {kinds[0].__name__}")
        for name in ("dim", "num_heads", "num_kv_heads", "head_dim", "intermediate_dim"):
            if getattr(fc, name) < 0:
                raise CheckpointError(f"{where}: fusion.{name} is {getattr(fc, name)}, expected a positive size")
        return fc


#: The type every scalar field of a fusion section must have.
_FUSION_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "fusion_first": (bool,), "encoder_dim": (int,), "fusion_vocab": (int,), "init": (str,),
    "init_std": (float, int), "seed": (int,), "dtype": (str,), "qk_norm_eps": (float, int),
    "norm_eps": (float, int), "tool_version": (str,), "layer_prefix": (str,), "embedding_key": (str,),
    "dim": (int,), "num_heads": (int,), "num_kv_heads": (int,), "head_dim": (int,), "intermediate_dim": (int,),
    "activation": (str,), "norm_offset": (float, int, type(None)),
}


def read_fusion_config(doc: dict[str, Any] | None) -> FusionConfig | None:
    """The ``fusion`` section of a config.json, if any."""
    if not doc or "fusion" not in doc:
        return None
    return FusionConfig.from_dict(doc["fusion"])
