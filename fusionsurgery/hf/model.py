"""A fused checkpoint as the base's own transformers class, with fusion blocks attached.

``fused_class(LlamaForCausalLM)`` is a subclass (``FusedLlamaForCausalLM``, made once per base class)
whose ``__init__`` builds the base model and then attaches a ``FusionBlock`` as ``fusion_layer`` of
each decoder layer listed in ``config.fusion`` (and a fusion vocabulary to the embeddings), so the
module tree, parameter names and state-dict keys are the fused checkpoint's keys. Its ``forward``
declares Mllama's ``cross_attention_states`` / ``cross_attention_mask``, which travel down to the
decoder layers with transformers' own keyword arguments (so gradient checkpointing and FSDP see them
as inputs; where a release's code drops them on the way, a fused layer takes them from the model's
call in progress, ``EncoderInputs``); ``prepare_inputs_for_generation`` drops the states after the first step of ``generate``,
when every fusion block reads its keys/values from the generation's cache instead.

Decoder layers and embeddings get a fusion-aware subclass of their own class (the instance's
``__class__`` is swapped, as FSDP2's ``fully_shard`` does), so everything else about them is the base's.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
from torch import nn

from ..arch.config import FusionConfig
from .blocks import ENCODER_KV_ATTR, BlockSpec, FusionBlock, FusionRMSNorm, check_mask
from .caching import cached_length, find_cache
from .init import init_block, init_fusion, mark_initialised
from .layers import decoder_layer_list

_CLASSES: dict[type, type] = {}


def fusion_config_of(config: Any) -> FusionConfig:
    """The ``fusion`` section of a transformers config (a clear error when there is none)."""
    doc = getattr(config, "fusion", None)
    if doc is None:
        raise ValueError("the config has no 'fusion' section: this is not a fused checkpoint (fusionsurgery fuse makes one)")
    return FusionConfig.from_dict(doc)


# ------------------------------------------------------------------------ decoder layers
class FusedDecoderLayerMixin:
    """Runs ``self.fusion_layer`` before (``fusion_first``) or after the original decoder layer.

    Whatever the layer takes (position embeddings, masks, caches, per-layer inputs) and returns (a
    tensor, or a tuple with attention weights, router logits, ...) passes through untouched: only the
    hidden states (the first positional argument, or ``hidden_states=``; the first element of a tuple
    output) go through the fusion block.
    """

    fusion_layer: FusionBlock
    fusion_first: bool = True
    #: the encoder inputs of the model's current call (shared by the model's fused layers; see ``EncoderInputs``)
    fusion_inputs: "EncoderInputs | None" = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Where the base's own code dropped the encoder inputs on the way down (GPT-2's head and StableLM's
        # model in transformers 5.0 do not pass their keyword arguments on), they come from the model's call.
        # Added here, before transformers' gradient checkpointing wraps the call, so that a recomputation
        # in the backward pass sees them too.
        inputs = self.fusion_inputs
        if inputs is not None:
            for name, value in inputs.items():
                if value is not None and kwargs.get(name) is None:
                    kwargs[name] = value
        return super().__call__(*args, **kwargs)

    def forward(self, *args: Any, cross_attention_states: torch.Tensor | None = None,
                cross_attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        cache = find_cache(args, kwargs)
        if self.fusion_first:
            if args:
                args = (self.fusion_layer(args[0], cross_attention_states, cross_attention_mask, cache), *args[1:])
            else:
                kwargs["hidden_states"] = self.fusion_layer(kwargs["hidden_states"], cross_attention_states,
                                                            cross_attention_mask, cache)
            return super().forward(*args, **kwargs)
        out = super().forward(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return self.fusion_layer(out, cross_attention_states, cross_attention_mask, cache)
        if isinstance(out, (tuple, list)):
            return type(out)((self.fusion_layer(out[0], cross_attention_states, cross_attention_mask, cache), *out[1:]))
        raise TypeError(f"{type(self).__name__} returned a {type(out).__name__}; a fusion block after the layer "
                        "needs a tensor or a tuple whose first element is the hidden states (fuse without "
                        "--fusion-after)")


class EncoderInputs(dict):
    """The encoder states and mask of a fused model's call in progress (empty between calls).

    The fused ``*ForCausalLM`` fills it for the duration of its ``forward``; its fused decoder layers
    read it where the keyword arguments they were called with lack the encoder inputs.
    """


class FusionEmbeddingMixin:
    """Token ids ``>= num_embeddings`` read a second table, ``fusion_embedding`` (torchtune's FusionEmbedding).

    The original table keeps its key; whatever the base class does after the lookup (Gemma scales
    by sqrt(width): its ``embed_scale``) applies to the fusion rows too, as in ``load_fused``.
    """

    fusion_embedding: nn.Embedding

    def fusion_params(self) -> list[str]:
        return ["fusion_embedding.weight"]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        vocab = self.num_embeddings
        extra = input_ids >= vocab
        base = super().forward(input_ids.clamp(max=vocab - 1))
        rows = (input_ids - vocab).clamp(min=0, max=self.fusion_embedding.num_embeddings - 1)
        fused = self.fusion_embedding(rows)
        scale = getattr(self, "embed_scale", None)
        if isinstance(scale, torch.Tensor):
            fused = fused * scale.to(fused.dtype)
        return torch.where(extra[..., None], fused.to(base.dtype), base)


def _with_mixin(mixin: type, cls: type) -> type:
    """``Fused<cls>``: ``mixin`` in front of ``cls``, made once and importable from this module (pickle)."""
    if issubclass(cls, mixin):
        return cls
    key = (mixin, cls)
    if key not in _CLASSES:
        name = f"Fused{cls.__name__}"
        new = type(name, (mixin, cls), {"__module__": __name__, "__qualname__": name})
        _CLASSES[key] = new
        setattr(sys.modules[__name__], name, new)
    return _CLASSES[key]


def attach_fusion(model: nn.Module, config: Any) -> None:
    """Attach fusion blocks (and the fusion vocabulary) to a freshly built ``*ForCausalLM``.

    Raises:
        ValueError: when the decoder layers cannot be found or ``fusion.layers`` are not among them.
    """
    fusion = fusion_config_of(config)
    spec = BlockSpec.from_config(config, fusion)
    layers = decoder_layer_list(model)
    n = len(layers)
    bad = [i for i in fusion.layers if not 0 <= i < n]
    if bad or not fusion.layers:
        raise ValueError(f"config.fusion.layers {fusion.layers} are not layers of this {n}-layer model")
    inputs = EncoderInputs()
    model.fusion_inputs = inputs
    for i in fusion.layers:
        layer = layers[i]
        layer.__class__ = _with_mixin(FusedDecoderLayerMixin, type(layer))
        layer.fusion_first = fusion.fusion_first
        layer.fusion_inputs = inputs
        layer.fusion_layer = FusionBlock(spec, i)
    if fusion.fusion_vocab:
        embed = model.get_input_embeddings()
        embed.__class__ = _with_mixin(FusionEmbeddingMixin, type(embed))
        embed.fusion_embedding = nn.Embedding(fusion.fusion_vocab, spec.dim)


# ------------------------------------------------------------------------ the model class
class FusedCausalLMMixin:
    """What a fused ``*ForCausalLM`` adds to the base class: see the module docstring."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        attach_fusion(self, config)
        # the base's own __init__ initialised its weights before the blocks existed: the fusion section's init
        # now (a no-op on the meta device, where from_pretrained builds the model before loading)
        init_fusion(self, self.fusion)
        #: where the weights came from (set by ``fusionsurgery.hf.from_pretrained``; ``save_pretrained`` reads it)
        self.fusion_source = None

    @property
    def fusion(self) -> FusionConfig:
        return fusion_config_of(self.config)

    @classmethod
    def is_custom_code(cls) -> bool:
        """The base class's answer: transformers treats "custom code" differently when it initialises
        buffers the checkpoint does not hold (Falcon-H1's ``mup_vector`` stayed uninitialised) and when
        it looks up key conversions; a fused class is the base's own code plus fusion blocks."""
        return _base_of(cls).is_custom_code()

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """The base class's answer. transformers decides it by reading the source file of the class's module
        (for a fused class, this one): the fused class would get the eager attention where the base gets SDPA."""
        return _base_of(cls)._can_set_attn_implementation()

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        """The base class's answer, as for the attention: otherwise a mixture-of-experts type (PhiMoE, GPT-OSS,
        Qwen3-MoE) runs its experts eagerly where the base runs them grouped, and the logits differ."""
        return _base_of(cls)._can_set_experts_implementation()

    def initialize_weights(self) -> None:
        """transformers' initialisation of whatever a checkpoint did not fill, with the fusion parameters
        initialised first as the fusion section says (``hf.init``) and then left alone by the base's
        ``_init_weights`` (which knows neither the gates nor the section's init, and which transformers calls
        with the base model's class for the modules below it)."""
        mark_initialised(init_fusion(self, self.fusion, skip_loaded=True))
        super().initialize_weights()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, FusionBlock):  # closed gates: a new block computes the identity
            layer = decoder_layer_list(self)[module.layer_idx]
            init_block(module, self.fusion, layer if getattr(layer, "fusion_layer", None) is module else None)
        elif isinstance(module, FusionRMSNorm):  # the base's init knows its own norms' convention, not ours
            with torch.no_grad():
                module.weight.fill_(1.0 - module.offset)

    def forward(self, *args: Any, cross_attention_states: torch.Tensor | None = None,
                cross_attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The base's forward, plus encoder states ``[b, e, encoder_dim]`` and a mask ``[b, e]`` or
        ``[b, s, e]`` (true where a token may attend; an all-false row leaves that token text-only)."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        seq = (ids if ids is not None else embeds).shape[1]
        check_mask(cross_attention_states, cross_attention_mask, seq)
        if cross_attention_states is not None:
            kwargs["cross_attention_states"] = cross_attention_states
        if cross_attention_mask is not None:
            kwargs["cross_attention_mask"] = cross_attention_mask
        inputs = getattr(self, "fusion_inputs", None)
        if inputs is None:
            return super().forward(*args, **kwargs)
        inputs.update(cross_attention_states=cross_attention_states, cross_attention_mask=cross_attention_mask)
        try:
            return super().forward(*args, **kwargs)
        finally:
            inputs.clear()

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """After the first step the encoder keys/values are in the cache: stop passing the states,
        and give a per-token mask ``[b, s, e]`` the rows of the new tokens (later tokens repeat its last row)."""
        first = kwargs.get("is_first_iteration")
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        cache = inputs.get("cache", inputs.get("past_key_values"))
        if first is None:
            first = cache is None or cached_length(cache, inputs) == 0
        if not first and cache is not None and getattr(cache, ENCODER_KV_ATTR, None):
            inputs["cross_attention_states"] = None
        mask = inputs.get("cross_attention_mask")
        if mask is not None and mask.dim() == 3:
            ids = inputs.get("input_ids")
            new = (ids if ids is not None else inputs["inputs_embeds"]).shape[1]
            start = cached_length(cache, inputs) if cache is not None else 0
            if start == 0 and new == mask.shape[1]:
                return inputs
            rows = torch.arange(start, start + new, device=mask.device).clamp(max=mask.shape[1] - 1)
            inputs["cross_attention_mask"] = mask[:, rows]
        return inputs

    def save_pretrained(self, save_directory: Any, *args: Any, state_dict: dict[str, torch.Tensor] | None = None,
                        is_main_process: bool = True, **kwargs: Any) -> None:
        """Write a fused directory in fusionsurgery's layout (see ``fusionsurgery.hf.saving``)."""
        from .saving import save_fused

        if kwargs.get("push_to_hub"):
            raise ValueError("push_to_hub is not supported: save, then upload the directory")
        if is_main_process:
            save_fused(self, save_directory, state_dict=state_dict)


def _base_of(cls: type) -> type:
    """The base's own ``*ForCausalLM`` class of a fused class."""
    return next(c for c in cls.__mro__[1:] if not issubclass(c, FusedCausalLMMixin))


def fused_class(base_cls: type) -> type:
    """``Fused<base_cls>``: the base's own ``*ForCausalLM`` class with fusion blocks (made once per class)."""
    if issubclass(base_cls, FusedCausalLMMixin):
        return base_cls
    cls = _with_mixin(FusedCausalLMMixin, base_cls)
    if "_fused_layer_names" not in cls.__dict__:
        # device_map / FSDP auto-wrap never split a fused layer from its fusion block
        layer_names = list(getattr(base_cls, "_no_split_modules", None) or [])
        cls._no_split_modules = layer_names + [f"Fused{name}" for name in layer_names]
        cls._fused_layer_names = True

        def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            return FusedCausalLMMixin.forward(self, *args, **kwargs)

        forward.__doc__ = FusedCausalLMMixin.forward.__doc__
        forward.__signature__ = _forward_signature(base_cls.forward)  # type: ignore[attr-defined]
        cls.forward = forward
        _share_conversion_mapping(base_cls, cls)
    return cls


def _share_conversion_mapping(base_cls: type, cls: type) -> None:
    """Give ``cls`` the checkpoint key conversions transformers keeps under ``base_cls``'s name (GPT-NeoX
    stores its head as ``embed_out``), so loading and saving rename keys as for the base class."""
    try:
        from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                                     register_checkpoint_conversion_mapping)
    except ImportError:  # older transformers: no key conversions
        return
    mapping = get_checkpoint_conversion_mapping(base_cls.__name__)
    if mapping is not None and get_checkpoint_conversion_mapping(cls.__name__) is None:
        register_checkpoint_conversion_mapping(cls.__name__, mapping)


def _forward_signature(base_forward: Any) -> inspect.Signature:
    """The base forward's signature plus the two encoder arguments (``generate`` validates kwargs by it)."""
    sig = inspect.signature(base_forward)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
             for name in ("cross_attention_states", "cross_attention_mask") if name not in sig.parameters]
    tail = [p for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    return sig.replace(parameters=params + extra + tail)
