"""What a config cannot tell: per ``model_type`` overrides, and the types with native modules.

The surgery reads any decoder from its tensors and its config's own fields (``fields.py``,
``discovery.py``); this table only holds the facts no config field states. ``MODEL_TYPES`` are the
types the project re-implements (``fusionsurgery.modules``): their forward runs without
transformers and their tensors are checked against the Llama recipe. Every other type is wrapped
as it is, its forward left to transformers (``fusionsurgery.hf``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelType:
    """A type the native modules implement: one row per architecture.

    Every field is a small, general switch of the modules (see ``builders.py``); a new variant of the
    Llama recipe is a new row here (plus naming rows in ``families.py`` if it spells tensors differently).
    """

    architecture: str  # the transformers class that reads it
    norm_offset: float = 0.0  # RMSNorm multiplies by (offset + weight): Gemma stores w for a scale of 1 + w
    norm_fp32_scale: bool = False  # multiply by the scale in fp32, then cast (Gemma) instead of cast then multiply
    embed_scale_sqrt_dim: bool = False  # token embeddings times sqrt(width) (Gemma)
    fused_qkv: bool = False  # one self_attn.qkv_proj holding q, k, v rows (Phi-3)
    fused_gate_up: bool = False  # one mlp.gate_up_proj holding gate then up rows (Phi-3)
    activation_keys: tuple[str, ...] = ("hidden_act",)  # config keys naming the MLP activation, first set wins
    default_activation: str = "silu"
    default_norm_eps: float = 1e-6
    default_theta: float = 10000.0
    sliding_window_flag: str | None = None  # config key that must be true for ``sliding_window`` to apply
    #: The RoPE layout of torchtune's builder for this type, which its torchtune-named q/k rows follow:
    #: ``interleaved`` where torchtune's hf->tune conversion permutes q/k (Llama, Mistral, Gemma),
    #: ``half`` where its builder rotates halves and the conversion keeps the rows (Qwen2, Qwen3, Phi-3).
    torchtune_rope: str = "interleaved"


#: Hugging Face ``model_type`` values the native modules implement.
MODEL_TYPES: dict[str, ModelType] = {
    "llama": ModelType("LlamaForCausalLM"),
    "mistral": ModelType("MistralForCausalLM"),
    "qwen2": ModelType("Qwen2ForCausalLM", sliding_window_flag="use_sliding_window", torchtune_rope="half"),
    "qwen3": ModelType("Qwen3ForCausalLM", sliding_window_flag="use_sliding_window", torchtune_rope="half"),
    "gemma": ModelType("GemmaForCausalLM", norm_offset=1.0, norm_fp32_scale=True, embed_scale_sqrt_dim=True,
                       activation_keys=("hidden_activation", "hidden_act"), default_activation="gelu_pytorch_tanh"),
    "phi3": ModelType("Phi3ForCausalLM", fused_qkv=True, fused_gate_up=True, default_norm_eps=1e-5,
                      torchtune_rope="half"),
}
#: ``model_type`` -> the class name transformers uses (native types).
SUPPORTED_MODEL_TYPES: dict[str, str] = {k: v.architecture for k, v in MODEL_TYPES.items()}
#: MLP activations the fusion block (and the native modules) implement (``modules/mlp.py``).
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")
#: Other spellings of those activations in transformers configs.
ACTIVATION_ALIASES = {"swish": "silu", "gelu_new": "gelu_pytorch_tanh", "gelu_fast": "gelu_pytorch_tanh"}

#: Types whose RMSNorm scales by ``1 + w`` (weights stored as offsets from one, computed in fp32):
#: checked against each family's RMSNorm in transformers. (Gemma 3n and Gemma 4 scale by ``w``.)
ONE_PLUS_W_NORM_TYPES = frozenset({
    "gemma", "gemma2", "gemma3", "gemma3_text", "recurrent_gemma", "vaultgemma",
    "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next", "qwen4_exp", "qwen4_exp_text",
})


#: The naming family whose names never fuse projections: torchtune splits Phi-3's ``qkv_proj`` into
#: ``q_proj``/``k_proj``/``v_proj`` and its ``gate_up_proj`` into ``w1``/``w3``.
SPLIT_NAMING = "torchtune"


@dataclass(frozen=True)
class TorchtuneNames:
    """torchtune's names for a type torchtune builds that the native modules do not implement.

    Such a type is read like any decoder (its forward is transformers'); its torchtune export renames
    it by these rows. Canonical names are torchtune's, so each row is canonical -> Hugging Face name.
    ``layer`` lists every tensor of one decoder layer (each layer holds them all); ``globals`` the
    tensors outside the layers besides the token embedding (``output.weight`` only when untied).
    """

    layer: dict[str, str]  # canonical (torchtune) suffix -> Hugging Face suffix, under a layer prefix
    globals: dict[str, str]  # canonical (torchtune) key -> Hugging Face key, outside the layers
    rope: str = "interleaved"  # the RoPE layout of torchtune's builder, which its q/k rows follow
    hf_layer_prefix: str = "model.layers"  # where transformers numbers the layers of this type
    hf_embedding_key: str = "model.embed_tokens.weight"
    #: What the export tells a torchtune user whatever the config says (naming facts the rows cannot show).
    notes: tuple[str, ...] = ()
    #: config.json key -> what its value means for torchtune's builder (``{value}`` stands for it).
    settings: dict[str, str] = field(default_factory=dict)
    #: config.json key -> what its absence (or null) means for torchtune's builder.
    unset: dict[str, str] = field(default_factory=dict)


#: Types torchtune builds beyond the native ones (checked against torchtune's builders and converters).
#: Gemma 2: four norms per layer and a final norm under ``norm.rms_norm`` (torchtune wraps it to cap
#: the hidden state). The feed-forward norms follow what torchtune's ``TransformerSelfAttentionLayer``
#: applies (``mlp_norm`` before the MLP, ``mlp_scale`` after), as torchtune's converter does since its
#: 0.6.1 release swapped them.
TORCHTUNE_NAMES: dict[str, TorchtuneNames] = {
    "gemma2": TorchtuneNames(
        layer={"attn.q_proj.weight": "self_attn.q_proj.weight", "attn.k_proj.weight": "self_attn.k_proj.weight",
               "attn.v_proj.weight": "self_attn.v_proj.weight", "attn.output_proj.weight": "self_attn.o_proj.weight",
               "mlp.w1.weight": "mlp.gate_proj.weight", "mlp.w3.weight": "mlp.up_proj.weight",
               "mlp.w2.weight": "mlp.down_proj.weight",
               "sa_norm.scale": "input_layernorm.weight", "sa_scale.scale": "post_attention_layernorm.weight",
               "mlp_norm.scale": "pre_feedforward_layernorm.weight",
               "mlp_scale.scale": "post_feedforward_layernorm.weight"},
        globals={"norm.rms_norm.scale": "model.norm.weight", "output.weight": "lm_head.weight"},
        notes=(
            "post_attention_layernorm -> sa_scale.scale (applied to the attention output), pre_feedforward_layernorm "
            "-> mlp_norm.scale (before the MLP), post_feedforward_layernorm -> mlp_scale.scale (after it), as "
            "torchtune's TransformerSelfAttentionLayer applies them and its main-branch converter names them; "
            "torchtune 0.6.1's own gemma2 converter swaps the two feed-forward norms, so convert back with "
            "`fusionsurgery export --to hf`, not with that converter",
            "the final norm is norm.rms_norm.scale (torchtune's Gemma2FinalNorm wraps the RMSNorm with a capping)",
        ),
        settings={
            "sliding_window": "layers 0, 2, 4, ... attend within a sliding window of {value} tokens (torchtune's "
                              "gemma2 sliding_window_size; it slides on the same even layers)",
            "attn_logit_softcapping": "attention scores are soft-capped at {value} (tanh; torchtune's "
                                      "hidden_capping_value)",
            "final_logit_softcapping": "transformers soft-caps the final logits at {value}; torchtune's "
                                       "final_capping_value caps the normed hidden state instead (before the output "
                                       "projection), so the two differ unless the cap is far above both",
            "query_pre_attn_scalar": "attention scores are scaled by {value}^-0.5, not head_dim^-0.5 (torchtune's "
                                     "query_pre_attn_scalar)",
        },
        unset={
            "final_logit_softcapping": "transformers does not cap the final logits here, while torchtune's gemma2 "
                                       "always caps the normed hidden state (final_capping_value, default 30): build "
                                       "it with a cap far above the hidden state's range",
        },
    ),
}


def rope_layout_of(family: str, family_layout: str, model_type: str) -> str:
    """The RoPE layout the q/k rows of a ``model_type`` checkpoint in naming ``family`` follow.

    Args:
        family: the naming family (``hf``, ``torchtune``, ``generic``).
        family_layout: that family's own layout (``Family.rope_layout``).
        model_type: the config's ``model_type``.

    Returns:
        str: ``"half"`` or ``"interleaved"``: per type in torchtune's names (its builders differ), else the family's.
    """
    if family == SPLIT_NAMING and model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type].torchtune_rope
    return family_layout


def fused_projections(family: str, model_type: str) -> tuple[bool, bool]:
    """(fused qkv, fused gate/up) of a ``model_type`` checkpoint in naming ``family``: the type's own
    layout (Phi-3 fuses both) except in torchtune's names, which never fuse."""
    if family == SPLIT_NAMING or model_type not in MODEL_TYPES:
        return False, False
    mt = MODEL_TYPES[model_type]
    return mt.fused_qkv, mt.fused_gate_up


def is_native(model_type: str | None) -> bool:
    """Whether the native modules implement ``model_type``."""
    return model_type in MODEL_TYPES


def norm_offset_of(model_type: str) -> float:
    """The fusion block's norm convention for ``model_type``: 1.0 for ``x * (1 + w)``, 0.0 for ``x * w``."""
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type].norm_offset
    return 1.0 if model_type in ONE_PLUS_W_NORM_TYPES else 0.0
