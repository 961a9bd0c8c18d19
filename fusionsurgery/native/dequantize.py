"""A quantized checkpoint of a native type on the native modules: FP8 weights dequantized as they load.

Two formats keep each weight's shape and scale it by a tensor beside it, so the native modules read them
directly: transformers' block FP8 (``weight_scale_inv`` per tile) and compressed-tensors' FP8
(``float-quantized`` with weights alone quantized: ``weight_scale`` per channel or per tensor). Each weight
becomes ``weight * scale`` as transformers (float32) and compressed-tensors (the scale's dtype) compute it,
then the model's dtype. Every other format (packed values, activations quantized too) runs through
transformers (``fusionsurgery.hf``).
"""

from __future__ import annotations

import torch

from ..arch.families import FAMILIES, is_fusion_key
from ..arch.model_config import ModelConfig
from ..arch.model_types import is_native
from ..arch.quantization import Quantization
from ..arch.reading import config_from_shapes
from ..errors import CheckpointError, UsageError
from ..io.checkpoint import Checkpoint
from ..surgery.quantized import quantization_of

#: The transformers-named family a native type's FP8 release is read in.
HF = FAMILIES["hf"]


def dequantize_block_fp8(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """A block-FP8 weight's values in float32: each tile times its ``weight_scale_inv``.

    Args:
        weight: F8_E4M3 ``[rows, cols]``.
        scale_inv: F32 ``[ceil(rows / block), ceil(cols / block)]``.

    Returns:
        torch.Tensor: float32 ``[rows, cols]``.
    """
    rows, cols = weight.shape
    br, bc = -(-rows // scale_inv.shape[0]), -(-cols // scale_inv.shape[1])
    scale = scale_inv.float().repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    return weight.float() * scale


def _scaled_fp8(quant: Quantization) -> bool:
    """Block FP8, or compressed-tensors' FP8 with weights alone quantized: a compressed-tensors scheme that also
    quantizes activations (FP8_DYNAMIC) changes the forward itself, which only its own library runs."""
    if quant.method == "fp8":
        return True
    groups = quant.config.get("config_groups") or {}
    return (quant.method == "compressed-tensors" and quant.config.get("format") == "float-quantized"
            and all(isinstance(g, dict) and not g.get("input_activations") and not g.get("output_activations")
                    for g in groups.values()))


def native_config(ckpt: Checkpoint, cfg: ModelConfig) -> tuple[ModelConfig, Quantization] | None:
    """The native description of a quantized ``ckpt`` whose weights the native modules can dequantize (a block-FP8
    or weight-only compressed-tensors FP8 release of a native type in transformers' names); None when it is not
    quantized.

    Args:
        ckpt: the checkpoint.
        cfg: its description as read (layers wrapped as they are).

    Returns:
        (the native ``ModelConfig``, the quantization), or None.

    Raises:
        UsageError: a quantized checkpoint the native modules cannot read (a type without native modules, a
            packed format): one line naming ``fusionsurgery.hf``.
    """
    quant = quantization_of(ckpt)
    if quant is None:
        return None
    hf_names = cfg.family_obj.layer_prefix == HF.layer_prefix and cfg.family_obj.marker == HF.marker
    if not is_native(cfg.model_type) or not _scaled_fp8(quant) or not hf_names:
        raise UsageError(f"{ckpt.root} is a quantized {cfg.model_type} ({quant.detail}); the native modules read "
                         "block FP8 and weight-only compressed-tensors FP8 releases of their own types, transformers "
                         "reads this one: fusionsurgery.hf.from_pretrained(path) opens it as its own class with the "
                         'fusion blocks (pip install "fusionsurgery[hf]")')
    shapes = {HF.to_canonical(k): ckpt.info(k).shape for k in ckpt.keys()
              if not quant.is_side(k) and not is_fusion_key(HF.to_canonical(k))}
    return config_from_shapes(ckpt.config or {}, HF, shapes, str(ckpt.config_path or "config.json")), quant


def read_dequantized(ckpt: Checkpoint, key: str, quant: Quantization) -> torch.Tensor:
    """Tensor ``key`` of ``ckpt``, an FP8 weight dequantized to float32 by the scale beside it.

    Raises:
        CheckpointError: an FP8 weight without its scale.
    """
    tensor = ckpt.read_tensor(key)
    if not ckpt.info(key).dtype.startswith("F8_"):
        return tensor
    module = key.removesuffix(".weight")
    if quant.method == "fp8" and f"{module}.weight_scale_inv" in ckpt.key_to_file:
        return dequantize_block_fp8(tensor, ckpt.read_tensor(f"{module}.weight_scale_inv"))
    if quant.method == "compressed-tensors" and f"{module}.weight_scale" in ckpt.key_to_file:
        scale = ckpt.read_tensor(f"{module}.weight_scale")  # in the scale's dtype, as compressed-tensors does
        return tensor.to(scale.dtype) * (scale.reshape(-1, 1) if scale.numel() == tensor.shape[0] else scale.reshape(()))
    raise CheckpointError(f"{ckpt.root}: {key} is {ckpt.info(key).dtype} without its scale beside it")
