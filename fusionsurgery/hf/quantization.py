"""Quantizing the base while loading (QLoRA): the base's linears quantized, the fusion blocks kept float.

``fusionsurgery.hf.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))``
(bitsandbytes 4-bit and 8-bit, torchao, any transformers method with a skip list) hands transformers
a copy of the user's config whose skip list is the user's (or, when they gave none, transformers'
own defaults: the output head and tied weights) plus the module path of every fusion block and fusion
vocabulary, so the quantizer replaces the base's linears and leaves the blocks as ``nn.Linear`` in a
float dtype, trainable. The paths are found on a meta-device copy of the model and checked with
transformers' own matching rule (``quantizers_utils.should_convert_module``: a pattern matches from
the start of a module name to a ``.`` boundary), and the loaded model is checked again: a fusion
parameter that came out quantized is refused, never trained or saved.

``save_pretrained`` of such a model writes the base's tensors that were quantized from the checkpoint
the model was opened from (``quantized_weights`` names them), not the packed ones or their quant states.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .._requirements import require
from ..arch.quantization import SKIP_FIELDS
from ..errors import UsageError
from .blocks import FusionBlock

#: The oldest bitsandbytes release tested here (CPU backend, 4-bit nf4 and 8-bit through transformers);
#: pyproject.toml's ``[quant]`` extra declares the same floor.
BITSANDBYTES_FLOOR = "0.46.1"

def skip_attribute(quantization_config: Any) -> str:
    """The attribute of a transformers quantization config that lists the modules its quantizer leaves alone.

    Args:
        quantization_config: a ``transformers.utils.quantization_config.QuantizationConfigMixin``.

    Returns:
        str: ``llm_int8_skip_modules`` (bitsandbytes) or ``modules_to_not_convert`` (torchao, fp8, ...).

    Raises:
        UsageError: a method whose config has no such list (the fusion blocks could not be kept out).
    """
    method = getattr(quantization_config, "quant_method", type(quantization_config).__name__)
    # the list each method's loader reads (arch.quantization.SKIP_FIELDS: bitsandbytes' own, else transformers')
    name = SKIP_FIELDS.get(str(getattr(method, "value", method)), ("modules_to_not_convert",))[0]
    if not hasattr(quantization_config, name):
        raise UsageError(f"quantization method {str(getattr(method, 'value', method))!r} has no list of modules to leave unquantized "
                         "(modules_to_not_convert): fusionsurgery.hf cannot keep the fusion blocks float with it")
    return name


def fusion_module_names(model: nn.Module) -> list[str]:
    """Module paths of everything fusion added: each block (``model.layers.3.fusion_layer``) and the
    fusion vocabulary (``model.embed_tokens.fusion_embedding``).

    Args:
        model: a fused transformers model (on any device, the meta device included).

    Returns:
        list[str]: module paths, in the model's order.
    """
    return [name for name, module in model.named_modules()
            if isinstance(module, FusionBlock) or name.endswith(".fusion_embedding") or name == "fusion_embedding"]


def _config_object(quantization_config: Any) -> Any:
    """A transformers quantization config from an object or a ``dict`` (transformers accepts both)."""
    if isinstance(quantization_config, dict):
        from transformers.quantizers.auto import AutoQuantizationConfig

        return AutoQuantizationConfig.from_dict(copy.deepcopy(quantization_config))
    return copy.deepcopy(quantization_config)


def _require_library(quantization_config: Any) -> None:
    """One line naming what to install when the method's library is missing (bitsandbytes: the ``[quant]`` extra)."""
    method = getattr(quantization_config, "quant_method", "")
    if getattr(method, "value", method) == "bitsandbytes":
        require("bitsandbytes", BITSANDBYTES_FLOOR, extra="quant",
                user="fusionsurgery.hf with a bitsandbytes quantization_config")


def keep_fusion_float(cls: type, config: Any, quantization_config: Any) -> Any:
    """A copy of ``quantization_config`` whose skip list also holds every fusion module of ``cls(config)``.

    The user's list is kept as given, plus the modules whose weights are tied (a tied output head
    shares its tensor with the embeddings: quantized, the forward fails, as it does for the plain base
    in transformers 5.25 given a list without it); when they gave none, transformers' defaults for the
    model (the output head, tied weights: ``get_keys_to_not_convert``) are written out, since a list
    replaces them.

    Args:
        cls: the fused transformers class (``model_class``).
        config: its config (a ``PretrainedConfig`` with a ``fusion`` section).
        quantization_config: the user's config (object or dict); it is not modified.

    Returns:
        The new config object, for ``from_pretrained(quantization_config=...)``.

    Raises:
        UsageError: a method without a skip list, or one whose matching rule would still quantize a
            fusion module (or would skip a base module the user's list did not skip).
        MissingDependencyError: bitsandbytes is not installed (or older than the floor).
    """
    quantization_config = _config_object(quantization_config)
    _require_library(quantization_config)
    attribute = skip_attribute(quantization_config)
    with torch.device("meta"):
        meta = cls(config)
    given = getattr(quantization_config, attribute)
    if given is None:
        from transformers.quantizers.base import get_keys_to_not_convert

        skip = list(get_keys_to_not_convert(meta))
    else:
        skip = [given] if isinstance(given, str) else list(given)
        skip += [name for name in tied_modules(meta) if name not in skip]
    fusion = fusion_module_names(meta)
    patterns = skip + [name for name in fusion if name not in skip]
    _check_patterns(meta, fusion, skip, patterns)
    setattr(quantization_config, attribute, patterns)
    return quantization_config


def tied_modules(model: nn.Module) -> list[str]:
    """Module paths of the weights transformers ties (``lm_head`` and ``model.embed_tokens`` in a tied model).

    Args:
        model: a transformers model (the meta device will do).

    Returns:
        list[str]: the modules owning a tied weight, sorted; empty when nothing is tied.
    """
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return sorted({key.removesuffix(".weight") for pair in tied.items() for key in pair})


def _check_patterns(model: nn.Module, fusion: list[str], before: list[str], after: list[str]) -> None:
    """With transformers' own matching rule: ``after`` skips every module inside the fusion modules and,
    of the base's modules, exactly those ``before`` skipped."""
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:  # an older release: the check of the loaded model (``check_fusion_float``) stands alone
        return
    for name, _ in model.named_modules():
        inside = any(name == f or name.startswith(f + ".") for f in fusion)
        if inside and should_convert_module(name, after):
            raise UsageError(f"the quantization skip list {after} would still quantize fusion module {name!r}")
        if not inside and should_convert_module(name, after) != should_convert_module(name, before):
            raise UsageError(f"adding the fusion modules to the quantization skip list changes base module {name!r}")


def quantization_kwargs(cls: type, directory: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``from_pretrained``'s keyword arguments with a ``quantization_config`` that keeps the fusion blocks float.

    Args:
        cls: the fused transformers class.
        directory: the directory transformers reads (its config.json builds the meta-device copy,
            unless ``kwargs`` holds a ``config``).
        kwargs: the user's keyword arguments (not modified).

    Returns:
        dict[str, Any]: ``kwargs`` itself without a ``quantization_config``, else a copy with
        :func:`keep_fusion_float`'s config in its place.
    """
    if kwargs.get("quantization_config") is None:
        return kwargs
    config = kwargs.get("config")
    if not hasattr(config, "to_dict"):
        config = cls.config_class.from_pretrained(str(directory))
    return dict(kwargs, quantization_config=keep_fusion_float(cls, copy.deepcopy(config),
                                                                kwargs["quantization_config"]))


def check_fusion_float(model: nn.Module) -> None:
    """Refuse a loaded model whose fusion modules did not stay float ``nn.Linear`` / ``nn.Embedding``.

    Args:
        model: a fused transformers model loaded with a quantization config.

    Raises:
        UsageError: a fusion parameter that is quantized (a tensor subclass or a non-float dtype) or a
            fusion linear replaced by a quantized layer class.
    """
    for name in fusion_module_names(model):
        for sub, module in model.get_submodule(name).named_modules(prefix=name):
            if isinstance(module, (nn.Linear, nn.Embedding)) and type(module) not in (nn.Linear, nn.Embedding) \
                    and not type(module).__module__.startswith("fusionsurgery."):
                raise UsageError(f"{sub} was loaded as {type(module).__name__}: the quantizer did not leave the "
                                 "fusion blocks float")
            for pname, p in module.named_parameters(recurse=False):
                if type(p) is not nn.Parameter or not p.is_floating_point():
                    raise UsageError(f"{sub}.{pname} was loaded quantized ({type(p).__name__}, {p.dtype}): the "
                                     "quantizer did not leave the fusion blocks float")


def quantized_weights(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The parameters transformers' quantizer quantized while loading, with their logical shape.

    Args:
        model: a transformers model (not a PEFT wrapper).

    Returns:
        dict[str, tuple[int, ...]]: ``{parameter name: (out_features, in_features)}`` for each weight the
        model's quantizer replaced (``param_needs_quantization``); empty for a model loaded unquantized, and
        for a checkpoint that was quantized on disk (its tensors are the checkpoint's: ``hf/prequantized.py``).
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or getattr(quantizer, "pre_quantized", False):
        return {}
    found: dict[str, tuple[int, ...]] = {}
    for module_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            name = f"{module_name}.{pname}" if module_name else pname
            if quantizer.param_needs_quantization(model, name):
                found[name] = _logical_shape(module, pname)
    return found


def with_original_placeholders(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
                               ) -> dict[str, torch.Tensor] | None:
    """A state dict in which each quantized weight is a meta-device tensor of its logical shape, its quant
    states (bitsandbytes' ``weight.absmax``, ``weight.quant_state.*``, ``SCB`` ...) gone: the saver writes the
    bytes of the checkpoint the model was opened from wherever it meets a meta tensor.

    Args:
        model: a transformers model (not a PEFT wrapper).
        state_dict: its weights (default: ``model.state_dict()``), e.g. gathered from FSDP ranks.

    Returns:
        ``state_dict`` unchanged (None stays None) for a model loaded unquantized, else the new dict.
    """
    quantized = quantized_weights(model)
    if not quantized:
        return state_dict
    if state_dict is None:
        state_dict = model.state_dict()
    owners = {name.rsplit(".", 1)[0] for name in quantized}
    kept: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        if key in quantized:
            kept[key] = torch.empty(quantized[key], device="meta")
        elif any(".".join(parts[:i]) in owners for i in range(1, len(parts))) and not _plain_parameter(model, key):
            continue  # a quant state of a quantized layer
        else:
            kept[key] = tensor
    return kept


def _plain_parameter(model: nn.Module, key: str) -> bool:
    """Whether ``key`` names a float parameter of the model that was not quantized (a quantized layer's bias)."""
    try:
        p = model.get_parameter(key)
    except AttributeError:
        return False
    return type(p) is nn.Parameter and p.is_floating_point()


def _logical_shape(module: nn.Module, pname: str) -> tuple[int, ...]:
    """A quantized parameter's shape before quantization (a linear's ``[out, in]``; else the tensor's own)."""
    if pname == "weight" and hasattr(module, "out_features") and hasattr(module, "in_features"):
        return (module.out_features, module.in_features)
    return tuple(getattr(module, pname).shape)


__all__ = ["BITSANDBYTES_FLOOR", "check_fusion_float", "fusion_module_names", "keep_fusion_float",
           "quantization_kwargs", "quantized_weights", "skip_attribute", "tied_modules", "with_original_placeholders"]
