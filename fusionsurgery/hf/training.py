"""Training helpers for fused transformers models: what to train, LoRA targets, FSDP2 sharding.

They read like the rest of the API (``get_fusion_params`` / ``set_trainable_params``) and work on
the model itself or on a PEFT model wrapping it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..modules.fusion import get_fusion_params, set_trainable_params
from .layers import decoder_layer_list, decoder_layer_path

#: PEFT ``target_modules`` (a regular expression) for the base's self-attention projections only,
#: never the fusion blocks' cross-attention (whose projections share the names q_proj ... o_proj).
SELF_ATTENTION_TARGETS = r".*\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj|qkv_proj)"


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The model a PEFT wrapper holds (``get_base_model()``), or ``model`` itself when it is not wrapped.

    Args:
        model: a fused transformers model, or a PEFT model wrapping one.

    Returns:
        The fused transformers model.
    """
    return model.get_base_model() if hasattr(model, "get_base_model") else model


#: Names of a decoder layer's self-attention sub-module across transformers' families.
ATTENTION_MODULES = ("self_attn", "attn", "attention", "self_attention")


def attention_targets(model: nn.Module) -> list[str]:
    """PEFT ``target_modules`` for any type: the full names of the projections (``nn.Linear`` and its
    quantized subclasses such as bitsandbytes' ``Linear4bit``, GPT-2's ``Conv1D``) inside each decoder layer's self-attention, never a fusion block's.

    Args:
        model: a fused transformers model (``fusionsurgery.hf.from_pretrained``).

    Returns:
        list[str]: module names such as ``transformer.h.0.attn.c_attn`` or
        ``model.layers.0.self_attn.q_proj`` (PEFT matches them exactly).

    Raises:
        ValueError: when no layer has such a projection (a type whose layers have no self-attention
            module by these names: give PEFT your own ``target_modules``).
    """
    inner = unwrap_peft(model)
    prefix = decoder_layer_path(inner)
    names = []
    for name, module in inner.named_modules():
        parts = name.split(".")
        if not name.startswith(prefix + ".") or "fusion_layer" in parts or len(parts) < 2:
            continue
        if parts[-2] in ATTENTION_MODULES and (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
            names.append(name)
    if not names:
        raise ValueError(f"no self-attention projection found in the decoder layers at {prefix!r}")
    return names


def freeze_all_but_fusion(model: nn.Module) -> dict[str, nn.Parameter]:
    """Freeze every parameter except those fusion added.

    Args:
        model: a fused transformers model, or a PEFT model wrapping one.

    Returns:
        dict[str, nn.Parameter]: ``{name: parameter}`` of the trainable ones.
    """
    params = get_fusion_params(model)
    set_trainable_params(model, params)
    return params


def make_fusion_trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Mark the fusion parameters trainable and leave the rest as they are (after ``peft.get_peft_model``,
    which freezes all but the LoRA weights); returns them."""
    params = get_fusion_params(model)
    for p in params.values():
        p.requires_grad_(True)
    return params


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers (fused or not) of a fused model, or of a PEFT model wrapping one."""
    return list(decoder_layer_list(unwrap_peft(model)))


def shard_with_fsdp2(model: nn.Module, **fully_shard_kwargs: Any) -> nn.Module:
    """Shard ``model`` with PyTorch FSDP2: each decoder layer (with its fusion block) is one unit, the
    rest (embeddings, final norm, output) the root's. Call inside an initialised process group;
    ``fully_shard_kwargs`` (``mesh``, ``mp_policy``, ``reshard_after_forward`` ...) go to ``fully_shard``.
    Frozen base parameters are sharded too, so each rank holds 1/N of the whole model.
    """
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model
