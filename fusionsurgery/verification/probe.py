"""Inputs for the numeric checks, and helpers on fusion blocks: gates, captured inputs, caches."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..arch.config import FusionConfig, ModelConfig
from ..modules import FusionLayer, GatedCrossAttentionLayer

#: Gate value while the fusion path is opened (tanh(1) = 0.76 of each update passes).
OPEN_GATE = 1.0


@dataclass
class Probe:
    """Random tokens and two different random encoder inputs, on the device."""

    tokens: torch.Tensor  # [b, s], ids < vocab_size (the base model reads them too)
    train_tokens: torch.Tensor  # [b, s], a few fusion-vocab ids when there is a fusion vocab
    targets: torch.Tensor  # [b, s]
    enc_a: torch.Tensor  # [b, e, encoder_dim]
    enc_b: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        b, s = self.tokens.shape
        return b, s, self.enc_a.shape[1]


def make_probe(cfg: ModelConfig, fusion: FusionConfig, device: torch.device, dtype: torch.dtype, *,
               batch: int = 2, seq_len: int = 16, encoder_len: int = 8, seed: int = 0) -> Probe:
    """Deterministic probe inputs (same seed, same inputs on every device)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=g)
    train = tokens.clone()
    if fusion.fusion_vocab:
        extra = torch.randint(0, fusion.fusion_vocab, (batch, max(1, seq_len // 4)), generator=g)
        train[:, : extra.shape[1]] = cfg.vocab_size + extra
    targets = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=g)
    enc_dim = fusion.encoder_dim or cfg.dim
    enc_a = torch.randn(batch, encoder_len, enc_dim, generator=g)
    enc_b = torch.randn(batch, encoder_len, enc_dim, generator=g)
    return Probe(*(t.to(device) for t in (tokens, train, targets)), enc_a.to(device, dtype), enc_b.to(device, dtype))


def fusion_blocks(layers: dict[int, nn.Module]) -> dict[int, GatedCrossAttentionLayer]:
    """``{layer index: gated cross-attention block}`` of the ``FusionLayer``s among ``layers``."""
    return {i: layer.fusion_layer for i, layer in layers.items() if isinstance(layer, FusionLayer)}


def gate_parameters(block: nn.Module) -> tuple[nn.Parameter, nn.Parameter]:
    """(attention gate, MLP gate) of a fusion block: a native block's ``ca_scale`` / ``mlp_scale`` scales,
    or a ``fusionsurgery.hf`` block's ``cross_attn_attn_gate`` / ``cross_attn_mlp_gate``."""
    if hasattr(block, "cross_attn_attn_gate"):
        return block.cross_attn_attn_gate, block.cross_attn_mlp_gate
    return block.ca_scale.scale, block.mlp_scale.scale


def run_block(block: nn.Module, x: torch.Tensor, encoder: torch.Tensor) -> torch.Tensor:
    """One fusion block on hidden states ``x`` with encoder states, whichever engine's block it is."""
    if hasattr(block, "cross_attn_attn_gate"):
        return block(x, encoder)
    return block(x, encoder_input=encoder)


def gate_values(blocks: dict[int, nn.Module]) -> dict[int, dict[str, float]]:
    out = {}
    for i, b in blocks.items():
        attn, mlp = gate_parameters(b)
        out[i] = {"attn": float(attn.detach().float().reshape(-1)[0]), "mlp": float(mlp.detach().float().reshape(-1)[0])}
    return out


@contextmanager
def opened_gates(blocks: dict[int, nn.Module], value: float = OPEN_GATE) -> Iterator[list[bool]]:
    """Set every gate to ``value`` for the duration; restores the exact stored values after.

    Yields a one-element list that holds, after the block, whether every gate came back bit-identical.
    """
    gates = {i: gate_parameters(b) for i, b in blocks.items()}
    saved = {i: (a.detach().clone(), m.detach().clone()) for i, (a, m) in gates.items()}
    restored = [False]
    with torch.no_grad():
        for a, m in gates.values():
            a.fill_(value)
            m.fill_(value)
    try:
        yield restored
    finally:
        with torch.no_grad():
            for i, (a, m) in gates.items():
                a.copy_(saved[i][0])
                m.copy_(saved[i][1])
        restored[0] = all(torch.equal(a, saved[i][0]) and torch.equal(m, saved[i][1]) for i, (a, m) in gates.items())


@contextmanager
def captured_inputs(blocks: dict[int, nn.Module]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the hidden state each block receives (its first positional argument)."""
    seen: dict[int, torch.Tensor] = {}
    handles = [b.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].detach().clone()))
               for i, b in blocks.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def block_sensitivity(block: nn.Module, x: torch.Tensor, enc_a: torch.Tensor, enc_b: torch.Tensor) -> float:
    """How much of a block's update depends on the encoder input: max|f(x,a) - f(x,b)| / max|f(x,a) - x|."""
    with torch.no_grad():
        ya, yb = run_block(block, x, enc_a), run_block(block, x, enc_b)
    update = (ya.float() - x.float()).abs().max().item()
    delta = (ya.float() - yb.float()).abs().max().item()
    return delta / update if update > 0 else 0.0


def cache_problems(module: nn.Module, where: str = "") -> list[str]:
    """What is still in the KV caches of ``module`` (empty after a correct ``reset_cache``)."""
    problems = []
    for name, m in module.named_modules():
        cache = getattr(m, "kv_cache", None)
        if cache is None:
            continue
        label = f"{where}{name}"
        if cache.size != 0:
            problems.append(f"{label}: cache still holds {cache.size} position(s)")
        elif bool(cache.k_cache.any()) or bool(cache.v_cache.any()):
            problems.append(f"{label}: cache buffers not cleared")
        if getattr(m, "has_cached_input", False):
            problems.append(f"{label}: cross-attention still sees a cached encoder input")
    return problems


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()
