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
    # built tiny once every sub-config is shrunk (issue 29): a multimodal wrapper of the causal-LM mapping
    # (Gemma 3 4B-27B, its vision tower as deep as the decoder), experts, latent attention, hybrids
    "gemma3", "qwen3_5", "llama4", "qwen2_moe", "qwen3_next", "deepseek_v2", "glm4_moe", "ernie4_5_moe",
    "exaone_moe", "jamba", "falcon", "gptj",
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

#: Multimodal wrappers (a text decoder beside a vision tower, built as deep as it) of the causal-LM
#: mapping (Gemma 3 4B-27B, Qwen3.5, Llama 4) and of the image-text-to-text mapping, which
#: ``fusionsurgery.hf`` opens as their own ``*ForConditionalGeneration`` (``test_multimodal_wrappers.py``).
WRAPPERS: list[str] = ["gemma3", "qwen3_5", "llama4", "mistral3", "qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm",
                       "llava", "internvl", "aya_vision"]

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
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    if model_type not in CONFIG_MAPPING_NAMES or (model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and
                                                  model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES):
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


#: Sizes of every sub-config that is not the text decoder's (vision, audio, projector ... towers):
#: narrower than the text model, as deep (a tower as deep as the decoder is the case that tells
#: whether the surgery finds the decoder by the config's text part).
TOWER: dict[str, int] = dict(width=32, intermediate=64, heads=2, head_dim=16)
#: Sub-configs that hold the text decoder's fields (as ``fusionsurgery.arch.fields.NESTED``).
TEXT_PARTS = ("text_config", "language_config", "llm_config")
#: Field names by what they size, shrunk wherever they appear (any sub-config, any nesting).
WIDTHS = ("hidden_size", "d_model", "embed_dim", "n_embd", "width", "hidden_dim", "model_dim")
INTERMEDIATES = ("intermediate_size", "ffn_dim", "mlp_dim", "n_inner", "ffn_hidden_size", "encoder_ffn_dim",
                 "decoder_ffn_dim", "intermediate_size_mlp")
DEPTHS = ("num_hidden_layers", "depth", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers")
HEADS = ("num_attention_heads", "num_heads", "n_head", "n_heads", "attention_heads", "encoder_attention_heads",
         "decoder_attention_heads")
KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num")
#: Further fields: the largest value each may keep (experts, latent-attention ranks, linear-attention
#: and state-space sizes, per-layer inputs, rotary sizes ...).
AT_MOST: dict[str, int] = {
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "num_experts_per_tok": 2,
    "moe_k": 2, "moe_topk": 2, "num_experts_per_token": 2, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "expert_intermediate_size": 32, "moe_ffn_hidden_size": 32,
    "n_shared_experts": 1, "num_shared_experts": 1, "moe_num_shared_experts": 1, "n_group": 1, "topk_group": 1,
    "num_group": 1, "num_expert_group": 1,
    "first_k_dense_replace": 1, "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 16, "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_d_state": 8,
    "mamba_chunk_size": 8, "mamba_n_groups": 1, "ssm_state_size": 8, "state_size": 8, "d_state": 8,
    "chunk_size": 8, "n_groups": 1, "mamba_dt_rank": 8, "time_step_rank": 8, "mamba_num_heads": 4,
    "mamba_head_dim": 8, "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 128, "rotary_dim": 8,
    "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1,
    "full_attention_interval": 2, "global_head_dim": 16, "max_position_embeddings": 256, "attention_chunk_size": 8,
    "projection_dim": 32, "num_mel_bins": 16, "encoder_hidden_size": 32, "vision_output_dim": 32,
    "out_hidden_size": 64, "projector_output_dim": 64,
}
#: Per-layer lists: cut to the layer count, keeping every kind of layer the full list has.
LAYER_LISTS = ("layer_types", "layers_block_type", "block_types", "hybrid_override_pattern", "layers_type")


def _shrink(doc: dict[str, Any], sizes: dict[str, int], depth: int, text: bool) -> dict[str, Any]:
    """The fields of ``doc`` (a config as a dict) to change to make it tiny, sub-configs recursively.

    Only changed fields: what the config derives from them (per-layer patterns, head sizes) the config
    derives again. The text part (``text``) takes :data:`TINY`'s sizes; any other sub-config
    :data:`TOWER`'s, at the text depth ``depth``.
    """
    out: dict[str, Any] = {}
    old_depth = next((doc[k] for k in DEPTHS if isinstance(doc.get(k), int) and not isinstance(doc[k], bool)), None)
    for key, value in doc.items():
        new: Any = value
        if isinstance(value, dict) and key not in ("rope_parameters", "rope_scaling", "attn_config", "ffn_config",
                                                   "id2label", "label2id", "quantization_config"):
            if value and all(str(k).isdigit() for k in value):  # per-layer settings keyed by layer index:
                new = {k: v for k, v in value.items() if int(k) < depth}
                if not new:
                    continue  # none within the depth: derived from the layer count again (Gemma 4's global layers)
            else:
                is_text = key in TEXT_PARTS
                new = _shrink(value, TEXT_SIZES if is_text else TOWER_SIZES, depth, is_text)
                if new:
                    out[key] = dict(value, **new) if not is_text else new
                continue
        elif value is None and key.startswith("attn_layer_ind"):  # a hybrid's attention layers: one, the last
            new = [depth - 1]
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, dict) and isinstance(value.get("mrope_section"), list):
            new = dict(value, mrope_section=_sections(value["mrope_section"], sizes["head_dim"] // 2))
        elif isinstance(value, int):
            if key in WIDTHS:
                new = sizes["width"]
            elif key in INTERMEDIATES:
                new = sizes["intermediate"]
            elif key in DEPTHS:
                new = depth
            elif key in HEADS:
                new = sizes["heads"]
            elif key in KV_HEADS:
                new = min(value, sizes["kv_heads"])
            elif key == "head_dim":
                new = sizes["head_dim"]
            elif key in AT_MOST:
                new = min(value, AT_MOST[key])
            elif key == "text_hidden_size":  # a tower's projection into the text width
                new = TINY["hidden_size"]
            elif key == "image_size" and isinstance(doc.get("patch_size"), int):
                new = doc["patch_size"] * 4
        elif (isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
              and "layer" in key and ("ind" in key or "idx" in key)):  # indices of layers of a kind
            new = [v for v in value if v < depth] or [depth - 1]
        elif isinstance(value, list) and key in LAYER_LISTS and value and len(value) != depth:
            new = _cut_layer_list(value, depth)
        elif isinstance(value, list) and key in HEADS + DEPTHS and value and all(isinstance(v, int) for v in value):
            new = [sizes["heads"] if key in HEADS else 1 for _ in value]  # per-stage heads / depths
        elif isinstance(value, list) and old_depth is not None and len(value) == old_depth != depth:
            new = value[:depth]  # other per-layer lists (head counts per layer ...)
        if new != value:
            out[key] = new
    if any(isinstance(doc.get(k), int) for k in ("moe_intermediate_size", "moe_num_experts")):
        for key in ("n_routed_experts", "num_experts", "num_local_experts", "n_shared_experts"):  # counts left unset
            if key in doc and doc[key] is None:
                out[key] = doc[key] = AT_MOST[key]
    if "num_experts_per_tok" in doc and doc["num_experts_per_tok"] is None and any(
            isinstance(doc.get(k), int) for k in ("n_routed_experts", "num_experts", "num_local_experts")):
        out["num_experts_per_tok"] = AT_MOST["num_experts_per_tok"]  # a router left without its top-k
    return out


def _sections(sections: list[int], total: int) -> list[int]:
    """``sections`` (multimodal RoPE's split of the rotary half: time, height, width) scaled to sum to ``total``."""
    whole = sum(sections)
    out = [max(1, v * total // whole) for v in sections]
    out[0] += total - sum(out)
    return out


def _cut_layer_list(kinds: list[Any], depth: int) -> list[Any]:
    """The first ``depth`` entries of a per-layer list, its last ones replaced by kinds the cut lost."""
    if isinstance(kinds, str):
        return kinds[:depth]
    cut = list(kinds[:depth])
    lost = [k for k in dict.fromkeys(kinds) if k not in cut]
    for i, kind in enumerate(lost[:depth]):
        cut[depth - 1 - i] = kind
    return cut


TEXT_SIZES = dict(width=TINY["hidden_size"], intermediate=TINY["intermediate_size"],
                  heads=TINY["num_attention_heads"], kv_heads=TINY["num_key_value_heads"], head_dim=TINY["head_dim"])
TOWER_SIZES = dict(width=TOWER["width"], intermediate=TOWER["intermediate"], heads=TOWER["heads"],
                   kv_heads=TOWER["heads"], head_dim=TOWER["head_dim"])
#: Top-level fields of ``to_dict()`` that are not constructor arguments.
_NOT_ARGUMENTS = ("model_type", "transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype")


def tiny_fields(model_type: str) -> dict[str, Any]:
    """The config keywords of a tiny ``model_type``: every size of its default config shrunk, in every
    sub-config (text, vision, audio ...), then :data:`TINY` and its :data:`OVERRIDES` on the text part."""
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            doc = transformers.AutoConfig.for_model(model_type).to_dict()
        except Exception:  # noqa: BLE001 - defaults that do not validate alone: start from the tiny sizes
            doc = transformers.AutoConfig.for_model(model_type, **TINY).to_dict()
    depth = TINY["num_hidden_layers"]
    text = next((k for k in TEXT_PARTS if isinstance(doc.get(k), dict)), None)
    shrunk = _shrink(doc, TEXT_SIZES if text is None else TOWER_SIZES, depth, text is None)
    for key in _NOT_ARGUMENTS:
        shrunk.pop(key, None)
    part = doc if text is None else doc[text]
    mine = dict(overrides(model_type))
    if part.get("is_decoder") is False:
        # a BERT-style stack is a causal decoder only when told (transformers' own *LMHeadModel asks for it)
        mine.setdefault("is_decoder", True)
    if isinstance(part.get("qk_rope_head_dim"), int) and model_type not in OVERRIDES:
        # latent attention: the rotary part of a head (head_dim x partial_rotary_factor) is qk_rope_head_dim
        # wide, and every query head has its own key/value head
        rope = part.get("rope_parameters") if isinstance(part.get("rope_parameters"), dict) else {}
        factor = rope.get("partial_rotary_factor", part.get("partial_rotary_factor")) or 1.0
        mine.update(head_dim=int(AT_MOST["qk_rope_head_dim"] / factor), num_key_value_heads=TINY["num_attention_heads"])
    if model_type not in OVERRIDES:
        expand = part.get("mamba_expand", part.get("expand"))
        heads, head = (("mamba_n_heads", "mamba_d_head") if "mamba_d_head" in part else ("num_heads", "head_dim"))
        if isinstance(expand, int) and isinstance(part.get(heads), int) and heads in part and (
                "mamba_d_head" in part or model_type.startswith("mamba")):
            # a state-space mixer's heads split the expanded width: heads x head size = expand x width
            count = AT_MOST.get(heads, TINY["num_attention_heads"])
            mine[heads], mine[head] = count, expand * TINY["hidden_size"] // count
    rope = part.get("rope_parameters")
    types = (model_type, part.get("model_type"))
    if isinstance(rope, dict) and ("rope_type" in rope or "rope_theta" in rope) and any(
            isinstance(t, str) and _modeling_mentions(t, "mrope_section") for t in types):
        # multimodal RoPE splits the rotary half of each head (partial_rotary_factor of it); its code's
        # default split fits the big head
        factor = rope.get("partial_rotary_factor", part.get("partial_rotary_factor")) or 1.0
        half = int(mine.get("head_dim", TINY["head_dim"]) * factor) // 2
        (shrunk if text is None else shrunk.setdefault(text, {}))["rope_parameters"] = dict(
            rope, mrope_section=_sections(rope.get("mrope_section") or [16, 24, 24], half))
    if text is None:
        return dict(shrunk, **mine)
    shrunk[text] = dict(shrunk.get(text, {}), **mine)
    return shrunk


def _modeling_mentions(model_type: str, word: str) -> bool:
    """Whether transformers' modeling code of ``model_type`` mentions ``word``."""
    import importlib

    from transformers.models.auto.configuration_auto import model_type_to_module_name

    name = model_type_to_module_name(model_type)
    try:
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    except ImportError:
        return False
    return word in Path(module.__file__).read_text()


def build_config(model_type: str, **extra: Any):
    """The tiny transformers config of ``model_type`` (``extra`` overrides any field of the text part,
    or of the top level for a wrapper's own fields)."""
    import transformers

    fields = tiny_fields(model_type)
    text = next((k for k in TEXT_PARTS if isinstance(fields.get(k), dict)), None)
    for key, value in extra.items():
        if text is not None and key in fields[text]:
            fields[text][key] = value
        else:
            fields[key] = value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(8):
            try:
                return transformers.AutoConfig.for_model(model_type, **fields)
            except AttributeError as exc:  # a derived field (Falcon's head_dim) is a read-only property
                name = _read_only(exc)
                if name is None or name not in fields:
                    raise
                fields.pop(name)
        return transformers.AutoConfig.for_model(model_type, **fields)


def _read_only(exc: AttributeError) -> str | None:
    import re

    m = re.search(r"property '(\w+)' of '\w+' object has no setter", str(exc))
    return m.group(1) if m else None


def auto_class(model_type: str, wrapper: bool = False) -> type:
    """transformers' auto class that builds ``model_type``: the causal LM of its mapping, or the multimodal
    wrapper (image-text-to-text: its ``*ForConditionalGeneration``, with its towers) when ``wrapper`` is
    asked for or the causal-LM mapping leaves the type out (Mistral 3, Qwen2.5-VL ...)."""
    import transformers
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not (
            wrapper and model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES):
        return transformers.AutoModelForCausalLM
    return transformers.AutoModelForImageTextToText


def instantiate(model_type: str, config: Any, wrapper: bool = False) -> torch.nn.Module:
    """``auto_class(model_type, wrapper).from_config(config)``; where the auto class does not take the
    config (Mllama's and Emu3's composite configs: the causal LM reads their text config), the class
    the causal-LM mapping names, built from the config it takes."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        return auto_class(model_type, wrapper).from_config(config)
    except ValueError as exc:
        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        if "Unrecognized configuration class" not in str(exc) or wrapper or not hasattr(transformers, name or "?"):
            raise
    cls = getattr(transformers, name)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return cls._from_config(text if isinstance(text, cls.config_class) else config)


def text_ids(config: Any, n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """``[batch, n]`` token ids of plain text: below the text vocabulary and 100, none a special token the
    config names (a wrapper's image token would ask for pixel values)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = int(getattr(text, "vocab_size", None) or 128)
    special: set[int] = set()
    for part in (config, text):
        for key, value in part.to_dict().items():
            if key.endswith(("_id", "_index", "_ids")) and value is not None:
                special.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
    pool = torch.tensor([i for i in range(3, min(vocab, 100)) if i not in special])
    g = torch.Generator().manual_seed(seed)
    return pool[torch.randint(0, len(pool), (batch, n), generator=g)]


def build_model(model_type: str, seed: int = 0, wrapper: bool = False, **extra: Any) -> torch.nn.Module:
    """A tiny transformers causal LM of ``model_type`` with seeded random weights, in eval mode.

    Args:
        model_type (str): a transformers ``model_type`` (``"gemma3_text"``, ``"gpt2"`` ...).
        seed (int): the seed of the weights.
        wrapper (bool): build the multimodal wrapper (``auto_class``), towers and all.
        **extra: config fields overriding the tiny defaults.

    Returns:
        torch.nn.Module: the model (fp32). Norm weights and biases are perturbed from their init.
    """
    import transformers

    config = build_config(model_type, **extra)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = instantiate(model_type, config, wrapper).eval()
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
