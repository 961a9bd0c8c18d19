"""Saving a model opened from a checkpoint that is itself quantized (block FP8) and that transformers dequantized
as it loaded (on a CPU, or a GPU without FP8): the base's quantized weights and their scales are written as the
checkpoint's own bytes, once the model's weights are found to be exactly their dequantized values (untouched).

A model whose quantized layers transformers kept quantized holds the checkpoint's tensors itself (compressed-
tensors' FP8 keeps ``weight`` and ``weight_scale``); nothing is needed for it here.
"""

from __future__ import annotations

import torch

from ..errors import UsageError
from ..io.checkpoint import Checkpoint
from ..native.dequantize import dequantize_block_fp8
from ..surgery.quantized import quantization_of


def with_source_quantization(src: Checkpoint, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (checkpoint key -> the model's tensor) with a block-FP8 source's quantized weights and scales
    as the source's own values, where the model holds them dequantized; ``tensors`` itself otherwise.

    Raises:
        UsageError: a dequantized weight that is no longer the source's value (trained, or changed): it cannot
            be written back in FP8 without new scales.
    """
    quant = quantization_of(src)
    if quant is None or quant.method != "fp8":
        return tensors
    out = dict(tensors)
    for key in src.keys():
        if key in out or not quant.is_side(key):
            continue
        module = quant.module_of(key)
        weight_key = f"{module}.weight"
        out[key] = src.read_tensor(key)
        if key.endswith(".weight_scale_inv") and weight_key in out and out[weight_key].dtype != torch.float8_e4m3fn:
            original = src.read_tensor(weight_key)
            held = out[weight_key]
            if not torch.equal(dequantize_block_fp8(original, out[key]).to(held.dtype), held.detach().cpu()):
                raise UsageError(f"{weight_key} differs from the checkpoint's FP8 weight (trained?): save_pretrained "
                                 "writes a quantized base's weights as the checkpoint holds them; freeze the base "
                                 "(freeze_all_but_fusion) before training")
            out[weight_key] = original
    return out
