"""Where an Mllama checkpoint keeps its text decoder, output head and vision parts, and what an
``import`` recorded about the checkpoint it came from so that ``export --to mllama`` rebuilds it.

transformers writes ``MllamaForConditionalGeneration`` under the Hub's names (``language_model.model.*``,
``language_model.lm_head.weight``, ``vision_model.*``, ``multi_modal_projector.*``), holds it in memory as
``model.language_model.*`` (what ``state_dict()`` gives), and writes ``MllamaForCausalLM`` as ``model.*``.
One row per layout; inside the text prefix every layout names tensors the same way.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, listed
from ..io.checkpoint import Checkpoint
from ..io.copying import copy_checkpoint_files
from ..io.manifest_schema import is_int

#: The manifest section an import writes (and a graft carries): the source and its vision parts.
ORIGIN_KEY = "mllama"
#: The directory beside the weights that holds the vision tower and projector.
VISION_DIR = "vision"
CAUSAL_PREFIX = "model."


@dataclass(frozen=True)
class MllamaLayout:
    """One way of naming an Mllama checkpoint's tensors."""

    name: str
    architecture: str
    text_prefix: str  # before embed_tokens.weight, layers.{j}.*, norm.weight
    lm_head: str
    vision_prefixes: tuple[str, ...] = ()

    def text_key(self, causal_key: str) -> str:
        """``causal_key`` (MllamaForCausalLM's ``model.*`` / ``lm_head.weight``) in this layout."""
        if causal_key == "lm_head.weight":
            return self.lm_head
        if not causal_key.startswith(CAUSAL_PREFIX):
            raise ValueError(f"{causal_key!r} is not an MllamaForCausalLM key")
        return self.text_prefix + causal_key[len(CAUSAL_PREFIX):]

    def is_vision(self, key: str) -> bool:
        return key.startswith(self.vision_prefixes) if self.vision_prefixes else False


LAYOUTS: dict[str, MllamaLayout] = {layout.name: layout for layout in (
    MllamaLayout("hub", "MllamaForConditionalGeneration", "language_model.model.", "language_model.lm_head.weight",
                 ("vision_model.", "multi_modal_projector.")),
    MllamaLayout("module", "MllamaForConditionalGeneration", "model.language_model.", "lm_head.weight",
                 ("model.vision_model.", "model.multi_modal_projector.")),
    MllamaLayout("causal", "MllamaForCausalLM", CAUSAL_PREFIX, "lm_head.weight"),
)}


def detect_layout(keys: set[str]) -> MllamaLayout | None:
    """The layout whose embedding table is among ``keys`` (None: not an Mllama checkpoint)."""
    for layout in LAYOUTS.values():
        if f"{layout.text_prefix}embed_tokens.weight" in keys:
            return layout
    return None


def text_config_of(doc: dict[str, Any]) -> dict[str, Any]:
    """The text model's config: ``text_config`` of an ``mllama`` config, or the config itself."""
    return doc["text_config"] if doc.get("model_type") == "mllama" else doc


# ------------------------------------------------------------------ what export reads back
@dataclass
class Origin:
    """The Mllama checkpoint an import (or the adapter of a graft) came from."""

    layout: MllamaLayout
    config: dict[str, Any]
    vision: Checkpoint | None
    vision_digests: dict[str, str]


def read_origin(ckpt: Checkpoint, manifest: dict[str, Any] | None = None) -> Origin | None:
    """The origin recorded in ``ckpt``'s manifest (``manifest``, when the caller has read it already),
    with its vision parts opened (None: not an import)."""
    manifest = (ckpt.read_manifest() if manifest is None else manifest) or {}
    doc = manifest.get(ORIGIN_KEY)
    if doc is None:
        return None
    where = f"{ckpt.root}/fusion_manifest.json"
    if not isinstance(doc, dict) or doc.get("layout") not in LAYOUTS or not isinstance(doc.get("config"), dict):
        raise CheckpointError(f"{where}: the '{ORIGIN_KEY}' section needs a layout ({', '.join(LAYOUTS)}) and a config")
    vision_doc = doc.get("vision")
    vision, digests = None, {}
    if vision_doc:
        named = {t.get("name"): t.get("digest") for t in vision_doc.get("tensors", []) if isinstance(t, dict)}
        directory = ckpt.root / VISION_DIR
        if not directory.is_dir():
            raise CheckpointError(f"{ckpt.root}: the manifest names {len(named)} vision tensor(s) in {VISION_DIR}/, "
                                  "which is missing")
        # the checkpoint's own link rule: vision/ is part of its tree (and may not lead out of it)
        vision = Checkpoint.open(ckpt.link_rule.check(directory, "vision directory"), links=ckpt.link_rule)
        if set(vision.keys()) != set(named):
            odd = sorted(set(vision.keys()) ^ set(named))
            raise CheckpointError(f"{directory}: holds other tensors than the manifest names ({listed(odd, 3)})")
        digests = named
    return Origin(LAYOUTS[doc["layout"]], doc["config"], vision, digests)


def origin_config(origin: Origin, text: dict[str, Any]) -> dict[str, Any]:
    """The origin's config with its text model replaced by ``text`` (an ``MllamaTextConfig`` document
    describing the weights being written): the vision config and image token come back as they were."""
    original_text = text_config_of(origin.config)
    merged = copy.deepcopy(original_text)
    if "rope_parameters" in text:  # one RoPE spelling, the new one
        merged.pop("rope_scaling", None)
        merged.pop("rope_theta", None)
    dtype = text.get("dtype")
    if dtype is not None:
        merged.pop("torch_dtype", None)
    if origin.config.get("model_type") != "mllama":
        merged.update(text)
        return merged
    merged.update({k: v for k, v in text.items() if k not in ("architectures", "dtype")})
    doc = copy.deepcopy(origin.config)
    doc["text_config"] = merged
    doc["architectures"] = [origin.layout.architecture]
    if dtype is not None:
        doc.pop("torch_dtype", None)
        doc["dtype"] = dtype
    return doc


def origin_pad(origin: Origin | None) -> int | None:
    """The origin's ``pad_token_id``: a fallback for a base whose config names none."""
    if origin is None:
        return None
    pad = text_config_of(origin.config).get("pad_token_id")
    return pad if is_int(pad) else None


def copy_vision(origin: Origin | None, root: Path, algorithm: str,
                progress: Callable[[int], None] | None = None) -> dict[str, Any] | None:
    """Copy the origin's vision parts (if any) into ``root/vision``, byte for byte; their manifest entry."""
    if origin is None or origin.vision is None:
        return None
    vision = origin.vision
    (root / VISION_DIR).mkdir()
    digests, files = copy_checkpoint_files(vision, root / VISION_DIR, progress, algorithm)
    return {"directory": VISION_DIR, "files": files,
            "tensors": [{"name": k, "shape": list(vision.info(k).shape), "dtype": vision.info(k).dtype,
                         "file": vision.key_to_file[k], "digest": digests[k]} for k in vision.keys()]}


# ------------------------------------------------------------------ what a vision config promises
#: Tensors of one vision encoder layer (``transformer.layers.{j}.`` / ``global_transformer.layers.{j}.``).
_VISION_LAYER = ("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
                 "post_attention_layernorm.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
                 "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight")
#: Tensors of the vision model outside its layers.
_VISION_GLOBAL = ("class_embedding", "patch_embedding.weight", "gated_positional_embedding.embedding",
                  "gated_positional_embedding.gate", "gated_positional_embedding.tile_embedding.weight",
                  "pre_tile_positional_embedding.embedding.weight", "pre_tile_positional_embedding.gate",
                  "post_tile_positional_embedding.embedding.weight", "post_tile_positional_embedding.gate",
                  "layernorm_pre.weight", "layernorm_pre.bias", "layernorm_post.weight", "layernorm_post.bias")
#: transformers' MllamaVisionConfig defaults for the layer counts a config may leave out.
_VISION_DEFAULTS = {"num_hidden_layers": 32, "num_global_layers": 8}


def expected_vision_keys(layout: MllamaLayout, vision_config: Any, where: str) -> set[str]:
    """Every vision tower and projector key an ``MllamaForConditionalGeneration`` of ``vision_config`` has,
    in ``layout``'s names (the tower's ``transformer`` / ``global_transformer`` layer counts from the config).

    Raises:
        CheckpointError: the config's vision section is not an object or its layer counts are not counts.
    """
    if not isinstance(vision_config, dict):
        raise CheckpointError(f"{where}: an mllama config needs a vision_config object")
    counts = {}
    for name, default in _VISION_DEFAULTS.items():
        value = vision_config.get(name, default)
        if not is_int(value) or value < 0:
            raise CheckpointError(f"{where}: vision_config.{name} is {value!r}, expected a layer count")
        counts[name] = value
    tower, projector = layout.vision_prefixes
    keys = {tower + k for k in _VISION_GLOBAL} | {f"{projector}weight", f"{projector}bias"}
    for stack, count, extra in (("transformer", counts["num_hidden_layers"], ()),
                                ("global_transformer", counts["num_global_layers"], ("gate_attn", "gate_ffn"))):
        keys |= {f"{tower}{stack}.layers.{j}.{k}" for j in range(count) for k in _VISION_LAYER + extra}
    return keys
