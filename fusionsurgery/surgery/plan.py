"""The new tensors a fusion adds: names in the base's family, shapes, dtype and how to initialise each."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..arch.config import FusionConfig, ModelConfig
from ..arch.families import FUSION_SEGMENT
from ..errors import UsageError
from ..io.checkpoint import Checkpoint
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


def fusion_layer_shapes(block: ModelConfig | FusionConfig, encoder_dim: int) -> dict[str, tuple[int, ...]]:
    """Canonical suffix -> shape for one gated cross-attention block of the sizes of ``block`` (a
    completed fusion section, ``FusionConfig.block``, or a decoder config of the same sizes)."""
    dim, head_dim, inter = block.dim, block.head_dim, block.intermediate_dim
    q, kv = block.num_heads * head_dim, block.num_kv_heads * head_dim
    return {
        "ca_norm.scale": (dim,),
        "attn.q_proj.weight": (q, dim),
        "attn.k_proj.weight": (kv, encoder_dim),
        "attn.v_proj.weight": (kv, encoder_dim),
        "attn.output_proj.weight": (dim, q),
        "attn.q_norm.scale": (head_dim,),
        "attn.k_norm.scale": (head_dim,),
        "ca_scale.scale": (1,),
        "mlp_norm.scale": (dim,),
        "mlp.w1.weight": (inter, dim),
        "mlp.w3.weight": (inter, dim),
        "mlp.w2.weight": (dim, inter),
        "mlp_scale.scale": (1,),
    }


def plan_new_tensors(cfg: ModelConfig, fusion: FusionConfig) -> list[NewTensor]:
    """Every tensor the fusion adds, in writing order (layer by layer, then the fusion embedding)."""
    family = cfg.family_obj
    block = fusion.block(cfg)
    encoder_dim = fusion.encoder_dim or block.dim
    if fusion.init == "copy" and encoder_dim != block.dim:
        raise UsageError(
            f"`init` copy needs `encoder_dim` equal to the decoder width ({cfg.dim}): the cross-attention "
            f"keys/values read {encoder_dim}-wide states, so the self-attention's k/v weights do not fit"
        )
    out: list[NewTensor] = []
    for i in fusion.layers:
        for suffix, shape in fusion_layer_shapes(block, encoder_dim).items():
            canonical = f"layers.{i}.{FUSION_SEGMENT}.{suffix}"
            key = family.to_family(canonical)
            row = None
            if suffix.endswith("_scale.scale"):
                init, source = "zeros", None
            elif suffix.endswith(".scale"):
                init, source = _identity_norm(block.norm_offset), None
            elif fusion.init == "copy":
                init = "copy"
                source_suffix, row = _copy_source(cfg, suffix)
                source = family.layer_key(i, source_suffix)
            else:
                init, source = fusion.init, None
            out.append(NewTensor(key, canonical, shape, fusion.dtype, init, fusion.init_std, source, i, row))
    if fusion.fusion_vocab:
        canonical = "tok_embeddings.fusion_embedding.weight"
        out.append(NewTensor(family.to_family(canonical), canonical, (fusion.fusion_vocab, block.dim), fusion.dtype,
                             "normal", fusion.init_std))
    return out


def _identity_norm(norm_offset: float | None) -> str:
    """How a new norm's stored scale starts so that its effective scale is one (Gemma's 1 + w: zeros)."""
    stored = 1.0 - (norm_offset or 0.0)
    if stored not in (0.0, 1.0):
        raise UsageError(f"no identity init for a norm with offset {norm_offset}")
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


def check_copy_sources(ckpt: Checkpoint, cfg: ModelConfig, new: list[NewTensor]) -> None:
    """Refuse ``--init copy`` where the wrapped layers have no Llama-shaped tensors to copy from.

    Raises:
        UsageError: a source tensor is missing or of another shape; names the first and the fix.
    """
    for t in new:
        if t.init != "copy" or t.source is None:
            continue
        if t.source not in ckpt.key_to_file:
            raise UsageError(
                f"--init copy: layer {t.layer} of this {cfg.model_type} checkpoint has no Llama-shaped "
                f"{t.source} to copy {t.key.rsplit(FUSION_SEGMENT + '.', 1)[-1]} from; use --init normal or xavier")
        if ckpt.info(t.source).dtype not in ("BF16", "F16", "F32", "F64"):
            raise UsageError(
                f"--init copy: {t.source} is {ckpt.info(t.source).dtype} (quantized: its values need the scales "
                "beside it), and copy takes float weights; use --init normal or xavier")
        shape = ckpt.info(t.source).shape
        first = t.source_row or 0
        fits = shape == t.shape if t.source_row is None else (
            shape[1:] == t.shape[1:] and first + t.shape[0] <= shape[0])
        if not fits:
            raise UsageError(
                f"--init copy: {t.source} is {list(shape)}, which does not give the fusion tensor's "
                f"{list(t.shape)} ({t.key}); use --init normal or xavier")
