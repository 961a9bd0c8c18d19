"""The decoder description of a type without native modules, from its config's own fields.

What the surgery needs of such a decoder: its numbered layer list and token embedding
(``discovery.py``), its width, head layout and MLP width (``fields.py``), and what no field says
(``model_types.py``: the norm convention). The layers themselves are wrapped as they are.
"""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError, UsageError
from ..io.checkpoint import Checkpoint
from ..io.manifest_schema import is_int, is_number
from .families import Family
from .fields import ConfigFields
from .model_config import ModelConfig
from .model_types import ACTIVATION_ALIASES, SUPPORTED_ACTIVATIONS, norm_offset_of

#: Keys (last two parts) of an untied output projection.
_OUTPUT_NAMES = ("lm_head.weight", "embed_out.weight")


def fusion_activation(name: str | None) -> str:
    """The fusion MLP's activation for a base whose MLP uses ``name``: the same where the block
    implements it (silu / gelu variants), else silu."""
    name = ACTIVATION_ALIASES.get(name or "", name or "")
    return name if name in SUPPORTED_ACTIVATIONS else "silu"


def read_generic_config(ckpt: Checkpoint, family: Family, *, num_heads: int | None = None,
                        num_kv_heads: int | None = None) -> ModelConfig:
    """Describe the decoder in ``ckpt`` (a type without native modules) from its config.json.

    Args:
        ckpt (Checkpoint): the checkpoint; its config.json must name the model type.
        family (Family): its pass-through family (layer prefix and embedding key).
        num_heads (int | None): ``--num-heads``, used where the config has no head count.
        num_kv_heads (int | None): ``--num-kv-heads``, likewise.

    Returns:
        ModelConfig: ``native`` false; sizes are those the fusion block takes by default.

    Raises:
        CheckpointError: a size the config lacks or contradicts the tensors; the message names the field.
        UsageError: an option that disagrees with the config.
    """
    where = str(ckpt.config_path or "config.json")
    doc = ckpt.config or {}
    fields = ConfigFields(doc, where)
    model_type = fields.model_type
    if model_type is None:
        raise CheckpointError(f"{where}: no model_type")
    num_layers = fields.int_of("num_layers", required=True)
    dim = fields.int_of("dim", required=True)
    assert num_layers is not None and dim is not None
    layer_prefix = family.layer_prefix.removesuffix(".{i}.")
    embedding_key = family.global_key("tok_embeddings.weight")
    _check_layers(ckpt, layer_prefix, num_layers, where)
    if embedding_key not in ckpt.key_to_file:
        raise CheckpointError(f"{ckpt.root}: no token embedding {embedding_key!r} (named by the fusion section)")
    emb = ckpt.info(embedding_key).shape
    factorised = len(emb) == 2 and emb[0] == fields.int_of("vocab_size")  # ELECTRA, RemBERT: projected to the width
    if len(emb) != 2 or (emb[1] != dim and not factorised):
        raise CheckpointError(f"{where} says the width is {dim} but the token embedding {embedding_key} is {list(emb)}")
    heads = _option(fields.int_of("num_heads"), num_heads, "`num_heads`", "num_attention_heads", where)
    if heads is None:
        fields.int_of("num_heads", required=True)  # raises, naming the fields looked for
    kv = _option(fields.int_of("num_kv_heads"), num_kv_heads, "`num_kv_heads`", "num_key_value_heads", where) or heads
    assert heads is not None and kv is not None
    head_dim = fields.int_of("head_dim")
    if head_dim is None:
        if dim % heads:
            raise CheckpointError(f"{where}: {heads} attention heads do not divide the width {dim}, and no head_dim")
        head_dim = dim // heads
    if heads % kv:
        raise CheckpointError(f"{where}: {heads} attention heads cannot be grouped over {kv} key/value heads")
    keys = ckpt.keys()
    output_key = family.global_keys.get("output.weight")  # a type with torchtune rows names its own
    return ModelConfig(
        family=family.name, model_type=model_type, num_layers=num_layers, dim=dim, num_heads=heads,
        num_kv_heads=kv, head_dim=head_dim, intermediate_dim=fields.int_of("intermediate_dim") or 4 * dim,
        vocab_size=emb[0], norm_eps=fields.float_of("norm_eps", 1e-6), rope_theta=_theta(fields),
        tie_embeddings=not any(".".join(k.split(".")[-2:]) in _OUTPUT_NAMES or k == output_key for k in keys),
        max_seq_len=_max_positions(doc), activation=fusion_activation(fields.str_of("activation")),
        norm_offset=norm_offset_of(model_type), layer_prefix=layer_prefix, embedding_key=embedding_key,
    )


def _check_layers(ckpt: Checkpoint, prefix: str, num_layers: int, where: str) -> None:
    """Layers 0..num_layers-1 each hold tensors under ``prefix``, and no other index does."""
    seen = set()
    start = prefix + "."
    for key in ckpt.keys():
        if key.startswith(start):
            head = key[len(start):].split(".", 1)[0]
            if head.isdigit():
                seen.add(int(head))
    if seen != set(range(num_layers)):
        missing = sorted(set(range(num_layers)) - seen)[:5]
        extra = sorted(seen - set(range(num_layers)))[:5]
        what = f"missing layer(s) {missing}" if missing else f"layer(s) {extra} beyond it"
        raise CheckpointError(f"{where} says {num_layers} layers, but the tensors under {prefix}.N. disagree: {what}")


def _option(config_value: int | None, option: int | None, flag: str, name: str, where: str) -> int | None:
    if option is not None and option <= 0:
        raise UsageError(f"{flag} must be positive, got {option}")
    if config_value is not None and option is not None and option != config_value:
        raise UsageError(f"{flag} {option} disagrees with {where} ({name} {config_value})")
    return config_value if config_value is not None else option


def _theta(fields: ConfigFields) -> float | None:
    """The RoPE base where the config gives one number for it (informative only here)."""
    for layer in fields.layers:
        params = layer.get("rope_parameters")
        for value in ((params or {}).get("rope_theta") if isinstance(params, dict) else None, layer.get("rope_theta")):
            if is_number(value):
                return float(value)
    return None


def _max_positions(doc: dict[str, Any]) -> int:
    for source in (doc.get("text_config"), doc):
        if isinstance(source, dict):
            for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
                value = source.get(name)
                if is_int(value) and value > 0:
                    return value
    return 4096
