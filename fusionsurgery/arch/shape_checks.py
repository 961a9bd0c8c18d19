"""Checking a native decoder's tensors against the shapes its config implies."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import CheckpointError, listed
from .model_config import ModelConfig

if TYPE_CHECKING:
    from .families import Family


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every tensor of the (unfused) decoder ``cfg`` describes."""
    expected: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (cfg.vocab_size, cfg.dim), "norm.scale": (cfg.dim,)}
    if not cfg.tie_embeddings:
        expected["output.weight"] = (cfg.vocab_size, cfg.dim)
    q, kv = cfg.num_heads * cfg.head_dim, cfg.kv_dim
    per_layer: dict[str, tuple[int, ...]] = {
        "sa_norm.scale": (cfg.dim,), "mlp_norm.scale": (cfg.dim,), "attn.output_proj.weight": (cfg.dim, q),
        "mlp.w2.weight": (cfg.dim, cfg.intermediate_dim),
    }
    if cfg.fused_qkv:
        per_layer["attn.qkv_proj.weight"] = (q + 2 * kv, cfg.dim)
        if cfg.attn_bias:
            per_layer["attn.qkv_proj.bias"] = (q + 2 * kv,)
    else:
        per_layer.update({"attn.q_proj.weight": (q, cfg.dim), "attn.k_proj.weight": (kv, cfg.dim),
                          "attn.v_proj.weight": (kv, cfg.dim)})
        if cfg.attn_bias:
            per_layer.update({"attn.q_proj.bias": (q,), "attn.k_proj.bias": (kv,), "attn.v_proj.bias": (kv,)})
    if cfg.fused_gate_up:
        per_layer["mlp.w13.weight"] = (2 * cfg.intermediate_dim, cfg.dim)
    else:
        per_layer.update({"mlp.w1.weight": (cfg.intermediate_dim, cfg.dim), "mlp.w3.weight": (cfg.intermediate_dim, cfg.dim)})
    if cfg.qk_norm:
        per_layer.update({"attn.q_norm.scale": (cfg.head_dim,), "attn.k_norm.scale": (cfg.head_dim,)})
    for i in range(cfg.num_layers):
        for suffix, shape in per_layer.items():
            expected[f"layers.{i}.{suffix}"] = shape
    return expected


def check_shapes(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], family: "Family | None" = None) -> None:
    """Every tensor of every layer must have the shape the config implies.

    Args:
        cfg: the decoder.
        shapes: canonical name -> shape of every (non-fusion) tensor.
        family: the checkpoint's naming family: errors name the tensors as the checkpoint does (else canonically).

    Raises:
        CheckpointError: tensors missing or unexpected (named, ``listed``), or the first of another shape.
    """
    def named(canonical: list[str]) -> str:
        try:
            if family is not None:
                return listed([family.to_family(k) for k in canonical], 3)
        except (CheckpointError, KeyError, ValueError):  # a name the family cannot spell
            pass
        return f"{listed(canonical, 3)} (canonical names)"

    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {named(missing)}")
    for key, shape in expected.items():
        if tuple(shapes[key]) != shape:
            raise CheckpointError(f"tensor {named([key])} has shape {list(shapes[key])}, expected {list(shape)}")
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise CheckpointError(f"{len(extra)} unexpected tensor(s) for this architecture: {named(extra)}")
