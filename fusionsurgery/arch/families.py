"""Naming families: one table per family maps canonical tensor names onto the family's names.

Canonical names are torchtune's (``layers.{i}.attn.q_proj.weight``): the modules in
``fusionsurgery.modules`` are named that way, so a torchtune checkpoint maps onto itself and any
other family is a table of rows, never a new code path. ``{i}`` stands for a layer index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property, lru_cache

from ..errors import CheckpointError, listed
from .model_types import TORCHTUNE_NAMES, TorchtuneNames

# Tensors of one decoder layer, canonical suffix -> family suffix (both under a layer prefix).
_HF_LAYER = {
    "sa_norm.scale": "input_layernorm.weight",
    "mlp_norm.scale": "post_attention_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.q_proj.bias": "self_attn.q_proj.bias",
    "attn.k_proj.bias": "self_attn.k_proj.bias",
    "attn.v_proj.bias": "self_attn.v_proj.bias",
    # fused projections (Phi-3) keep their own tensor, so their bytes are kept too:
    # qkv_proj holds q rows, then k rows, then v rows; w13 holds w1 (gate) rows, then w3 (up) rows
    "attn.qkv_proj.weight": "self_attn.qkv_proj.weight",
    "attn.qkv_proj.bias": "self_attn.qkv_proj.bias",
    "attn.output_proj.weight": "self_attn.o_proj.weight",
    "attn.q_norm.scale": "self_attn.q_norm.weight",
    "attn.k_norm.scale": "self_attn.k_norm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
    "mlp.w13.weight": "mlp.gate_up_proj.weight",
}
# Tensors of one fusion layer (a gated cross-attention block), canonical -> family suffix.
_HF_FUSION = {
    "attn.q_proj.weight": "cross_attn.q_proj.weight",
    "attn.k_proj.weight": "cross_attn.k_proj.weight",
    "attn.v_proj.weight": "cross_attn.v_proj.weight",
    "attn.output_proj.weight": "cross_attn.o_proj.weight",
    "attn.q_norm.scale": "cross_attn.q_norm.weight",
    "attn.k_norm.scale": "cross_attn.k_norm.weight",
    "ca_norm.scale": "input_layernorm.weight",
    "mlp_norm.scale": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
    "ca_scale.scale": "cross_attn_attn_gate",
    "mlp_scale.scale": "cross_attn_mlp_gate",
}
_HF_GLOBAL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "tok_embeddings.fusion_embedding.weight": "model.embed_tokens.fusion_embedding.weight",
    "norm.scale": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_TUNE_LAYER = {k: k for k in _HF_LAYER}
_TUNE_FUSION = {k: k for k in _HF_FUSION}
_TUNE_GLOBAL = {k: k for k in _HF_GLOBAL}

FUSION_SEGMENT = "fusion_layer"
#: Canonical name of a tensor a pass-through family keeps without knowing it: this mark + its key.
PASSTHROUGH = "base:"
#: Name of the family of a decoder whose layers are wrapped as they are (no native modules).
GENERIC = "generic"


@dataclass(frozen=True)
class Family:
    """How one naming family spells every tensor, and how its RoPE rotates."""

    name: str
    layer_prefix: str  # e.g. "model.layers.{i}."
    global_keys: dict[str, str]
    layer_keys: dict[str, str]
    fusion_keys: dict[str, str]
    rope_layout: str  # "half" (Hugging Face) or "interleaved" (torchtune, Meta)
    marker: str  # a key every checkpoint of this family has
    description: str = ""
    passthrough: bool = False  # keys outside the table are the base's own, kept as they are (any decoder)
    transformers_names: bool = True  # transformers' from_pretrained reads these names as they are

    @cached_property
    def table(self) -> dict[str, str]:
        """Every canonical template -> family template."""
        out = dict(self.global_keys)
        for c, f in self.layer_keys.items():
            out[f"layers.{{i}}.{c}"] = self.layer_prefix + f
        for c, f in self.fusion_keys.items():
            out[f"layers.{{i}}.{FUSION_SEGMENT}.{c}"] = f"{self.layer_prefix}{FUSION_SEGMENT}.{f}"
        return out

    @cached_property
    def _to_family(self) -> list[tuple[re.Pattern[str], str]]:
        return [(_pattern(c), f) for c, f in self.table.items()]

    @cached_property
    def _to_canonical(self) -> list[tuple[re.Pattern[str], str]]:
        return [(_pattern(f), c) for c, f in self.table.items()]

    def to_family(self, canonical: str) -> str:
        return _rename(canonical, self._to_family, self.name)

    def to_canonical(self, key: str) -> str:
        if self.passthrough and not self._matches(key):
            return PASSTHROUGH + key
        return _rename(key, self._to_canonical, self.name)

    def knows(self, key: str) -> bool:
        return self.passthrough or self._matches(key)

    def _matches(self, key: str) -> bool:
        return any(p.fullmatch(key) for p, _ in self._to_canonical)

    @cached_property
    def _layer_pattern(self) -> re.Pattern[str]:
        return re.compile(re.escape(self.layer_prefix).replace(r"\{i\}", r"(\d+)"))

    def layer_of(self, key: str) -> int | None:
        """The index of the decoder layer ``key`` belongs to (its own tensor or its fusion layer's), else None."""
        m = self._layer_pattern.match(key)
        return int(m.group(1)) if m else None

    def fusion_key(self, layer: int, canonical_suffix: str) -> str:
        """The family name of a fusion-layer tensor, e.g. (3, "ca_scale.scale")."""
        return self.to_family(f"layers.{layer}.{FUSION_SEGMENT}.{canonical_suffix}")

    def layer_key(self, layer: int, canonical_suffix: str) -> str:
        return self.to_family(f"layers.{layer}.{canonical_suffix}")

    def global_key(self, canonical: str) -> str:
        return self.to_family(canonical)


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)"))


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]], family: str) -> str:
    for pattern, target in rules:
        m = pattern.fullmatch(key)
        if m:
            return target.replace("{i}", m.group("i")) if "{i}" in target else target
    raise CheckpointError(f"tensor {key!r} has no place in the {family} naming family")


FAMILIES: dict[str, Family] = {
    "hf": Family(
        name="hf",
        layer_prefix="model.layers.{i}.",
        global_keys=_HF_GLOBAL,
        layer_keys=_HF_LAYER,
        fusion_keys=_HF_FUSION,
        rope_layout="half",
        marker="model.embed_tokens.weight",
        description="Hugging Face names (model.layers.{i}.self_attn.q_proj.weight)",
    ),
    "torchtune": Family(
        name="torchtune",
        layer_prefix="layers.{i}.",
        global_keys=_TUNE_GLOBAL,
        layer_keys=_TUNE_LAYER,
        fusion_keys=_TUNE_FUSION,
        rope_layout="interleaved",
        marker="tok_embeddings.weight",
        description="torchtune names (layers.{i}.attn.q_proj.weight)",
        transformers_names=False,
    ),
}


#: Where torchtune numbers the layers and keeps the token embedding, whatever the type.
TUNE_LAYER_PREFIX, TUNE_EMBEDDING_KEY = "layers", "tok_embeddings.weight"


@lru_cache(maxsize=64)
def generic_family(layer_prefix: str, embedding_key: str, model_type: str = "") -> Family:
    """The family of any decoder: layers numbered under ``layer_prefix`` (dotted, e.g. ``transformer.h``),
    token embedding at ``embedding_key``, fusion tensors in the HF column of DESIGN.md section 3.

    Llama-named layer tensors (``self_attn.q_proj`` ...) get their canonical names, so ``--init copy``
    finds them; every other key passes through under its own name. A ``model_type`` torchtune builds
    (``model_types.TORCHTUNE_NAMES``) laid out as transformers or torchtune lay it out gets that type's
    rows too (``typed_family``), so each of its tensors has a canonical, torchtune name."""
    names = TORCHTUNE_NAMES.get(model_type)
    if names is not None:
        if (layer_prefix, embedding_key) == (names.hf_layer_prefix, names.hf_embedding_key):
            return _typed_family(model_type, names, "hf")
        if (layer_prefix, embedding_key) == (TUNE_LAYER_PREFIX, TUNE_EMBEDDING_KEY):
            return _typed_family(model_type, names, "torchtune")
    stem = embedding_key.removesuffix(".weight")
    return Family(
        name=GENERIC,
        layer_prefix=f"{layer_prefix}.{{i}}.",
        global_keys={"tok_embeddings.weight": embedding_key,
                     "tok_embeddings.fusion_embedding.weight": f"{stem}.fusion_embedding.weight"},
        layer_keys=_HF_LAYER,
        fusion_keys=_HF_FUSION,
        rope_layout="half",
        marker=embedding_key,
        description=f"transformers names, layers under {layer_prefix}.{{i}}. (wrapped as they are)",
        passthrough=True,
    )


def typed_family(model_type: str, naming: str) -> Family | None:
    """The family of a ``model_type`` torchtune builds without native modules here, in ``naming``
    (``hf`` or ``torchtune``); None for any other type."""
    names = TORCHTUNE_NAMES.get(model_type)
    if names is None:
        return None
    if naming == "hf":
        return generic_family(names.hf_layer_prefix, names.hf_embedding_key, model_type)
    return generic_family(TUNE_LAYER_PREFIX, TUNE_EMBEDDING_KEY, model_type)


def _typed_family(model_type: str, names: TorchtuneNames, naming: str) -> Family:
    """The pass-through family of a type with torchtune rows (``model_types.TORCHTUNE_NAMES``), in
    transformers' names (``hf``) or torchtune's (``torchtune``)."""
    layer = dict(names.layer)
    stem = names.hf_embedding_key.removesuffix(".weight")
    glob = {"tok_embeddings.weight": names.hf_embedding_key,
            "tok_embeddings.fusion_embedding.weight": f"{stem}.fusion_embedding.weight", **names.globals}
    if naming == "hf":
        return Family(
            name=GENERIC, layer_prefix=f"{names.hf_layer_prefix}.{{i}}.", global_keys=glob, layer_keys=layer,
            fusion_keys=_HF_FUSION, rope_layout="half", marker=names.hf_embedding_key,
            description=f"transformers names of {model_type}, layers under {names.hf_layer_prefix}.{{i}}. "
                        "(wrapped as they are)",
            passthrough=True,
        )
    return Family(
        name=GENERIC, layer_prefix=f"{TUNE_LAYER_PREFIX}.{{i}}.", global_keys={c: c for c in glob},
        layer_keys={c: c for c in layer}, fusion_keys=_TUNE_FUSION, rope_layout=names.rope,
        marker=TUNE_EMBEDDING_KEY,
        description=f"torchtune names of {model_type} (layers.{{i}}.attn.q_proj.weight; "
                    "fusionsurgery.hf renames them for transformers as it loads)",
        passthrough=True, transformers_names=False,
    )


def detect_family(keys: list[str]) -> Family:
    """The family whose names every key follows; a clear error otherwise."""
    keyset = set(keys)
    for family in FAMILIES.values():
        if family.marker in keyset:
            unknown = [k for k in keys if not family.knows(k)]
            if unknown:
                shown = listed(unknown, 3)
                raise CheckpointError(
                    f"unsupported tensors for a Llama-family decoder in {family.name} naming: {shown}; "
                    f"supported: {supported_text()}"
                )
            return family
    sample = ", ".join(sorted(keys)[:3])
    raise CheckpointError(f"unrecognised checkpoint (keys such as {sample}); supported: {supported_text()}")


def supported_text() -> str:
    return "; ".join(f.description for f in FAMILIES.values())


def is_fusion_key(canonical: str) -> bool:
    """True for canonical names of tensors that fusion added."""
    return f".{FUSION_SEGMENT}." in canonical or canonical.startswith("tok_embeddings.fusion_embedding")
