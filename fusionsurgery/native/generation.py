"""``generate``: autoregressive decoding through the KV caches, for a decoder or a ``DeepFusionModel``.

The prompt is prefilled in one forward pass (the encoder runs once, and the fusion layers' caches
keep its keys/values); then one token per step is fed back, until every sequence has emitted an
end-of-sequence id or ``max_new_tokens`` are written. Greedy with ``temperature=0``, otherwise
sampling with optional top-k and top-p (nucleus) filtering from a ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..modules.caches import caches_are_setup_of, remove_caches, reset_caches_of, setup_caches_of


def generate(model: nn.Module, tokens: torch.Tensor, *, encoder_input: Any = None,
             encoder_mask: torch.Tensor | None = None, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | Iterable[int] | None = None,
             pad_id: int | None = None, generator: torch.Generator | None = None,
             encoder_max_seq_len: int | None = None) -> torch.Tensor:
    """Continue ``tokens [b, s]`` (prompts of equal length) by up to ``max_new_tokens`` tokens.

    Args:
        model: a decoder (``load_fused(path)``, tensor ``encoder_input``) or a ``DeepFusionModel``
            (``encoder_input`` a dict of the encoder's keyword arguments); anything that speaks
            torchtune's forward keywords and cache methods.
        encoder_input: what the model's fusion layers read, or None for text only. It is given to
            the prefill only: the decoding steps read the encoder's keys/values from the caches.
        encoder_mask: True where a token may attend to an encoder position: ``[b, e]`` (every token
            alike, e.g. the encoder's padding mask) or ``[b, S, e]`` for ``S >= s + max_new_tokens``.
        temperature: 0 picks the most likely token (greedy); above 0 samples from
            ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens and to
            the smallest set whose probability reaches ``top_p``.
        eos_id: one id or several; a sequence that emits one is finished, and the rest of its row
            is ``pad_id`` (default: the first eos id, else 0). Decoding stops when all rows are done.
        generator: the random generator of the sampling (reproducible runs).
        encoder_max_seq_len: length of the cross-attention caches; default the encoder input's
            length (a tensor's dim 1, or the longest dim 1 of a dict's tensors). Give it when the
            encoder returns a different number of positions than it reads (image patches).

    Returns:
        torch.Tensor: ``[b, s + n]``, the prompts and ``n <= max_new_tokens`` new tokens. The model's
        caches are set up for the call and removed afterwards (left set up, and reset, when they
        already were).

    Raises:
        ValueError: tokens not ``[b, s]`` with ``s >= 1``; a negative ``max_new_tokens`` or
            ``temperature``; ``top_k < 1`` or ``top_p`` outside (0, 1]; a mask of the wrong shape;
            an encoder length that cannot be told.
    """
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be [batch, seq] with seq >= 1, not {list(tokens.shape)}")
    if max_new_tokens < 0 or temperature < 0:
        raise ValueError("max_new_tokens and temperature must not be negative")
    ids = _ids(eos_id)
    pad = pad_id if pad_id is not None else (ids[0] if ids else 0)
    eos = torch.tensor(ids, dtype=tokens.dtype, device=tokens.device)  # made once, not at every step
    b, s = tokens.shape
    total = s + max_new_tokens
    rows = _mask_rows(encoder_mask, b, total)
    had_caches = caches_are_setup_of(model)
    if had_caches:
        reset_caches_of(model)
    else:
        lengths = {"decoder_max_seq_len": total,
                   "encoder_max_seq_len": encoder_max_seq_len or _encoder_length(encoder_input)}
        setup_caches_of(model, b, _dtype(model), lengths)
    out = tokens
    try:
        with torch.no_grad():
            positions = torch.arange(s, device=tokens.device)
            logits = _last(model(tokens, encoder_input=encoder_input, encoder_mask=rows(positions),
                                 input_pos=positions))
            done = torch.zeros(b, dtype=torch.bool, device=tokens.device)
            for step in range(max_new_tokens):
                nxt = pick(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
                out = torch.cat([out, nxt.masked_fill(done, pad)[:, None]], 1)
                done = done | _is_eos(nxt, eos)  # a finished row still feeds its picks back (never pad_id)
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                positions = torch.tensor([s + step], device=tokens.device)
                logits = _last(model(nxt[:, None], encoder_mask=rows(positions), input_pos=positions))
    finally:
        if had_caches:
            reset_caches_of(model)
        else:
            remove_caches(model)
    return out


def pick(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token ``[b]`` from ``logits [b, vocab]``: argmax at temperature 0, else a filtered sample."""
    if temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, not {top_k}")
        kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {top_p}")
        sorted_scores, order = scores.sort(-1, descending=True)
        probs = sorted_scores.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
        drop = (before >= top_p).scatter(-1, order, before >= top_p)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _ids(eos_id: int | Iterable[int] | None) -> list[int]:
    if eos_id is None:
        return []
    return [int(eos_id)] if isinstance(eos_id, int) else [int(i) for i in eos_id]


def _is_eos(tok: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    return torch.isin(tok, eos)


def _last(logits: Any) -> torch.Tensor:
    if isinstance(logits, (list, tuple)):  # torchtune decoders with output hidden states
        logits = logits[-1]
    return logits[:, -1]


def _dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _encoder_length(encoder_input: Any) -> int:
    if encoder_input is None:
        return 1  # text only: the cross-attention caches stay empty
    if isinstance(encoder_input, torch.Tensor):
        return encoder_input.shape[1]
    if isinstance(encoder_input, Mapping):
        lengths = [v.shape[1] for v in encoder_input.values() if isinstance(v, torch.Tensor) and v.dim() >= 2]
        if lengths:
            return max(lengths)
    raise ValueError("cannot tell the encoder output's length from encoder_input: pass encoder_max_seq_len=")


def _mask_rows(encoder_mask: torch.Tensor | None, batch: int, total: int):
    """A function of positions ``[s]`` giving the ``[b, s, e]`` rows of ``encoder_mask`` (or None)."""
    if encoder_mask is None:
        return lambda positions: None
    mask = encoder_mask.to(torch.bool)
    if mask.dim() == 2:
        return lambda positions: mask[:, None, :].expand(-1, positions.shape[0], -1)
    if mask.dim() != 3 or mask.shape[1] < total:
        raise ValueError(f"encoder_mask must be [batch, e] or [batch, S >= {total}, e], not {list(mask.shape)}")
    return lambda positions: mask[:, positions]
