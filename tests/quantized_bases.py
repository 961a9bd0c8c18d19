"""Tiny quantized bases for the tests: written by the library that defines each format where it runs on a CPU
(compressed-tensors' own ``ModelCompressor``), else in the format's published layout and proven real by
transformers loading them with its own quantizer (block FP8: transformers' ``fp8`` method dequantizes on a CPU).

Every builder takes a float transformers model (``tiny_model``) and writes a directory: config.json with the
release's ``quantization_config`` and model.safetensors with the quantized linears of the decoder layers (the
embedding, norms and output projection stay float, as releases keep them).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

#: The decoder-layer linears every builder quantizes (module name suffixes).
LINEARS = re.compile(r"\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def tiny_model(model_type: str, seed: int = 0) -> Any:
    """A tiny transformers model of ``model_type`` (width 64, 4 layers), norms perturbed from one."""
    import transformers

    extra = {"head_dim": 24} if model_type == "qwen3" else {}
    config = transformers.AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _save_float(model: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    model.to(torch.bfloat16).save_pretrained(str(path))
    tensors = load_file(str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    return tensors, config


def _write(path: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def save_block_fp8(model: Any, path: Path, block: int = 16) -> Path:
    """transformers' ``fp8`` method (DeepSeek-V3, Qwen3-FP8): F8_E4M3 ``weight`` and an F32 ``weight_scale_inv``
    per ``block`` x ``block`` tile (the dequantized weight is ``weight * weight_scale_inv`` tile by tile)."""
    tensors, config = _save_float(model, path)
    for key in [k for k in tensors if k.endswith(".weight") and LINEARS.search(k.removesuffix(".weight"))]:
        w = tensors[key].float()
        rows, cols = w.shape
        tiles = w.reshape(rows // block, block, cols // block, block)
        scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
        q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        tensors[key] = q.reshape(rows, cols)
        tensors[key.removesuffix("weight") + "weight_scale_inv"] = scale.float()
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block], "modules_to_not_convert": None}
    return _write(path, tensors, config)


def save_compressed_fp8(model: Any, path: Path) -> Path:
    """compressed-tensors' ``float-quantized`` FP8 (llm-compressor's FP8_DYNAMIC): F8_E4M3 ``weight`` and a
    per-channel ``weight_scale``, written by compressed-tensors' own ``ModelCompressor``."""
    from compressed_tensors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationStatus, apply_quantization_config,
                                                 preset_name_to_scheme)

    model = model.to(torch.bfloat16)
    targets = [name for name, _ in model.named_modules() if LINEARS.search(name)]
    scheme = preset_name_to_scheme("FP8_DYNAMIC", targets=["Linear"])  # as releases do: every Linear but lm_head
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"],
                                 quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(model, qconfig)
    with torch.no_grad():  # the observer's job in llm-compressor: symmetric per-channel absmax
        for name, module in model.named_modules():
            if name in targets:
                amax = module.weight.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
                module.weight_scale.data.copy_((amax / FP8_MAX).to(module.weight_scale.dtype))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="float-quantized")
    compressor.compress_model(model)
    model.save_pretrained(str(path))
    compressor.update_config(str(path))
    return path
