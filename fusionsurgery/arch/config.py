"""The model description: read from ``config.json`` or inferred from tensor shapes.

``ModelConfig`` holds what building the decoder needs; ``FusionConfig`` what fusion added. Both
round-trip through the ``config.json`` that ``fuse`` writes (the base's config plus a ``fusion``
section). Nothing here imports torch.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import CheckpointError, UsageError
from ..io.checkpoint import Checkpoint
from ..io.manifest_schema import is_int
from .families import FAMILIES, Family, detect_family, is_fusion_key


@dataclass(frozen=True)
class ModelType:
    """What a Hugging Face ``model_type`` means beyond its tensors: one row per architecture.

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


#: Hugging Face ``model_type`` values this tool reads.
MODEL_TYPES: dict[str, ModelType] = {
    "llama": ModelType("LlamaForCausalLM"),
    "mistral": ModelType("MistralForCausalLM"),
    "qwen2": ModelType("Qwen2ForCausalLM", sliding_window_flag="use_sliding_window"),
    "qwen3": ModelType("Qwen3ForCausalLM", sliding_window_flag="use_sliding_window"),
    "gemma": ModelType("GemmaForCausalLM", norm_offset=1.0, norm_fp32_scale=True, embed_scale_sqrt_dim=True,
                       activation_keys=("hidden_activation", "hidden_act"), default_activation="gelu_pytorch_tanh"),
    "phi3": ModelType("Phi3ForCausalLM", fused_qkv=True, fused_gate_up=True, default_norm_eps=1e-5),
}
#: ``model_type`` -> the class name transformers uses.
SUPPORTED_MODEL_TYPES: dict[str, str] = {k: v.architecture for k, v in MODEL_TYPES.items()}
#: Key of a config.json written from tensor shapes (no base config): the fields that were inferred.
INFERRED_MARK = "fusionsurgery_inferred"
#: ``--rope-defaults NAME``: RoPE settings to assume when no config.json gives them (torchtune's builders
#: carry these; a checkpoint's tensors cannot tell them).
ROPE_DEFAULTS: dict[str, tuple[float, dict[str, Any] | None]] = {
    "llama3": (500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}),
}
#: MLP activations the modules implement (``modules/mlp.py``).
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ROPE_REQUIRED = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass
class ModelConfig:
    """Everything needed to build the (unfused) decoder."""

    family: str
    model_type: str
    num_layers: int
    dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float | None = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_embeddings: bool = False
    attn_bias: bool = False
    qk_norm: bool = False
    max_seq_len: int = 4096
    activation: str = "silu"
    inferred: list[str] = field(default_factory=list)
    norm_offset: float = 0.0
    norm_fp32_scale: bool = False
    embed_scale: float | None = None
    fused_qkv: bool = False
    fused_gate_up: bool = False
    sliding_window: int | None = None

    @property
    def family_obj(self) -> Family:
        return FAMILIES[self.family]

    @property
    def model_type_obj(self) -> ModelType:
        return MODEL_TYPES[self.model_type]

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def rope_parameters(self) -> dict[str, Any]:
        """RoPE settings in transformers 5's ``rope_parameters`` spelling."""
        params: dict[str, Any] = {"rope_type": "default"}
        if self.rope_scaling:
            params.update(self.rope_scaling)
        params["rope_theta"] = self.rope_theta
        return params


@dataclass
class FusionConfig:
    """What fusion added: the ``fusion`` section of a fused checkpoint's ``config.json``."""

    layers: list[int]
    fusion_first: bool = True
    encoder_dim: int = 0
    fusion_vocab: int = 0
    init: str = "normal"
    init_std: float = 0.02
    seed: int = 0
    dtype: str = "BF16"
    qk_norm_eps: float = 1e-5
    norm_eps: float = 1e-5
    tool_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: Any, where: str = "config.json") -> "FusionConfig":
        """Read a ``fusion`` section, refusing fields of the wrong type with one line."""
        if not isinstance(doc, dict):
            raise CheckpointError(f"{where}: 'fusion' section is not an object")
        known = {k: doc[k] for k in cls.__dataclass_fields__ if k in doc}
        if "layers" not in known:
            raise CheckpointError(f"{where}: 'fusion' section has no 'layers'")
        fc = cls(**known)
        if not isinstance(fc.layers, list) or not all(is_int(i) for i in fc.layers):
            raise CheckpointError(f"{where}: fusion.layers must be a list of layer indices")
        for name, kinds in _FUSION_FIELD_TYPES.items():
            value = getattr(fc, name)
            if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
                raise CheckpointError(f"{where}: fusion.{name} is {value!r}, expected {kinds[0].__name__}")
        return fc


#: The type every scalar field of a fusion section must have.
_FUSION_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "fusion_first": (bool,), "encoder_dim": (int,), "fusion_vocab": (int,), "init": (str,),
    "init_std": (float, int), "seed": (int,), "dtype": (str,), "qk_norm_eps": (float, int),
    "norm_eps": (float, int), "tool_version": (str,),
}


# ---------------------------------------------------------------------- reading
def check_options(*, rope_defaults: str | None = None, num_heads: int | None = None,
                  num_kv_heads: int | None = None) -> None:
    """Refuse (``UsageError``) option values no checkpoint could make sense of."""
    if rope_defaults is not None and rope_defaults not in ROPE_DEFAULTS:
        raise UsageError(f"--rope-defaults must be one of {', '.join(ROPE_DEFAULTS)}, got {rope_defaults!r}")
    for flag, value in (("--num-heads", num_heads), ("--num-kv-heads", num_kv_heads)):
        if value is not None and value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")


def read_model_config(
    ckpt: Checkpoint, *, num_heads: int | None = None, num_kv_heads: int | None = None,
    rope_defaults: str | None = None,
) -> ModelConfig:
    """Describe the decoder in ``ckpt`` from its config.json, or infer it from tensor shapes.

    Fusion tensors (of an already fused checkpoint) are ignored here. RoPE settings are not in the
    tensors: without a config they stay unknown (``rope_theta=None``) unless ``rope_defaults`` names a
    set of ``ROPE_DEFAULTS`` (e.g. ``"llama3"``, torchtune's Llama 3 builders); a config always wins.
    """
    check_options(rope_defaults=rope_defaults, num_heads=num_heads, num_kv_heads=num_kv_heads)
    family = detect_family(ckpt.keys())
    shapes = {}
    for key in ckpt.keys():
        canonical = family.to_canonical(key)
        if not is_fusion_key(canonical):
            shapes[canonical] = ckpt.info(key).shape
    if ckpt.config is not None:
        try:
            cfg = _from_hf_config(ckpt.config, family, shapes, num_heads, num_kv_heads)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            where = ckpt.config_path or "config.json"
            raise CheckpointError(f"{where}: unreadable value ({type(exc).__name__}: {exc})") from None
    else:
        cfg = _infer(family, shapes, num_heads, num_kv_heads)
    if cfg.rope_theta is None and rope_defaults is not None:
        cfg.rope_theta, scaling = ROPE_DEFAULTS[rope_defaults]
        cfg.rope_scaling = copy.deepcopy(scaling)
        cfg.inferred.append(f"rope_theta and rope_scaling (--rope-defaults {rope_defaults})")
    _check_shapes(cfg, shapes)
    return cfg


def config_from_shapes(doc: dict[str, Any], family: Family, shapes: dict[str, tuple[int, ...]],
                       where: str = "config.json") -> ModelConfig:
    """``read_model_config`` for tensors not on disk yet: the decoder that config ``doc`` describes,
    checked against the canonical name -> shape of every (non-fusion) tensor it will have."""
    try:
        cfg = _from_hf_config(doc, family, shapes, None, None)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{where}: unreadable value ({type(exc).__name__}: {exc})") from None
    _check_shapes(cfg, shapes)
    return cfg


def _shape(shapes: dict[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"checkpoint has no tensor {key!r} (canonical name); is it a complete decoder?")
    return shapes[key]


def _layer_count(shapes: dict[str, tuple[int, ...]]) -> int:
    idx = {int(k.split(".")[1]) for k in shapes if k.startswith("layers.")}
    if not idx:
        raise CheckpointError("checkpoint has no decoder layers")
    n = max(idx) + 1
    missing = sorted(set(range(n)) - idx)
    if missing:
        raise CheckpointError(f"checkpoint is missing decoder layer(s) {missing[:5]}")
    return n


def _structure(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """What the tensors alone decide. A fused ``qkv_proj`` leaves q/k widths to the head count."""
    vocab, dim = _shape(shapes, "tok_embeddings.weight")
    fused_qkv = "layers.0.attn.qkv_proj.weight" in shapes
    fused_gate_up = "layers.0.mlp.w13.weight" in shapes
    if fused_qkv:
        q_out = kv_out = None
        qkv_out = _shape(shapes, "layers.0.attn.qkv_proj.weight")[0]
    else:
        q_out = _shape(shapes, "layers.0.attn.q_proj.weight")[0]
        kv_out = _shape(shapes, "layers.0.attn.k_proj.weight")[0]
        qkv_out = None
    if fused_gate_up:
        rows = _shape(shapes, "layers.0.mlp.w13.weight")[0]
        if rows % 2:
            raise CheckpointError(f"mlp gate_up projection has an odd number of rows ({rows})")
        inter = rows // 2
    else:
        inter = _shape(shapes, "layers.0.mlp.w1.weight")[0]
    qk_norm = "layers.0.attn.q_norm.scale" in shapes
    return {
        "vocab_size": vocab,
        "dim": dim,
        "q_out": q_out,
        "kv_out": kv_out,
        "qkv_out": qkv_out,
        "intermediate_dim": inter,
        "num_layers": _layer_count(shapes),
        "tie_embeddings": "output.weight" not in shapes,
        "attn_bias": "layers.0.attn.q_proj.bias" in shapes or "layers.0.attn.qkv_proj.bias" in shapes,
        "qk_norm": qk_norm,
        "qk_head_dim": shapes["layers.0.attn.q_norm.scale"][0] if qk_norm else None,
        "fused_qkv": fused_qkv,
        "fused_gate_up": fused_gate_up,
    }


def _heads(s: dict[str, Any], num_heads: int | None, num_kv_heads: int | None, head_dim: int | None) -> tuple[int, int, int]:
    if head_dim is None:
        head_dim = s["qk_head_dim"]
    if head_dim is None:
        if num_heads is None:
            raise UsageError(
                "the head count cannot be inferred from tensor shapes without a config.json: "
                "pass --num-heads N (and --num-kv-heads N for grouped-query attention), or --config PATH"
            )
        if s["dim"] % num_heads:
            raise UsageError(f"--num-heads {num_heads} does not divide the width {s['dim']}")
        head_dim = s["dim"] // num_heads
    q_out, kv_out = s["q_out"], s["kv_out"]
    if s["qkv_out"] is not None:  # fused q/k/v: the query head count splits it
        if num_heads is None:
            raise UsageError(
                "a fused qkv_proj cannot be split without the head count: pass --num-heads N or --config PATH"
            )
        q_out = num_heads * head_dim
        rest = s["qkv_out"] - q_out
        if rest <= 0 or rest % (2 * head_dim):
            raise CheckpointError(
                f"qkv_proj has {s['qkv_out']} rows, which is not {num_heads} query heads of {head_dim} "
                "plus equal key and value parts"
            )
        kv_out = rest // 2
    if q_out % head_dim or kv_out % head_dim:
        raise CheckpointError(
            f"q/k projections ({q_out}, {kv_out} rows) are not multiples of head_dim {head_dim}"
        )
    heads = q_out // head_dim
    if num_heads is not None and num_heads != heads:
        raise UsageError(f"--num-heads {num_heads} disagrees with the q_proj shape ({heads} heads of {head_dim})")
    kv = kv_out // head_dim
    if num_kv_heads is not None and num_kv_heads != kv:
        raise UsageError(f"--num-kv-heads {num_kv_heads} disagrees with the k_proj shape ({kv} heads of {head_dim})")
    if kv == 0 or heads % kv:
        raise CheckpointError(f"{heads} query heads cannot be grouped over {kv} key/value heads")
    return heads, kv, head_dim


def _type_switches(mt: ModelType, dim: int) -> dict[str, Any]:
    return {
        "norm_offset": mt.norm_offset,
        "norm_fp32_scale": mt.norm_fp32_scale,
        "embed_scale": dim ** 0.5 if mt.embed_scale_sqrt_dim else None,
    }


def _check_fusedness(model_type: str, s: dict[str, Any]) -> None:
    mt = MODEL_TYPES[model_type]
    for flag, what in (("fused_qkv", "one fused self_attn.qkv_proj"), ("fused_gate_up", "one fused mlp.gate_up_proj")):
        if getattr(mt, flag) != s[flag]:
            has = "has" if s[flag] else "does not have"
            raise CheckpointError(
                f"config.json says model_type {model_type!r}, but the checkpoint {has} {what}; "
                "is the config the checkpoint's own?"
            )


def _infer(family: Family, shapes: dict[str, tuple[int, ...]], num_heads: int | None, num_kv_heads: int | None) -> ModelConfig:
    s = _structure(shapes)
    heads, kv, head_dim = _heads(s, num_heads, num_kv_heads, None)
    if s["fused_qkv"] and s["fused_gate_up"]:
        model_type = "phi3"
    else:
        model_type = "qwen3" if s["qk_norm"] else "qwen2" if s["attn_bias"] else "llama"
    _check_fusedness(model_type, s)
    inferred = ["num_layers", "dim", "num_heads", "num_kv_heads", "head_dim", "intermediate_dim", "vocab_size",
                "tie_embeddings", "model_type"]
    mt = MODEL_TYPES[model_type]
    return ModelConfig(
        family=family.name, model_type=model_type, num_layers=s["num_layers"], dim=s["dim"],
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim, intermediate_dim=s["intermediate_dim"],
        vocab_size=s["vocab_size"], norm_eps=1e-5, tie_embeddings=s["tie_embeddings"], attn_bias=s["attn_bias"],
        qk_norm=s["qk_norm"], rope_theta=None, inferred=inferred, activation=mt.default_activation,
        fused_qkv=s["fused_qkv"], fused_gate_up=s["fused_gate_up"], **_type_switches(mt, s["dim"]),
    )


def read_rope(doc: dict[str, Any], default_theta: float = 10000.0) -> tuple[float | None, dict[str, Any] | None]:
    """(theta, scaling) from either spelling: top-level ``rope_theta``/``rope_scaling`` or ``rope_parameters``.

    A config that this tool wrote from tensor shapes (``INFERRED_MARK``) and that names no theta
    leaves it unknown (None) instead of assuming transformers' default.
    """
    if INFERRED_MARK in doc and "rope_theta" not in doc and not doc.get("rope_parameters"):
        return None, None
    params = doc.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", doc.get("rope_theta", default_theta))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = doc.get("rope_theta", default_theta)
        scaling = dict(doc.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    partial = scaling.pop("partial_rotary_factor", doc.get("partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        raise CheckpointError(
            f"config.json: partial_rotary_factor {partial} (RoPE on part of each head) is not supported"
        )
    rope_type = scaling.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(f"config.json: rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    for key in _ROPE_REQUIRED.get(rope_type, ()):
        if not isinstance(scaling.get(key), (int, float)) or isinstance(scaling.get(key), bool):
            raise CheckpointError(f"config.json: {rope_type} rope scaling needs a number for {key!r}")
    return (float(theta) if theta is not None else None), (scaling if rope_type != "default" else None)


def activation_of(doc: dict[str, Any], model_type: str) -> str:
    """The MLP activation a Hugging Face config names for ``model_type`` (checked against the supported ones)."""
    return _activation(doc, MODEL_TYPES[model_type])


def _activation(doc: dict[str, Any], mt: ModelType) -> str:
    name = mt.default_activation
    for key in mt.activation_keys:
        if doc.get(key):
            name = str(doc[key])
            break
    if name not in SUPPORTED_ACTIVATIONS:
        raise CheckpointError(
            f"config.json: MLP activation {name!r} is not supported (supported: {', '.join(SUPPORTED_ACTIVATIONS)})"
        )
    return name


def _sliding_window(doc: dict[str, Any], mt: ModelType) -> int | None:
    window = doc.get("sliding_window")
    if window is None or (mt.sliding_window_flag and not doc.get(mt.sliding_window_flag)):
        return None
    return int(window)


def _from_hf_config(
    doc: dict[str, Any], family: Family, shapes: dict[str, tuple[int, ...]], num_heads: int | None, num_kv_heads: int | None
) -> ModelConfig:
    s = _structure(shapes)
    model_type = doc.get("model_type", "llama")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"config.json: model_type {model_type!r} is not supported (supported: {', '.join(MODEL_TYPES)})"
        )
    mt = MODEL_TYPES[model_type]
    _check_fusedness(model_type, s)
    try:
        heads = int(doc.get("num_attention_heads") or num_heads or 0) or None
        kv = int(doc.get("num_key_value_heads") or num_kv_heads or heads or 0) or None
        head_dim = doc.get("head_dim")
        if head_dim is None and heads:
            head_dim = int(doc.get("hidden_size", s["dim"])) // heads
        heads, kv, head_dim = _heads(s, heads, kv, int(head_dim) if head_dim else None)
        theta, scaling = read_rope(doc, mt.default_theta)
        norm_eps = float(doc.get("rms_norm_eps", mt.default_norm_eps))
        max_seq = int(doc.get("max_position_embeddings", 4096))
        window = _sliding_window(doc, mt)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"config.json: unreadable value ({exc})") from None
    for name, ours in (("hidden_size", s["dim"]), ("vocab_size", s["vocab_size"]),
                       ("num_hidden_layers", s["num_layers"]), ("intermediate_size", s["intermediate_dim"])):
        if name in doc and doc[name] != ours:
            raise CheckpointError(f"config.json says {name}={doc[name]} but the tensors say {ours}")
    tie = s["tie_embeddings"]
    if doc.get("tie_word_embeddings") is False and tie:
        raise CheckpointError("config.json says tie_word_embeddings=false but the checkpoint has no lm_head")
    return ModelConfig(
        family=family.name, model_type=model_type, num_layers=s["num_layers"], dim=s["dim"],
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim, intermediate_dim=s["intermediate_dim"],
        vocab_size=s["vocab_size"], norm_eps=norm_eps, rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=tie, attn_bias=s["attn_bias"], qk_norm=s["qk_norm"], max_seq_len=max_seq,
        activation=_activation(doc, mt), fused_qkv=s["fused_qkv"], fused_gate_up=s["fused_gate_up"],
        sliding_window=window, **_type_switches(mt, s["dim"]),
    )


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every tensor of the (unfused) decoder ``cfg`` describes."""
    expected: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (cfg.vocab_size, cfg.dim), "norm.scale": (cfg.dim,)}
    if not cfg.tie_embeddings:
        expected["output.weight"] = (cfg.vocab_size, cfg.dim)
    q, kv = cfg.num_heads * cfg.head_dim, cfg.kv_dim
    per_layer: dict[str, tuple[int, ...]] = {
        "sa_norm.scale": (cfg.dim,), "mlp_norm.scale": (cfg.dim,), "attn.output_proj.weight": (cfg.dim, q),
        "mlp.w2.weight": (cfg.dim, cfg.intermediate_dim),
    }
    if cfg.fused_qkv:
        per_layer["attn.qkv_proj.weight"] = (q + 2 * kv, cfg.dim)
        if cfg.attn_bias:
            per_layer["attn.qkv_proj.bias"] = (q + 2 * kv,)
    else:
        per_layer.update({"attn.q_proj.weight": (q, cfg.dim), "attn.k_proj.weight": (kv, cfg.dim),
                          "attn.v_proj.weight": (kv, cfg.dim)})
        if cfg.attn_bias:
            per_layer.update({"attn.q_proj.bias": (q,), "attn.k_proj.bias": (kv,), "attn.v_proj.bias": (kv,)})
    if cfg.fused_gate_up:
        per_layer["mlp.w13.weight"] = (2 * cfg.intermediate_dim, cfg.dim)
    else:
        per_layer.update({"mlp.w1.weight": (cfg.intermediate_dim, cfg.dim), "mlp.w3.weight": (cfg.intermediate_dim, cfg.dim)})
    if cfg.qk_norm:
        per_layer.update({"attn.q_norm.scale": (cfg.head_dim,), "attn.k_norm.scale": (cfg.head_dim,)})
    for i in range(cfg.num_layers):
        for suffix, shape in per_layer.items():
            expected[f"layers.{i}.{suffix}"] = shape
    return expected


def _check_shapes(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every tensor of every layer must have the shape the config implies."""
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise CheckpointError(f"checkpoint is missing tensor(s) {', '.join(missing[:3])} (canonical names)")
    for key, shape in expected.items():
        if tuple(shapes[key]) != shape:
            raise CheckpointError(f"tensor {key} has shape {list(shapes[key])}, expected {list(shape)}")
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise CheckpointError(f"unexpected tensor(s) for this architecture: {', '.join(extra[:3])} (canonical names)")


# ---------------------------------------------------------------------- writing
def to_hf_config(cfg: ModelConfig, base_doc: dict[str, Any] | None) -> dict[str, Any]:
    """A transformers-readable config.json for ``cfg``, keeping every field of the base's own."""
    doc = copy.deepcopy(base_doc) if base_doc else {}
    if not base_doc:
        doc.update({
            "architectures": [SUPPORTED_MODEL_TYPES[cfg.model_type]],
            "model_type": cfg.model_type,
            "hidden_size": cfg.dim,
            "intermediate_size": cfg.intermediate_dim,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab_size,
            "rms_norm_eps": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings,
            "max_position_embeddings": cfg.max_seq_len,
            "hidden_act": cfg.activation,
            # marks a config written from tensor shapes: what it lacks (RoPE settings) stays unknown
            INFERRED_MARK: list(cfg.inferred),
        })
        if cfg.model_type == "llama":
            doc["attention_bias"] = cfg.attn_bias
        if cfg.sliding_window is not None:
            doc["sliding_window"] = cfg.sliding_window
        if cfg.rope_theta is not None:
            doc["rope_theta"] = cfg.rope_theta
            if cfg.rope_scaling:
                doc["rope_scaling"] = dict(cfg.rope_scaling)
    return doc


def read_fusion_config(doc: dict[str, Any] | None) -> FusionConfig | None:
    """The ``fusion`` section of a config.json, if any."""
    if not doc or "fusion" not in doc:
        return None
    return FusionConfig.from_dict(doc["fusion"])
