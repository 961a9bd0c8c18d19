"""Tiny quantized bases for the tests: written by the library that defines each format where it runs on a CPU
(compressed-tensors' own ``ModelCompressor``), else in the format's published layout and proven real by
transformers loading them with its own quantizer (block FP8: transformers' ``fp8`` method dequantizes on a CPU).

Every builder takes a float transformers model (``tiny_model``) and writes a directory: config.json with the
release's ``quantization_config`` and model.safetensors with the quantized linears of the decoder layers (the
embedding, norms and output projection stay float, as releases keep them).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from helpers import perturb

_SPEC = importlib.util.spec_from_file_location(
    "make_quantized", Path(__file__).resolve().parents[1] / "examples" / "make_quantized.py")
MAKE_QUANTIZED = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(MAKE_QUANTIZED)
#: The decoder-layer linears every builder quantizes (module names).
LINEARS = MAKE_QUANTIZED.LINEARS
FP8_MAX = MAKE_QUANTIZED.FP8_MAX


def tiny_model(model_type: str, seed: int = 0, tie: bool = False) -> Any:
    """A tiny transformers model of ``model_type`` (width 64, 4 layers, ``tie``: output tied to the embedding),
    norms perturbed from one."""
    import transformers

    extra = {"head_dim": 24} if model_type == "qwen3" else {}
    config = transformers.AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(seed)
    return perturb(transformers.AutoModelForCausalLM.from_config(config).eval())


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
    per ``block`` x ``block`` tile, by ``examples/make_quantized.py``."""
    tensors, config = _save_float(model, path)
    config["quantization_config"] = MAKE_QUANTIZED.fp8_config(block)
    return _write(path, MAKE_QUANTIZED.block_fp8(tensors, block), config)


def save_compressed_fp8(model: Any, path: Path, activations: bool = True) -> Path:
    """compressed-tensors' ``float-quantized`` FP8 (llm-compressor's FP8_DYNAMIC; ``activations`` False: weights
    alone): F8_E4M3 ``weight`` and a per-channel ``weight_scale``, written by compressed-tensors' own
    ``ModelCompressor``."""
    from compressed_tensors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme, QuantizationStatus,
                                                 apply_quantization_config, preset_name_to_scheme)

    model = model.to(torch.bfloat16)
    targets = [name for name, _ in model.named_modules() if LINEARS.search(name)]
    scheme = preset_name_to_scheme("FP8_DYNAMIC", targets=["Linear"])  # as releases do: every Linear but lm_head
    if not activations:
        scheme = QuantizationScheme(targets=["Linear"], weights=scheme.weights)
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


def save_bnb_4bit(model: Any, path: Path) -> Path:
    """A bitsandbytes pre-quantized NF4 checkpoint, quantized and saved by transformers with bitsandbytes' CPU
    backend (packed U8 ``weight`` ``[n/2, 1]``, ``weight.absmax``, ``weight.quant_map``,
    ``weight.quant_state.bitsandbytes__nf4``)."""
    import transformers

    float_dir = path.with_name(path.name + "-float")
    model.to(torch.bfloat16).save_pretrained(str(float_dir))
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_compute_dtype=torch.bfloat16)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(str(float_dir), quantization_config=config,
                                                                  device_map="cpu")
    quantized.save_pretrained(str(path))
    return path


def save_mxfp4(model: Any, path: Path, seed: int = 0) -> Path:
    """gpt-oss's MXFP4 layout (its only release): each expert projection as ``*_blocks`` (U8, two E2M1 values a
    byte, ``[experts, rows, cols/32, 16]``) and ``*_scales`` (U8 E8M0 exponents, bias 127, one per 32 values),
    rows being the output features; random codes and exponents near one (the model's weights are random too)."""
    tensors, config = _save_float(model, path)
    gen = torch.Generator().manual_seed(seed)
    for key in [k for k in tensors if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))]:
        experts, cols, rows = tensors.pop(key).shape  # stored [experts, in, out]; blocks are [experts, out, in/32, 16]
        tensors[key + "_blocks"] = torch.randint(0, 256, (experts, rows, cols // 32, 16), dtype=torch.uint8,
                                                 generator=gen)
        tensors[key + "_scales"] = torch.randint(121, 125, (experts, rows, cols // 32), dtype=torch.uint8,
                                                 generator=gen)
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    return _write(path, tensors, config)


def _save_int_packed(model: Any, path: Path, bits: int, group: int, seed: int, *, along_output: bool,
                     g_idx: bool, quantization_config: dict[str, Any]) -> Path:
    """The GPTQ / AWQ layouts: per linear ``qweight`` I32 packed along the input (GPTQ, ``[in*bits/32, out]``) or
    the output (AWQ, ``[in, out*bits/32]``), ``qzeros`` I32 ``[in/group, out*bits/32]``, ``scales`` F16
    ``[in/group, out]`` and, with ``g_idx``, ``g_idx`` I32 ``[in]``; random codes (no kernel runs on this CPU
    to quantize with)."""
    tensors, config = _save_float(model, path)
    gen = torch.Generator().manual_seed(seed)
    per = 32 // bits
    for key in [k for k in tensors if k.endswith(".weight") and LINEARS.search(k.removesuffix(".weight"))]:
        out_f, in_f = tensors.pop(key).shape
        stem = key.removesuffix("weight")
        shape = (in_f, out_f // per) if along_output else (in_f // per, out_f)
        tensors[stem + "qweight"] = torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, generator=gen)
        tensors[stem + "qzeros"] = torch.full((in_f // group, out_f // per), 0x77777777, dtype=torch.int32)
        tensors[stem + "scales"] = (torch.rand(in_f // group, out_f, generator=gen) * 0.01).half()
        if g_idx:
            tensors[stem + "g_idx"] = torch.arange(in_f, dtype=torch.int32) // group
    config["quantization_config"] = quantization_config
    return _write(path, tensors, config)


def save_gptq(model: Any, path: Path, bits: int = 4, group: int = 32, seed: int = 0) -> Path:
    """The GPTQ layout (AutoGPTQ / GPTQModel ``checkpoint_format: gptq``): ``qweight`` packed along the input,
    with ``g_idx``."""
    return _save_int_packed(model, path, bits, group, seed, along_output=False, g_idx=True, quantization_config={
        "quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False, "sym": True,
        "checkpoint_format": "gptq", "damp_percent": 0.01})


def save_awq(model: Any, path: Path, bits: int = 4, group: int = 32, seed: int = 0) -> Path:
    """The AWQ layout (AutoAWQ ``version: gemm``, what transformers' AWQ quantizer reads): ``qweight`` packed
    along the output, no ``g_idx``."""
    return _save_int_packed(model, path, bits, group, seed, along_output=True, g_idx=False, quantization_config={
        "quant_method": "awq", "bits": bits, "group_size": group, "version": "gemm", "zero_point": True,
        "modules_to_not_convert": None})
