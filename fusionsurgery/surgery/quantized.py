"""The config.json of a fused checkpoint made from a quantized base: its ``quantization_config`` keeps the
fusion blocks out of quantization, and the base's own is kept in the fusion section for ``unfuse``.

The rules of each list are in ``arch/quantization.py``; DESIGN.md section 6 says why they matter.
"""

from __future__ import annotations

import copy
from typing import Any

from ..arch.config import FusionConfig
from ..arch.quantization import (Quantization, checkpoint_quantization, fusion_modules, read_quantization,
                                 skip_fusion_modules, unskipped_fusion_modules)
from ..errors import listed
from ..io.checkpoint import Checkpoint

#: Where the fusion section keeps the base's own ``quantization_config`` (``unfuse`` puts it back).
BASE_QUANTIZATION = "base_quantization_config"
_FLOAT = ("BF16", "F16", "F32", "F64")


def quantization_of(ckpt: Checkpoint) -> Quantization | None:
    """The quantization of ``ckpt`` (config and tensors), None for a float checkpoint.

    Raises:
        CheckpointError: an unknown method, or quantized tensors without a ``quantization_config``.
    """
    keys = ckpt.keys()
    return checkpoint_quantization(ckpt.config, keys, {k: ckpt.info(k).dtype for k in keys},
                                   str(ckpt.config_path or "config.json"))


def param_count(ckpt: Checkpoint, keys: list[str] | None = None) -> int:
    """The model parameters in ``keys`` of ``ckpt`` (default: all): packed quantized tensors unpacked,
    quantization data (scales, zero points, quantization states) not counted (``arch.quantization``)."""
    keys = ckpt.keys() if keys is None else keys
    quant = quantization_of(ckpt)
    if quant is None:
        return sum(ckpt.info(k).numel for k in keys)
    return sum(quant.param_count(k, ckpt.info(k).dtype, ckpt.info(k).numel) for k in keys)


def _config_holder(doc: dict[str, Any]) -> dict[str, Any]:
    """The part of ``doc`` that holds ``quantization_config`` (the top, or ``text_config``)."""
    if doc.get("quantization_config") is None and isinstance(doc.get("text_config"), dict) \
            and doc["text_config"].get("quantization_config") is not None:
        return doc["text_config"]
    return doc


def fused_quantization_config(ckpt: Checkpoint, quant: Quantization, fusion: FusionConfig,
                              layer_prefix: str, embedding_key: str) -> dict[str, Any]:
    """The base's ``quantization_config`` with every fusion module of ``fusion`` in its loader's skip list.

    Args:
        ckpt: the base (its tensors tell which linears it left in float, and GPTQ's quantized block modules).
        quant: its quantization.
        fusion: the fusion section (fused layers, fusion vocabulary).
        layer_prefix: where the layers are numbered (``model.layers``).
        embedding_key: the token embedding's key.

    Returns:
        dict: the new ``quantization_config``.
    """
    modules = fusion_modules(layer_prefix, fusion.layers, embedding_key if fusion.fusion_vocab else None)
    start = layer_prefix + "."
    quantized_modules = {quant.module_of(k) for k in ckpt.keys() if quant.is_side(k)
                         or quant.is_packed(k, ckpt.info(k).dtype) or ckpt.info(k).dtype.startswith("F8_")}
    float_linears = sorted(k.removesuffix(".weight") for k in ckpt.keys()
                           if k.endswith(".weight") and not k.startswith(start) and k != embedding_key
                           and len(ckpt.info(k).shape) == 2 and ckpt.info(k).dtype in _FLOAT
                           and k.removesuffix(".weight") not in quantized_modules)
    if not float_linears:  # a tied output projection has no tensor of its own; transformers' classes name it lm_head
        float_linears = ["lm_head"]
    first = f"{layer_prefix}.0."
    in_block = sorted(m[len(first):] for m in quantized_modules if m.startswith(first))
    return skip_fusion_modules(quant, modules, float_linears, in_block)


def with_fusion_skipped(doc: dict[str, Any], ckpt: Checkpoint, fusion: FusionConfig, layer_prefix: str,
                        embedding_key: str) -> dict[str, Any]:
    """A fused config.json (``doc``, its ``fusion`` section written) whose ``quantization_config`` keeps the
    fusion blocks float; the base's own is kept under ``fusion.base_quantization_config``. ``doc`` itself
    for a float base.

    Raises:
        CheckpointError: see :func:`quantization_of`.
    """
    quant = quantization_of(ckpt)
    if quant is None:
        return doc
    out = copy.deepcopy(doc)
    holder = _config_holder(out)
    out["fusion"][BASE_QUANTIZATION] = copy.deepcopy(holder["quantization_config"])
    holder["quantization_config"] = fused_quantization_config(ckpt, quant, fusion, layer_prefix, embedding_key)
    return out


def base_config_of(doc: dict[str, Any]) -> dict[str, Any]:
    """The base's config.json from a fused one: the fusion section dropped, the base's ``quantization_config``
    put back as it was."""
    out = copy.deepcopy(doc)
    fusion = out.pop("fusion", None)
    if isinstance(fusion, dict) and BASE_QUANTIZATION in fusion:
        _config_holder(out)["quantization_config"] = copy.deepcopy(fusion[BASE_QUANTIZATION])
    return out


def quantization_problems(doc: dict[str, Any] | None, fusion: FusionConfig, layer_prefix: str,
                          embedding_key: str) -> list[str]:
    """How a fused config's ``quantization_config`` would let its loader quantize fusion blocks (they have no
    scales: a GPU that runs the format replaces them with quantized layers holding garbage); empty when it
    keeps every one float, or the checkpoint is not quantized.

    Raises:
        CheckpointError: an unknown quantization method.
    """
    quant = read_quantization(doc)
    if quant is None:
        return []
    modules = fusion_modules(layer_prefix, fusion.layers, embedding_key if fusion.fusion_vocab else None)
    left = unskipped_fusion_modules(quant, [m for m in modules if m.endswith(".fusion_layer")])
    if not left:
        return []
    lists = " / ".join(quant.skip_fields)
    return [f"config.json's quantization_config ({quant.method}) lets the loader quantize {len(left)} fusion "
            f"block(s), which have no quantization scales: {listed(left)} not in {lists} (made by an older "
            "fusionsurgery? `fusionsurgery unfuse` then `fuse` again writes the list)"]
