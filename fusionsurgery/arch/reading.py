"""Reading a decoder's description: from its config.json, or from tensor shapes when it has none.

Types the native modules implement are read strictly (every tensor checked against the Llama
recipe); every other type is read by meaning from its config's own fields (``generic.py``).
"""

from __future__ import annotations

import copy
from typing import Any

from ..errors import CheckpointError
from ..io.checkpoint import Checkpoint
from ..io.manifest_schema import is_number
from .discovery import family_of_checkpoint
from .families import Family, is_fusion_key
from .fields import ConfigFields
from .generic import fusion_activation, read_generic_config
from .model_config import ModelConfig
from .model_types import MODEL_TYPES, SUPPORTED_ACTIVATIONS, ModelType
from .options import ROPE_DEFAULTS, check_options
from .rope_config import read_rope
from .shape_checks import check_shapes
from .shape_inference import check_fusedness, heads_from_shapes, infer_from_shapes, structure_of, type_switches


def read_model_config(
    ckpt: Checkpoint, *, num_heads: int | None = None, num_kv_heads: int | None = None,
    rope_defaults: str | None = None, layer_prefix: str | None = None,
) -> ModelConfig:
    """Describe the decoder in ``ckpt`` from its config.json, or infer it from tensor shapes.

    Fusion tensors (of an already fused checkpoint) are ignored here. RoPE settings are not in the
    tensors: without a config they stay unknown (``rope_theta=None``) unless ``rope_defaults`` names a
    set of ``ROPE_DEFAULTS`` (e.g. ``"llama3"``, torchtune's Llama 3 builders); a config always wins.
    A type the native modules do not implement is read from its config's own fields
    (``read_generic_config``): its layers are wrapped as they are; ``layer_prefix`` names its layer
    list where the config's text part cannot tell it from another (``discovery.find_layer_prefix``).
    """
    check_options(rope_defaults=rope_defaults, num_heads=num_heads, num_kv_heads=num_kv_heads)
    family = family_of_checkpoint(ckpt, layer_prefix)
    if family.passthrough:
        return read_generic_config(ckpt, family, num_heads=num_heads, num_kv_heads=num_kv_heads)
    shapes = {}
    for key in ckpt.keys():
        canonical = family.to_canonical(key)
        if not is_fusion_key(canonical):
            shapes[canonical] = ckpt.info(key).shape
    if ckpt.config is not None:
        try:
            cfg = _from_hf_config(ckpt.config, family, shapes, num_heads, num_kv_heads)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            where = ckpt.config_path or "config.json"
            raise CheckpointError(f"{where}: unreadable value ({type(exc).__name__}: {exc})") from None
    else:
        cfg = infer_from_shapes(family, shapes, num_heads, num_kv_heads)
    if cfg.rope_theta is None and rope_defaults is not None:
        cfg.rope_theta, scaling = ROPE_DEFAULTS[rope_defaults]
        cfg.rope_scaling = copy.deepcopy(scaling)
        cfg.inferred.append(f"rope_theta and rope_scaling (--rope-defaults {rope_defaults})")
    try:
        check_shapes(cfg, shapes, family)
    except CheckpointError as exc:
        raise CheckpointError(f"{ckpt.root}: {exc}") from None
    return cfg


def config_from_shapes(doc: dict[str, Any], family: Family, shapes: dict[str, tuple[int, ...]],
                       where: str = "config.json") -> ModelConfig:
    """``read_model_config`` for tensors not on disk yet: the decoder that config ``doc`` describes,
    checked against the canonical name -> shape of every (non-fusion) tensor it will have."""
    try:
        cfg = _from_hf_config(doc, family, shapes, None, None)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{where}: unreadable value ({type(exc).__name__}: {exc})") from None
    check_shapes(cfg, shapes)
    return cfg


def activation_of(doc: dict[str, Any], model_type: str) -> str:
    """The MLP activation a Hugging Face config names for ``model_type`` (checked against the supported ones);
    for a type without native modules, the fusion block's (the base's where the block implements it, else silu)."""
    if model_type not in MODEL_TYPES:
        return fusion_activation(ConfigFields(doc).str_of("activation"))
    return _activation(doc, MODEL_TYPES[model_type])


def _activation(doc: dict[str, Any], mt: ModelType) -> str:
    name = mt.default_activation
    for key in mt.activation_keys:
        if doc.get(key):
            name = str(doc[key])
            break
    if name not in SUPPORTED_ACTIVATIONS:
        raise CheckpointError(
            f"config.json: MLP activation {name!r} is not supported (supported: {', '.join(SUPPORTED_ACTIVATIONS)})"
        )
    return name


def _sliding_window(doc: dict[str, Any], mt: ModelType) -> int | None:
    window = doc.get("sliding_window")
    if window is None or (mt.sliding_window_flag and not doc.get(mt.sliding_window_flag)):
        return None
    return int(window)


def _from_hf_config(
    doc: dict[str, Any], family: Family, shapes: dict[str, tuple[int, ...]], num_heads: int | None, num_kv_heads: int | None
) -> ModelConfig:
    s = structure_of(shapes)
    model_type = doc.get("model_type", "llama")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"config.json: model_type {model_type!r} is not supported (supported: {', '.join(MODEL_TYPES)})"
        )
    mt = MODEL_TYPES[model_type]
    check_fusedness(model_type, s, family.name)
    try:
        heads = int(doc.get("num_attention_heads") or num_heads or 0) or None
        kv = int(doc.get("num_key_value_heads") or num_kv_heads or heads or 0) or None
        head_dim = doc.get("head_dim")
        if head_dim is not None and not (is_number(head_dim) and head_dim == int(head_dim) and head_dim > 0):
            raise CheckpointError(f"config.json: head_dim is {head_dim!r}, expected a positive integer")
        if head_dim is None and heads:
            head_dim = int(doc.get("hidden_size", s["dim"])) // heads
        heads, kv, head_dim = heads_from_shapes(s, heads, kv, int(head_dim) if head_dim else None)
        theta, scaling = read_rope(doc, mt.default_theta)
        norm_eps = float(doc.get("rms_norm_eps", mt.default_norm_eps))
        max_seq = int(doc.get("max_position_embeddings", 4096))
        window = _sliding_window(doc, mt)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"config.json: unreadable value ({exc})") from None
    for name, ours in (("hidden_size", s["dim"]), ("vocab_size", s["vocab_size"]),
                       ("num_hidden_layers", s["num_layers"]), ("intermediate_size", s["intermediate_dim"])):
        if name in doc and doc[name] != ours:
            raise CheckpointError(f"config.json says {name}={doc[name]} but the tensors say {ours}")
    tie = s["tie_embeddings"]
    if doc.get("tie_word_embeddings") is False and tie:
        raise CheckpointError("config.json says tie_word_embeddings=false but the checkpoint has no lm_head")
    return ModelConfig(
        family=family.name, model_type=model_type, num_layers=s["num_layers"], dim=s["dim"],
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim, intermediate_dim=s["intermediate_dim"],
        vocab_size=s["vocab_size"], norm_eps=norm_eps, rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=tie, attn_bias=s["attn_bias"], qk_norm=s["qk_norm"], max_seq_len=max_seq,
        activation=_activation(doc, mt), fused_qkv=s["fused_qkv"], fused_gate_up=s["fused_gate_up"],
        sliding_window=window, **type_switches(mt, s["dim"]),
    )
