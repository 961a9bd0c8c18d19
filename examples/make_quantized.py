"""Write a block-FP8 copy of a float Llama-style checkpoint, in transformers' ``fp8`` layout (DeepSeek-V3,
Qwen3-FP8): each decoder-layer linear's ``weight`` as F8_E4M3 and a ``weight_scale_inv`` (F32) per
``block`` x ``block`` tile, config.json's ``quantization_config`` saying so. Embeddings, norms and the output
projection stay as they are, as those releases keep them. transformers reads the result with its own FP8
quantizer (dequantized to bf16 where no FP8 GPU runs it).

Usage:
    python examples/make_quantized.py examples/tiny-llama /tmp/tiny-fp8 --block 32
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

#: Decoder-layer linears (module names) that FP8 releases quantize.
LINEARS = re.compile(r"\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")
FP8_MAX = 448.0  # the largest float8_e4m3fn value


def block_fp8(tensors: dict[str, torch.Tensor], block: int) -> dict[str, torch.Tensor]:
    """``tensors`` with every decoder-layer linear's weight quantized to F8_E4M3 per ``block`` x ``block`` tile.

    Args:
        tensors: a float checkpoint's tensors (transformers' names).
        block: the tile size; it must divide every quantized weight's rows and columns.

    Returns:
        A new dict: ``weight`` F8_E4M3 and ``weight_scale_inv`` F32 ``[rows/block, cols/block]`` per linear
        (dequantized weight = ``weight * weight_scale_inv``, tile by tile); every other tensor as it was.

    Raises:
        ValueError: a weight whose shape the block does not divide.
    """
    out = dict(tensors)
    for key in [k for k in tensors if k.endswith(".weight") and LINEARS.search(k.removesuffix(".weight"))]:
        w = tensors[key].float()
        rows, cols = w.shape
        if rows % block or cols % block:
            raise ValueError(f"{key} is {rows}x{cols}, which {block}x{block} blocks do not tile")
        tiles = w.reshape(rows // block, block, cols // block, block)
        scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
        out[key] = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).reshape(rows, cols)
        out[key.removesuffix("weight") + "weight_scale_inv"] = scale.float()
    return out


def fp8_config(block: int) -> dict:
    """The ``quantization_config`` of transformers' ``fp8`` method for ``block`` x ``block`` tiles."""
    return {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [block, block],
            "modules_to_not_convert": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a float checkpoint directory (model.safetensors, config.json)")
    parser.add_argument("out", type=Path, help="the directory to write")
    parser.add_argument("--block", type=int, default=128, help="tile size (default 128, the releases')")
    args = parser.parse_args()
    tensors = block_fp8(load_file(str(args.source / "model.safetensors")), args.block)
    config = json.loads((args.source / "config.json").read_text())
    config["quantization_config"] = fp8_config(args.block)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(args.out / "model.safetensors"),
              metadata={"format": "pt"})
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for extra in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (args.source / extra).exists():
            shutil.copy(args.source / extra, args.out / extra)
    print(f"wrote {args.out}: block FP8 ({args.block}x{args.block})")


if __name__ == "__main__":
    main()
