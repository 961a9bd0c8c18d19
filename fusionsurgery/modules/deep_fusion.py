"""``DeepFusionModel``: a pretrained encoder feeding a (fused) decoder, torchtune's contract.

Works with any decoder that takes torchtune's keywords (``tokens``, ``mask``, ``encoder_input``,
``encoder_mask``, ``input_pos``) and any encoder called with keyword arguments: ours
(``DeepFusionModel(load_fused(path), my_encoder)``) or torchtune's own.

Deep (cross-attention) fusion, as opposed to early fusion of encoder tokens into the input sequence:
Flamingo (https://arxiv.org/abs/2204.14198), Llama 3.2 Vision (https://arxiv.org/abs/2407.21783).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .caches import CacheMethods, caches_are_enabled_of, caches_are_setup_of, reset_caches_of, setup_caches_of
from .fusion import get_fusion_params, register_fusion_module, set_trainable_params
from .masks import rows_for_positions


class ProjectedEncoder(nn.Module):
    """``projection(encoder(**kwargs))``: fits an encoder's output width to what the decoder reads.

    The projection is registered as a fusion module (trainable with the fusion parameters). Its
    keys: ``encoder.*`` (the encoder's own) and ``projection.*``.

    Args:
        encoder: returns ``[b, e, in_dim]`` from its keyword arguments.
        projection: maps ``[b, e, in_dim]`` to ``[b, e, encoder_dim]``.
    """

    def __init__(self, encoder: nn.Module, projection: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.projection = register_fusion_module(projection)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.projection(self.encoder(*args, **kwargs))


def project_encoder(encoder: nn.Module, in_dim: int, out_dim: int, *, bias: bool = False) -> ProjectedEncoder:
    """``encoder`` followed by a new linear projection ``in_dim -> out_dim`` (a fusion module).

    Args:
        encoder: returns ``[b, e, in_dim]``.
        in_dim: the encoder's output width.
        out_dim: the width the fusion layers read (the checkpoint's ``encoder_dim``).
        bias: give the projection a bias.

    Returns:
        ProjectedEncoder: returns ``[b, e, out_dim]``.
    """
    return ProjectedEncoder(encoder, nn.Linear(in_dim, out_dim, bias=bias))


class DeepFusionModel(CacheMethods, nn.Module):
    """An encoder whose output feeds the fusion layers of a decoder; one module to train and save.

    Args:
        decoder: a decoder taking torchtune's keywords, e.g. ``load_fused(path)``.
        encoder: called as ``encoder(**encoder_input)``; returns ``[b, e, d_e]``.
        decoder_trainable / encoder_trainable: train the decoder's / encoder's own parameters.
        fusion_trainable: train the fusion parameters (``get_fusion_params``: fusion layers,
            fusion embeddings, modules given to ``register_fusion_module``), wherever they sit; with
            False they stay frozen even inside a trainable decoder or encoder.
        encoder_width: the width ``d_e`` the encoder returns, when it differs from the width the
            decoder's fusion layers read (``decoder.encoder_dim``): a new linear projection (a fusion
            parameter) maps one to the other, and ``self.encoder`` is a ``ProjectedEncoder``.

    Cache methods (both torchtune spellings) are the decoder's. State-dict keys: ``decoder.*``,
    ``encoder.*``.
    """

    def __init__(self, decoder: nn.Module, encoder: nn.Module, *, decoder_trainable: bool = False,
                 encoder_trainable: bool = False, fusion_trainable: bool = True,
                 encoder_width: int | None = None) -> None:
        super().__init__()
        _check_decoder(decoder)
        self.decoder = decoder
        self.encoder = _fit_width(encoder, encoder_width, decoder)
        trainable: set[str] = set()
        if encoder_trainable:
            trainable |= {f"encoder.{name}" for name, _ in self.encoder.named_parameters()}
        if decoder_trainable:
            trainable |= {f"decoder.{name}" for name, _ in self.decoder.named_parameters()}
        fusion = set(get_fusion_params(self))
        trainable = trainable | fusion if fusion_trainable else trainable - fusion
        set_trainable_params(self, trainable)

    # -- caches: the decoder's ---------------------------------------------------------------
    def _setup_caches(self, batch_size: int, dtype: torch.dtype, lengths: dict[str, int]) -> None:
        setup_caches_of(self.decoder, batch_size, dtype, lengths)

    def _reset_caches(self) -> None:
        reset_caches_of(self.decoder)

    def _caches_are_setup(self) -> bool:
        return caches_are_setup_of(self.decoder)

    def _caches_are_enabled(self) -> bool:
        return caches_are_enabled_of(self.decoder)

    def forward(self, tokens: torch.Tensor, *, mask: torch.Tensor | None = None,
                encoder_input: Mapping[str, Any] | None = None, encoder_mask: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None) -> Any:
        """The decoder's output for ``tokens [b, s]``, reading ``encoder(**encoder_input)``.

        ``mask [b, s, s]``: self-attention mask (True: may attend; default causal).
        ``encoder_input``: the encoder's keyword arguments, or None (text only, or while decoding,
        when the decoder's cross-attention caches hold the encoder's keys/values).
        ``encoder_mask``: ``[b, s, e]`` (True: token may attend to that encoder position); while
        decoding, either these rows or the whole sequence's ``[b, S, e]``, sliced by ``input_pos``.
        ``input_pos``: ``[s]`` or ``[b, s]`` positions of ``tokens``.
        """
        embeds = None
        if encoder_input is not None:
            if not isinstance(encoder_input, Mapping):
                raise TypeError("encoder_input is a dict of the encoder's keyword arguments, "
                                f"not {type(encoder_input).__name__}")
            embeds = self.encoder(**encoder_input)
        encoder_mask = rows_for_positions(encoder_mask, input_pos, tokens.shape[1])
        return self.decoder(tokens=tokens, mask=mask, encoder_input=embeds, encoder_mask=encoder_mask,
                            input_pos=input_pos)


def _check_decoder(decoder: nn.Module) -> None:
    """Refuse, in one line, a decoder that speaks transformers' keywords instead of torchtune's."""
    params = inspect.signature(decoder.forward).parameters
    if "input_ids" in params and "tokens" not in params:
        raise TypeError(f"{type(decoder).__name__} takes input_ids, not torchtune's tokens/encoder_input: "
                        "call a fusionsurgery.hf model with cross_attention_states= (project_encoder fits the "
                        "encoder's width), or pair DeepFusionModel with load_fused(path)")


def _fit_width(encoder: nn.Module, width: int | None, decoder: nn.Module) -> nn.Module:
    if width is None:
        return encoder
    target = getattr(decoder, "encoder_dim", None)
    if not isinstance(target, int):
        raise ValueError("encoder_width given, but the decoder does not say which width its fusion layers read "
                         "(no encoder_dim): wrap the encoder with project_encoder(encoder, in_dim, out_dim)")
    return encoder if width == target else project_encoder(encoder, width, target)
