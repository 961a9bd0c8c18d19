"""Small checkpoints built in-process for the tests (random weights, fixed seeds)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5)

ARCHS: dict[str, dict[str, Any]] = {
    "llama": dict(TINY, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": dict(TINY, rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3": dict(TINY, head_dim=24, rope_theta=1000000.0),
    # Gemma: 1 + w norms, embeddings times sqrt(width), GeGLU, head_dim not width / heads, tied output
    "gemma": dict(TINY, head_dim=24, hidden_act="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10000.0,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # Phi-3: fused qkv_proj and gate_up_proj
    "phi3": dict(TINY, rope_theta=10000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "mistral": dict(TINY, rope_theta=1000000.0, sliding_window=5),  # a window shorter than the test sequences
    # SmolLM is a Llama with tied embeddings
    "smollm": dict(TINY, rope_theta=10000.0, tie_word_embeddings=True),
}
#: transformers model_type of each entry of ARCHS.
MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "phi3": "phi3",
              "mistral": "mistral", "smollm": "llama"}


def hf_model(arch: str, seed: int = 0, **overrides: Any):
    """A transformers model of family ``arch`` with random weights (norms perturbed from one)."""
    import transformers

    kwargs = dict(ARCHS[arch], **overrides)
    config = transformers.AutoConfig.for_model(MODEL_TYPE[arch], **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    return perturb(model, biases=True)


def perturb(model: Any, biases: bool = False) -> Any:
    """``model`` with its norm weights moved off one (and, with ``biases``, its biases off zero), so that a
    test comparing logits sees a wrong norm convention or a dropped bias; returns it."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if biases and name.endswith(".bias"):
                p.normal_(0, 0.05)
    return model


def save_hf(model, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    model.to(dtype).save_pretrained(str(path))
    return path


def save_sharded(model, path: Path, max_shard_size: str = "100KB") -> list[str]:
    """Save ``model`` as a sharded Hugging Face directory (index + several shards); the shard names."""
    model.save_pretrained(str(path), max_shard_size=max_shard_size)
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) > 1, "the model is too small to shard at this size"
    return shards


def make_base(tmp_path: Path, arch: str = "llama", dtype: torch.dtype = torch.float32, **overrides: Any) -> tuple[Path, Any]:
    """Save a transformers model to ``tmp_path/arch`` and return (path, model)."""
    model = hf_model(arch, **overrides)
    path = save_hf(model, tmp_path / f"{arch}-base", dtype)
    return path, model


def same_checkpoint(a: Path, b: Path) -> None:
    """The two checkpoints hold the same keys, dtypes, shapes and bytes."""
    from fusionsurgery.io.checkpoint import Checkpoint

    x, y = Checkpoint.open(a), Checkpoint.open(b)
    assert sorted(x.keys()) == sorted(y.keys())
    for key in x.keys():
        assert (x.info(key).dtype, x.info(key).shape) == (y.info(key).dtype, y.info(key).shape), key
        assert x.read_bytes(key) == y.read_bytes(key), key


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def tokens(batch: int = 2, seq: int = 12, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def open_gates(model: torch.nn.Module, value: float) -> None:
    """Set every fusion gate of ``model`` to ``value`` (``*_scale.scale`` in load_fused's modules,
    ``cross_attn_*_gate`` in a fusionsurgery.hf model)."""
    from fusionsurgery import get_fusion_params

    with torch.no_grad():
        for name, p in get_fusion_params(model).items():
            if name.endswith(("_scale.scale", "cross_attn_attn_gate", "cross_attn_mlp_gate")):
                p.fill_(value)


def tree_digest(path: Path) -> dict[str, str]:
    """Every file below (or at) ``path`` with its content hash: to prove nothing was touched."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """Run the CLI in-process; (exit code, stderr)."""
    from fusionsurgery.cli import main

    code = main(args)
    return code, capsys.readouterr().err


def error_lines(err: str) -> list[str]:
    """The ``error:`` lines of a command's stderr (progress notes on stderr are not errors)."""
    return [line for line in err.strip().splitlines() if line.startswith("error:")]


def assert_clean_failure(code: int, err: str, workdir: Path, expected: int = 2, contains: str = "") -> None:
    """Exit ``expected``, one ``error:`` line and no traceback, and no output or debris in ``workdir``."""
    assert code == expected, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    assert contains.lower() in err.lower(), err
    assert not [p for p in workdir.iterdir() if p.name.startswith(".") or p.name.endswith("-fused")]


#: A tiny Mllama whose text model has TINY's dimensions once its cross-attention layers (1 and 4) are set apart.
MLLAMA_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
                   num_key_value_heads=2, cross_attention_layers=[1, 4], max_position_embeddings=256,
                   rms_norm_eps=1e-5, pad_token_id=127, bos_token_id=1, eos_token_id=2)
MLLAMA_VISION = dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2, intermediate_size=48,
                     image_size=28, patch_size=14, max_num_tiles=2, intermediate_layers_indices=[0, 1],
                     vision_output_dim=96, supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])


def mllama_model(vision: bool, seed: int = 0, **text: Any):
    """A transformers Mllama (MllamaForConditionalGeneration with ``vision``, else MllamaForCausalLM) with random
    weights, norms perturbed from one and every cross-attention gate open (as in a trained model)."""
    import transformers
    # transformers 5.0 (the [hf] floor) does not export MllamaTextConfig at the top level; later releases do.
    from transformers.models.mllama.configuration_mllama import MllamaTextConfig

    text_config = dict(MLLAMA_TEXT, **text)
    torch.manual_seed(seed)
    if vision:
        config = transformers.MllamaConfig(text_config=text_config, vision_config=MLLAMA_VISION, image_token_index=126)
        model = transformers.MllamaForConditionalGeneration(config)
    else:
        model = transformers.MllamaForCausalLM(MllamaTextConfig(**text_config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_gate"):
                p.fill_(0.7)
            elif "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def image_inputs(batch: int = 2, seq: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for ``mllama_model(vision=True)``: tokens with an image token, two tiles, every tile visible."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 126, (batch, seq), generator=g)
    ids[:, 0] = 126
    tiles = MLLAMA_VISION["max_num_tiles"]
    return {"input_ids": ids, "pixel_values": torch.randn(batch, 1, tiles, 3, 28, 28, generator=g),
            "aspect_ratio_ids": torch.full((batch, 1), 2), "aspect_ratio_mask": torch.ones(batch, 1, tiles, dtype=torch.long),
            "cross_attention_mask": torch.ones(batch, seq, 1, tiles, dtype=torch.long)}


def train_losses(model: Any, ids: torch.Tensor, states: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    """AdamW over ``model``'s trainable parameters for ``steps`` steps on one batch; the losses, in train mode.

    Args:
        model: a ``fusionsurgery.hf`` model (or its PEFT wrapper) taking ``cross_attention_states`` and ``labels``.
        ids (torch.Tensor): token ids ``[b, s]``, also the labels.
        states (torch.Tensor): encoder states ``[b, s_enc, encoder_dim]``.
        steps (int): optimiser steps.
        lr (float): learning rate.

    Returns:
        list[float]: the loss before each step. The model is left in train mode.
    """
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, cross_attention_states=states, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses
