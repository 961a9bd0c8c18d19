"""What the tensors alone tell of a native decoder (no config.json): sizes from shapes."""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError, UsageError
from .families import Family
from .model_config import ModelConfig
from .model_types import MODEL_TYPES, SPLIT_NAMING, ModelType, fused_projections


def _shape(shapes: dict[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"checkpoint has no tensor {key!r} (canonical name); is it a complete decoder?")
    return shapes[key]


def _layer_count(shapes: dict[str, tuple[int, ...]]) -> int:
    idx = {int(k.split(".")[1]) for k in shapes if k.startswith("layers.")}
    if not idx:
        raise CheckpointError("checkpoint has no decoder layers")
    n = max(idx) + 1
    missing = sorted(set(range(n)) - idx)
    if missing:
        raise CheckpointError(f"checkpoint is missing decoder layer(s) {missing[:5]}")
    return n


def structure_of(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """What the tensors alone decide. A fused ``qkv_proj`` leaves q/k widths to the head count."""
    vocab, dim = _shape(shapes, "tok_embeddings.weight")
    fused_qkv = "layers.0.attn.qkv_proj.weight" in shapes
    fused_gate_up = "layers.0.mlp.w13.weight" in shapes
    if fused_qkv:
        q_out = kv_out = None
        qkv_out = _shape(shapes, "layers.0.attn.qkv_proj.weight")[0]
    else:
        q_out = _shape(shapes, "layers.0.attn.q_proj.weight")[0]
        kv_out = _shape(shapes, "layers.0.attn.k_proj.weight")[0]
        qkv_out = None
    if fused_gate_up:
        rows = _shape(shapes, "layers.0.mlp.w13.weight")[0]
        if rows % 2:
            raise CheckpointError(f"mlp gate_up projection has an odd number of rows ({rows})")
        inter = rows // 2
    else:
        inter = _shape(shapes, "layers.0.mlp.w1.weight")[0]
    qk_norm = "layers.0.attn.q_norm.scale" in shapes
    return {
        "vocab_size": vocab,
        "dim": dim,
        "q_out": q_out,
        "kv_out": kv_out,
        "qkv_out": qkv_out,
        "intermediate_dim": inter,
        "num_layers": _layer_count(shapes),
        "tie_embeddings": "output.weight" not in shapes,
        "attn_bias": "layers.0.attn.q_proj.bias" in shapes or "layers.0.attn.qkv_proj.bias" in shapes,
        "qk_norm": qk_norm,
        "qk_head_dim": shapes["layers.0.attn.q_norm.scale"][0] if qk_norm else None,
        "fused_qkv": fused_qkv,
        "fused_gate_up": fused_gate_up,
    }


def heads_from_shapes(s: dict[str, Any], num_heads: int | None, num_kv_heads: int | None, head_dim: int | None) -> tuple[int, int, int]:
    if head_dim is None:
        head_dim = s["qk_head_dim"]
    if head_dim is None:
        if num_heads is None:
            raise UsageError(
                "the head count cannot be inferred from tensor shapes without a config.json: "
                "pass `num_heads` N (and `num_kv_heads` N for grouped-query attention), or `config` PATH"
            )
        if s["dim"] % num_heads:
            raise UsageError(f"`num_heads` {num_heads} does not divide the width {s['dim']}")
        head_dim = s["dim"] // num_heads
    q_out, kv_out = s["q_out"], s["kv_out"]
    if s["qkv_out"] is not None:  # fused q/k/v: the query head count splits it
        if num_heads is None:
            raise UsageError(
                "a fused qkv_proj cannot be split without the head count: pass `num_heads` N or `config` PATH"
            )
        q_out = num_heads * head_dim
        rest = s["qkv_out"] - q_out
        if rest <= 0 or rest % (2 * head_dim):
            raise CheckpointError(
                f"qkv_proj has {s['qkv_out']} rows, which is not {num_heads} query heads of {head_dim} "
                "plus equal key and value parts"
            )
        kv_out = rest // 2
    if q_out % head_dim or kv_out % head_dim:
        raise CheckpointError(
            f"q/k projections ({q_out}, {kv_out} rows) are not multiples of head_dim {head_dim}"
        )
    heads = q_out // head_dim
    if num_heads is not None and num_heads != heads:
        raise UsageError(f"`num_heads` {num_heads} disagrees with the q_proj shape ({heads} heads of {head_dim})")
    kv = kv_out // head_dim
    if num_kv_heads is not None and num_kv_heads != kv:
        raise UsageError(f"`num_kv_heads` {num_kv_heads} disagrees with the k_proj shape ({kv} heads of {head_dim})")
    if kv == 0 or heads % kv:
        raise CheckpointError(f"{heads} query heads cannot be grouped over {kv} key/value heads")
    return heads, kv, head_dim


def type_switches(mt: ModelType, dim: int) -> dict[str, Any]:
    return {
        "norm_offset": mt.norm_offset,
        "norm_fp32_scale": mt.norm_fp32_scale,
        "embed_scale": dim ** 0.5 if mt.embed_scale_sqrt_dim else None,
    }


def check_fusedness(model_type: str, s: dict[str, Any], family: str = "hf") -> None:
    """The checkpoint fuses exactly the projections ``model_type`` fuses in naming ``family`` (torchtune's
    names split Phi-3's ``qkv_proj`` and ``gate_up_proj``).

    Raises:
        CheckpointError: it fuses more or fewer (the config is probably not the checkpoint's own).
    """
    expected = dict(zip(("fused_qkv", "fused_gate_up"), fused_projections(family, model_type)))
    qkv, gate_up = ("attn.qkv_proj", "mlp.w13") if family == SPLIT_NAMING else ("self_attn.qkv_proj", "mlp.gate_up_proj")
    names = {"fused_qkv": (f"one fused {qkv}", "separate q/k/v projections"),
             "fused_gate_up": (f"one fused {gate_up}", "separate gate and up projections")}
    for flag, (fused, split) in names.items():
        if expected[flag] != s[flag]:
            has = fused if s[flag] else split
            wants = fused if expected[flag] else split
            where = " in torchtune's names" if family == SPLIT_NAMING else ""
            raise CheckpointError(
                f"config.json says model_type {model_type!r}, which has {wants}{where}, but the checkpoint has {has}; "
                "is the config the checkpoint's own?"
            )


def infer_from_shapes(family: Family, shapes: dict[str, tuple[int, ...]], num_heads: int | None, num_kv_heads: int | None) -> ModelConfig:
    s = structure_of(shapes)
    heads, kv, head_dim = heads_from_shapes(s, num_heads, num_kv_heads, None)
    if s["fused_qkv"] and s["fused_gate_up"]:
        model_type = "phi3"
    else:
        model_type = "qwen3" if s["qk_norm"] else "qwen2" if s["attn_bias"] else "llama"
    check_fusedness(model_type, s, family.name)
    inferred = ["num_layers", "dim", "num_heads", "num_kv_heads", "head_dim", "intermediate_dim", "vocab_size",
                "tie_embeddings", "model_type"]
    mt = MODEL_TYPES[model_type]
    return ModelConfig(
        family=family.name, model_type=model_type, num_layers=s["num_layers"], dim=s["dim"],
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim, intermediate_dim=s["intermediate_dim"],
        vocab_size=s["vocab_size"], norm_eps=1e-5, tie_embeddings=s["tie_embeddings"], attn_bias=s["attn_bias"],
        qk_norm=s["qk_norm"], rope_theta=None, inferred=inferred, activation=mt.default_activation,
        fused_qkv=s["fused_qkv"], fused_gate_up=s["fused_gate_up"], **type_switches(mt, s["dim"]),
    )
