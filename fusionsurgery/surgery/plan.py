"""The new tensors a fusion adds: names in the base's family, shapes, dtype and how to initialise each."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..arch.config import FusionConfig, ModelConfig
from ..arch.families import FUSION_SEGMENT
from ..errors import UsageError
from ..io.safetensors_format import DTYPE_SIZES

INIT_CHOICES = ("normal", "xavier", "copy")
#: Fusion-layer tensors that ``--init copy`` takes from the wrapped layer (canonical suffixes).
COPY_SOURCES = {
    "attn.q_proj.weight": "attn.q_proj.weight",
    "attn.k_proj.weight": "attn.k_proj.weight",
    "attn.v_proj.weight": "attn.v_proj.weight",
    "attn.output_proj.weight": "attn.output_proj.weight",
    "mlp.w1.weight": "mlp.w1.weight",
    "mlp.w3.weight": "mlp.w3.weight",
    "mlp.w2.weight": "mlp.w2.weight",
}


@dataclass(frozen=True)
class NewTensor:
    """One tensor that fusion adds."""

    key: str  # name in the base's family
    canonical: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name
    init: str  # "normal", "xavier", "zeros", "ones" or "copy"
    std: float = 0.0
    source: str | None = None  # base key for "copy"
    layer: int | None = None
    source_row: int | None = None  # copy rows from here (a part of a fused qkv / gate_up); None: all of it

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]

    @property
    def init_text(self) -> str:
        if self.init == "normal":
            return f"normal(std={self.std:g})"
        if self.init == "copy":
            rows = "" if self.source_row is None else f"[{self.source_row}:{self.source_row + self.shape[0]}]"
            return f"copy({self.source}{rows})"
        return self.init


def fusion_layer_shapes(cfg: ModelConfig, encoder_dim: int) -> dict[str, tuple[int, ...]]:
    """Canonical suffix -> shape for one gated cross-attention block."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.kv_dim
    return {
        "ca_norm.scale": (cfg.dim,),
        "attn.q_proj.weight": (q, cfg.dim),
        "attn.k_proj.weight": (kv, encoder_dim),
        "attn.v_proj.weight": (kv, encoder_dim),
        "attn.output_proj.weight": (cfg.dim, q),
        "attn.q_norm.scale": (cfg.head_dim,),
        "attn.k_norm.scale": (cfg.head_dim,),
        "ca_scale.scale": (1,),
        "mlp_norm.scale": (cfg.dim,),
        "mlp.w1.weight": (cfg.intermediate_dim, cfg.dim),
        "mlp.w3.weight": (cfg.intermediate_dim, cfg.dim),
        "mlp.w2.weight": (cfg.dim, cfg.intermediate_dim),
        "mlp_scale.scale": (1,),
    }


def plan_new_tensors(cfg: ModelConfig, fusion: FusionConfig) -> list[NewTensor]:
    """Every tensor the fusion adds, in writing order (layer by layer, then the fusion embedding)."""
    family = cfg.family_obj
    encoder_dim = fusion.encoder_dim or cfg.dim
    if fusion.init == "copy" and encoder_dim != cfg.dim:
        raise UsageError(
            f"`init` copy needs `encoder_dim` equal to the decoder width ({cfg.dim}): the cross-attention "
            f"keys/values read {encoder_dim}-wide states, so the self-attention's k/v weights do not fit"
        )
    out: list[NewTensor] = []
    for i in fusion.layers:
        for suffix, shape in fusion_layer_shapes(cfg, encoder_dim).items():
            canonical = f"layers.{i}.{FUSION_SEGMENT}.{suffix}"
            key = family.to_family(canonical)
            row = None
            if suffix.endswith("_scale.scale"):
                init, source = "zeros", None
            elif suffix.endswith(".scale"):
                init, source = _identity_norm(cfg), None
            elif fusion.init == "copy":
                init = "copy"
                source_suffix, row = _copy_source(cfg, suffix)
                source = family.layer_key(i, source_suffix)
            else:
                init, source = fusion.init, None
            out.append(NewTensor(key, canonical, shape, fusion.dtype, init, fusion.init_std, source, i, row))
    if fusion.fusion_vocab:
        canonical = "tok_embeddings.fusion_embedding.weight"
        out.append(NewTensor(family.to_family(canonical), canonical, (fusion.fusion_vocab, cfg.dim), fusion.dtype,
                             "normal", fusion.init_std))
    return out


def _identity_norm(cfg: ModelConfig) -> str:
    """How a new norm's stored scale starts so that its effective scale is one (Gemma's 1 + w: zeros)."""
    stored = 1.0 - cfg.norm_offset
    if stored not in (0.0, 1.0):
        raise UsageError(f"no identity init for a norm with offset {cfg.norm_offset}")
    return "ones" if stored == 1.0 else "zeros"


def _copy_source(cfg: ModelConfig, suffix: str) -> tuple[str, int | None]:
    """(canonical suffix, first row) of the base tensor ``--init copy`` reads for fusion tensor ``suffix``:
    a row range of the fused projection when the base fuses q/k/v (or gate/up)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.kv_dim
    if cfg.fused_qkv and suffix in ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"):
        return "attn.qkv_proj.weight", {"attn.q_proj.weight": 0, "attn.k_proj.weight": q,
                                        "attn.v_proj.weight": q + kv}[suffix]
    if cfg.fused_gate_up and suffix in ("mlp.w1.weight", "mlp.w3.weight"):
        return "mlp.w13.weight", 0 if suffix == "mlp.w1.weight" else cfg.intermediate_dim
    return COPY_SOURCES[suffix], None
