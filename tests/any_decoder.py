"""Tiny checkpoints of any transformers decoder type, built and saved by transformers in the test.

Shared by the surgery tests (``test_any_decoder_surgery.py``) and the forward tests
(``test_any_decoder_forward.py``). Each model type gets a tiny config (2-4 layers, width 64,
vocabulary 128) from :data:`TINY` plus the overrides in :data:`OVERRIDES` that its config needs to
stay small (expert counts, linear-attention head sizes, per-layer embedding tables ...). Weights are
random with a fixed seed; norms and biases are perturbed away from their init so that a wrong
norm convention or a dropped bias shows in the logits.

Example:
    >>> from any_decoder import save_tiny   # (tests/ is on sys.path under pytest)
    >>> path = save_tiny("gemma3_text", tmp_path / "g3")   # config.json + model.safetensors
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from fusionsurgery._requirements import type_floor_problem

#: Sizes every type starts from (names transformers configs accept; ``attribute_map`` maps the
#: GPT-2 style spellings).
TINY: dict[str, Any] = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)

#: Per type: what its config needs beyond :data:`TINY` to build tiny.
OVERRIDES: dict[str, dict[str, Any]] = {
    "gemma2": {},
    "gemma3_text": {"sliding_window": 4},
    "gemma4_text": {"vocab_size_per_layer_input": 128, "hidden_size_per_layer_input": 8, "sliding_window": 4,
                    "num_kv_shared_layers": 0, "global_head_dim": 16},
    "qwen3_5_text": {"linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2,
                     "linear_num_value_heads": 4},
    "llama4_text": {"intermediate_size_mlp": 96, "num_local_experts": 2, "attention_chunk_size": 8},
    "smollm3": {},
    "olmo2": {},
    "olmo3": {"sliding_window": 4},
    "granite": {},
    "cohere2": {"sliding_window": 4},
    "starcoder2": {},
    "phi": {},
    "stablelm": {},
    "mixtral": {"num_local_experts": 4},
    "qwen3_moe": {"moe_intermediate_size": 32, "num_experts": 4, "num_local_experts": 4, "num_experts_per_tok": 2},
    "gpt_oss": {"num_local_experts": 4, "sliding_window": 4,
                "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                    "truncate": False, "original_max_position_embeddings": 64,
                                    "rope_theta": 150000.0}},
    "deepseek_v3": {"moe_intermediate_size": 32, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1,
                    "topk_group": 1, "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 8, "v_head_dim": 16, "first_k_dense_replace": 1, "num_key_value_heads": 4,
                    "head_dim": 8},
    "glm4": {},
    "ministral": {},
    "ministral3": {},
    "gpt_neox": {"rotary_pct": 0.5},
    "gpt2": {"n_positions": 256, "n_inner": 96},
    "falcon_h1": {"mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_d_state": 8, "mamba_chunk_size": 8,
                  "mamba_n_groups": 1},
    "lfm2": {"block_ff_dim": 96, "block_auto_adjust_ff_dim": False},
}

#: The types issue 20 names, in its order.
REQUIRED: list[str] = list(OVERRIDES)

#: Further decoder-only types of transformers' causal-LM mapping that build tiny from :data:`TINY` alone
#: (the native six, encoders, encoder-decoders and types whose defaults build gigabytes are left out).
EXTRA: dict[str, dict[str, Any]] = {t: {} for t in (
    "apertus", "apertus1p5_text", "arcee", "aria_text", "biogpt", "bitnet", "bloom", "cohere", "cohere2_moe", "cwm",
    "diffllama", "doge", "ernie4_5", "exaone", "exaone4", "falcon_mamba", "flex_olmo", "gemma4_unified_text", "glm",
    "gpt-sw3", "gpt_bigcode", "gpt_neox_japanese", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared",
    "helium", "hunyuan_v1_dense", "hunyuan_v1_moe", "hyperclovax", "internlm3", "iquestcoder", "jais2", "jetmoe",
    "lfm3", "mamba", "minimax", "modernbert-decoder", "mpt", "nanochat", "nemotron", "olmo", "olmo_hybrid",
    "openai-gpt", "opt", "persimmon", "phimoe", "recurrent_gemma", "rwkv", "seed_oss", "vaultgemma", "xglm",
    # the embedding under another name (CPM-Ant's input_embedding, CTRL's w) or narrower / wider than the
    # width (ELECTRA, RemBERT: factorised, projected by the base); no layer count but a per-layer list
    # (Nemotron-H); a decoder whose own config spells its sizes decoder_* (TrOCR)
    "cpmant", "ctrl", "electra", "rembert", "nemotron_h", "trocr",
)}
# BERT-style layers (ELECTRA, RemBERT) attend causally only when told they are a decoder
EXTRA.update({t: {"is_decoder": True} for t in ("electra", "rembert")})
#: Types that build tiny but have no single numbered layer list the surgery could wrap: type -> why.
REFUSED: dict[str, str] = {
    "dory": "its config counts 8 layers where the tensors number 4 blocks",
    "hrm_text": "two layer stacks (H and L modules), neither of the config's layer count",
    "xlm": "its layers are not modules: attention, FFN and both norms are four parallel numbered lists",
}
#: What the refusal of each REFUSED type says (default: no layer list of the config's count).
REFUSAL_WORDS: dict[str, str] = {"xlm": "not modules but 4 parallel numbered lists"}

#: Every type the suites run over.
ALL_TYPES: list[str] = REQUIRED + [t for t in EXTRA if t not in OVERRIDES]


def overrides(model_type: str) -> dict[str, Any]:
    """The config keywords of ``model_type``: :data:`TINY` plus its overrides."""
    extra = OVERRIDES.get(model_type, EXTRA.get(model_type, {}))
    return dict(TINY, **extra)


def missing_reason(model_type: str) -> str | None:
    """Why ``model_type`` cannot be built here (transformers missing, or older than the type needs:
    ``fusionsurgery._requirements.TRANSFORMERS_FOR_TYPE``), else None."""
    try:
        import transformers
    except ImportError:
        return "transformers is not installed (pip install 'fusionsurgery[hf]')"
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return f"transformers {transformers.__version__} has no causal LM for model type {model_type!r}"
    # the library's own table of types that need a newer release than the [hf] floor (fusionsurgery.hf refuses them)
    return type_floor_problem(model_type, transformers.__version__)


def type_params(types: list[str] | None = None) -> list[Any]:
    """``pytest.param`` per model type, skipped with a reason where it cannot be built."""
    params = []
    for model_type in ALL_TYPES if types is None else types:
        reason = missing_reason(model_type)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(model_type, id=model_type, marks=marks))
    return params


def _is_norm(name: str) -> bool:
    """Whether parameter ``name`` belongs to a norm (``*norm*``, GPT-2's ``ln_1`` / ``ln_f``)."""
    return any("norm" in part or part.startswith("ln_") for part in name.split("."))


def build_config(model_type: str, **extra: Any):
    """The tiny transformers config of ``model_type`` (``extra`` overrides any field)."""
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoConfig.for_model(model_type, **dict(overrides(model_type), **extra))


def build_model(model_type: str, seed: int = 0, **extra: Any) -> torch.nn.Module:
    """A tiny transformers causal LM of ``model_type`` with seeded random weights, in eval mode.

    Args:
        model_type (str): a transformers ``model_type`` (``"gemma3_text"``, ``"gpt2"`` ...).
        seed (int): the seed of the weights.
        **extra: config fields overriding the tiny defaults.

    Returns:
        torch.nn.Module: the model (fp32). Norm weights and biases are perturbed from their init.
    """
    import transformers

    config = build_config(model_type, **extra)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if _is_norm(name):
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith(".bias"):
                p.normal_(0, 0.05)
    return model


def save_tiny(model_type: str, path: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
              **extra: Any) -> Path:
    """Build a tiny ``model_type`` and save it with ``save_pretrained`` at ``path``.

    Args:
        model_type (str): a transformers ``model_type``.
        path (Path): the directory to write (config.json + model.safetensors).
        seed (int): the seed of the weights.
        dtype (torch.dtype): the dtype of the saved tensors (fp32 or bf16).
        **extra: config fields overriding the tiny defaults.

    Returns:
        Path: ``path``.
    """
    reason = missing_reason(model_type)
    if reason is not None:
        pytest.skip(reason)
    model = build_model(model_type, seed=seed, **extra)
    model.to(dtype).save_pretrained(str(path))
    return path
