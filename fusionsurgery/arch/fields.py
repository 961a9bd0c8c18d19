"""Reading a transformers ``config.json`` by meaning, whatever the family calls its fields.

Families spell the same fact differently (``hidden_size`` / ``n_embd`` / ``d_model``), nest the
text model's fields under ``text_config``, and some give per-layer lists (``head_dim`` per layer):
``ConfigFields`` answers "the width", "the head count" ... and says which spellings it looked for
when none is there. No transformers import: ``attribute_map`` is transformers' runtime authority,
these spellings are what its configs write to disk.
"""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError
from ..io.manifest_schema import is_number

#: Spellings of each fact, first found wins.
SPELLINGS: dict[str, tuple[str, ...]] = {
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers"),
    "dim": ("hidden_size", "n_embd", "d_model", "dim", "model_dim", "emb_dim"),
    "num_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads", "attention_heads", "decoder_attention_heads"),
    "num_kv_heads": ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"),
    "head_dim": ("head_dim", "attention_head_dim", "kv_channels"),
    "intermediate_dim": ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "intermediate_size_mlp",
                         "block_ff_dim"),
    "vocab_size": ("vocab_size", "n_vocab", "padded_vocab_size"),
    "activation": ("hidden_act", "hidden_activation", "activation_function", "hidden_activation_fn"),
    "norm_eps": ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "norm_epsilon"),
}
#: Per-layer lists whose length is the layer count where no count is written (Nemotron-H's
#: ``layers_block_type``: transformers derives ``num_hidden_layers`` from it).
LAYER_LISTS = ("layers_block_type", "layer_types")
#: Sub-configs that hold the text decoder's fields in multimodal or wrapper configs.
NESTED = ("text_config", "language_config", "llm_config")


class ConfigFields:
    """The facts of one config document (``config.json`` as a dict), looked up by meaning.

    Args:
        doc (dict[str, Any]): the parsed config.json.
        where (str): how to name the file in errors.
    """

    def __init__(self, doc: dict[str, Any], where: str = "config.json") -> None:
        self.doc, self.where = doc, where
        nested = [doc[k] for k in NESTED if isinstance(doc.get(k), dict)]
        self.layers: list[dict[str, Any]] = nested + [doc]  # the text sub-config wins over the top level

    @property
    def model_type(self) -> str | None:
        """The outer ``model_type`` (the type transformers loads)."""
        value = self.doc.get("model_type")
        return value if isinstance(value, str) else None

    def raw(self, fact: str) -> tuple[str, Any] | None:
        """(spelling, value) of ``fact`` as the config writes it, or None when absent (or null)."""
        for layer in self.layers:
            for name in SPELLINGS[fact]:
                if layer.get(name) is not None:
                    return name, layer[name]
        return None

    def int_of(self, fact: str, *, required: bool = False) -> int | None:
        """``fact`` as a positive int; a per-layer list gives its first entry (the first layer's)."""
        found = self.raw(fact)
        if found is None and fact == "num_layers":
            found = self._layer_list()
        if found is None:
            if required:
                also = f", or the length of {' / '.join(LAYER_LISTS)}" if fact == "num_layers" else ""
                raise CheckpointError(f"{self.where}: no {_what(fact)} (looked for {', '.join(SPELLINGS[fact])}{also})")
            return None
        name, value = found
        if isinstance(value, list) and value:
            value = value[0]
        if not is_number(value) or int(value) != value or value <= 0:
            raise CheckpointError(f"{self.where}: {name} is {value!r}, expected a positive integer")
        return int(value)

    def _layer_list(self) -> tuple[str, int] | None:
        """(spelling, length) of the first non-empty per-layer list (``LAYER_LISTS``), or None."""
        for layer in self.layers:
            for name in LAYER_LISTS:
                if isinstance(layer.get(name), list) and layer[name]:
                    return name, len(layer[name])
        return None

    def float_of(self, fact: str, default: float) -> float:
        found = self.raw(fact)
        if found is None:
            return default
        name, value = found
        if not is_number(value):
            raise CheckpointError(f"{self.where}: {name} is {value!r}, expected a number")
        return float(value)

    def str_of(self, fact: str) -> str | None:
        found = self.raw(fact)
        return str(found[1]) if found is not None else None


def _what(fact: str) -> str:
    return {"num_layers": "layer count", "dim": "width", "num_heads": "attention head count",
            "num_kv_heads": "key/value head count", "head_dim": "head size", "intermediate_dim": "MLP width",
            "vocab_size": "vocabulary size", "activation": "activation", "norm_eps": "norm epsilon"}[fact]
