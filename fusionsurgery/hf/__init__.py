"""Fused checkpoints as native transformers models (the optional ``[hf]`` extra).

``from_pretrained(path)`` opens a fused directory as the base's own transformers class, whatever
the type (``LlamaForCausalLM``, ``Gemma3ForCausalLM``, ``GPT2LMHeadModel``, ``MixtralForCausalLM``,
``Qwen3_5ForCausalLM`` ...: every causal LM transformers builds, see ``docs/models.md``), with a fusion
block attached to each fused decoder layer (found by the ``fusion`` section's ``layer_prefix``, or as
the module list of the config's layer count; whatever a layer takes and returns passes through, only
its hidden states go through the block); ``model(input_ids, cross_attention_states=S, cross_attention_mask=M, labels=L)``,
``model.generate(..., cross_attention_states=S)`` and ``model.save_pretrained(out)`` work as users of
transformers expect. Only `verify` imports this package (lazily, for the forward checks of types
without native modules: `verify/hf_engine.py`).
"""

from __future__ import annotations

from .._requirements import require_hf

require_hf()  # one line naming the release needed when transformers is missing or older than the floor

from .blocks import BlockSpec, FusionBlock
from .loading import FusionSource, from_pretrained, model_class
from .model import fused_class
from .saving import save_fused
from .training import (SELF_ATTENTION_TARGETS, attention_targets, decoder_layers, freeze_all_but_fusion, make_fusion_trainable,
                       shard_with_fsdp2)

__all__ = [
    "BlockSpec", "FusionBlock", "FusionSource", "SELF_ATTENTION_TARGETS", "attention_targets", "decoder_layers", "freeze_all_but_fusion",
    "from_pretrained", "fused_class", "make_fusion_trainable", "model_class", "save_fused", "shard_with_fsdp2",
]
