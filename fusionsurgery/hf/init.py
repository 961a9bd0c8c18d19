"""The fusion section's initialisation of a fused transformers model's fusion parameters.

A fused model built from its config (``from_config``, ``_from_config``, the class itself), and a fusion
parameter that transformers initialises because a checkpoint read with transformers' own
``from_pretrained`` lacked it, start as ``fusionsurgery fuse`` starts them (``surgery.plan``): gates
zero (a new block computes the identity), norms an effective scale of one in the section's convention
(``1 - norm_offset`` stored), projections drawn as the section's ``init`` says: ``normal`` with
``init_std``, ``xavier`` (uniform), or ``copy`` of the wrapped layer's own self-attention / MLP
weights (where its layer has them in the Llama names or Phi-3's fused rows, as ``fuse --init copy``
requires; else ``normal``), and the fusion vocabulary ``normal`` with ``init_std`` (as ``fuse`` draws it). The values are drawn with torch's generator (as
transformers draws the base's), not ``fuse``'s reproducible chunked one.
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch.config import FusionConfig
from .blocks import FusionBlock, FusionRMSNorm
from .layers import decoder_layer_list

#: The wrapped layer's weight each fusion projection copies under ``init: copy`` (transformers' Llama names).
COPY_SOURCES = {
    "cross_attn.q_proj": "self_attn.q_proj", "cross_attn.k_proj": "self_attn.k_proj",
    "cross_attn.v_proj": "self_attn.v_proj", "cross_attn.o_proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj", "mlp.down_proj": "mlp.down_proj",
}
#: Phi-3's fused projections: (the layer's module, which part of its rows) per fusion projection.
FUSED_SOURCES = {
    "cross_attn.q_proj": ("self_attn.qkv_proj", 0), "cross_attn.k_proj": ("self_attn.qkv_proj", 1),
    "cross_attn.v_proj": ("self_attn.qkv_proj", 2), "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def _is_loaded(param: torch.Tensor) -> bool:
    """Whether transformers filled ``param`` from a checkpoint (its ``_is_hf_initialized`` mark)."""
    return bool(getattr(param, "_is_hf_initialized", False))


def _copy_source(layer: nn.Module, block: FusionBlock, name: str, shape: torch.Size) -> torch.Tensor | None:
    """The wrapped layer's weight (or row range of a fused one) that ``init: copy`` gives fusion projection
    ``name``, when the layer has one of ``shape``; else None."""
    def weight_of(path: str) -> torch.Tensor | None:
        try:
            weight = layer.get_submodule(path).weight
        except AttributeError:
            return None
        return weight if isinstance(weight, torch.Tensor) else None

    whole = weight_of(COPY_SOURCES[name]) if name in COPY_SOURCES else None
    if whole is not None and whole.shape == shape:
        return whole
    if name not in FUSED_SOURCES:
        return None
    path, part = FUSED_SOURCES[name]
    fused = weight_of(path)
    if fused is None:
        return None
    attn = block.cross_attn
    q, kv = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
    starts = (0, q, q + kv) if path.endswith("qkv_proj") else (0, shape[0])
    rows = fused[starts[part]:starts[part] + shape[0]]
    return rows if rows.shape == shape else None


def _draw(param: torch.Tensor, fusion: FusionConfig, source: torch.Tensor | None = None) -> None:
    """Fill a projection weight as the section's ``init`` says (``source``: what ``copy`` copies)."""
    if fusion.init == "copy" and source is not None:
        param.copy_(source.to(param.dtype))
    elif fusion.init == "xavier" and param.dim() == 2:
        bound = (6.0 / (param.shape[0] + param.shape[1])) ** 0.5
        param.uniform_(-bound, bound)
    else:
        param.normal_(0.0, fusion.init_std)


def init_block(block: FusionBlock, fusion: FusionConfig, layer: nn.Module | None = None,
               skip_loaded: bool = False) -> None:
    """Give ``block``'s parameters the fusion section's initialisation (see the module docstring).

    Args:
        block: a fusion block.
        fusion: the model's fusion section.
        layer: the decoder layer it is attached to (``init: copy`` reads its weights).
        skip_loaded: leave the parameters transformers filled from a checkpoint as they are.
    """
    with torch.no_grad():
        for name, module in block.named_modules():
            for pname, param in module.named_parameters(recurse=False):
                if param.is_meta or (skip_loaded and _is_loaded(param)):
                    continue
                if isinstance(module, FusionRMSNorm):
                    param.fill_(1.0 - module.offset)
                elif module is block:  # the two gates
                    param.zero_()
                else:
                    source = _copy_source(layer, block, name, param.shape) \
                        if fusion.init == "copy" and layer is not None else None
                    _draw(param, fusion, source)


def init_fusion(model: nn.Module, fusion: FusionConfig, skip_loaded: bool = False) -> list[nn.Module]:
    """Initialise every fusion parameter of a fused transformers model as its fusion section says.

    Args:
        model: a fused ``*ForCausalLM`` (``fusionsurgery.hf.fused_class``), fusion blocks attached.
        fusion: its fusion section.
        skip_loaded: only the parameters transformers did not fill from a checkpoint.

    Returns:
        The modules that hold fusion parameters (the blocks and the fusion vocabulary), initialised.
    """

    done: list[nn.Module] = []
    if not any(isinstance(m, FusionBlock) for m in model.modules()):
        return done  # (the base's own __init__ runs this before the blocks are attached)
    for layer in decoder_layer_list(model):
        block = getattr(layer, "fusion_layer", None)
        if isinstance(block, FusionBlock):
            init_block(block, fusion, layer, skip_loaded)
            done.append(block)
    embedding = getattr(model.get_input_embeddings(), "fusion_embedding", None)
    if isinstance(embedding, nn.Embedding):
        if not embedding.weight.is_meta and not (skip_loaded and _is_loaded(embedding.weight)):
            with torch.no_grad():  # normal whatever the init, as fuse draws it (surgery.plan)
                embedding.weight.normal_(0.0, fusion.init_std)
        done.append(embedding)
    return done


def mark_initialised(modules: list[nn.Module]) -> None:
    """Tell transformers' ``initialize_weights`` to leave these modules (and everything in them) alone."""
    for module in modules:
        for sub in module.modules():
            sub._is_hf_initialized = True


__all__ = ["init_block", "init_fusion", "mark_initialised"]

