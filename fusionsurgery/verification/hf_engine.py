"""The transformers engine: ``verify``'s forward checks for a type without native modules.

The base is the base's own transformers class reading the original tensors alone; the fused model
is ``fusionsurgery.hf``'s (that class with fusion blocks attached). Both run the same probe, and the
measurements are those of the plain engine (``plain.run_plain``): logits with closed and opened
gates, each block's response to the encoder, one backward pass with the base frozen, token-by-token
decoding through transformers' own cache (whatever cache the type uses: attention, sliding window,
linear attention, state space), and forward throughput.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from ..io.checkpoint import Checkpoint
from .outputs import GradInfo, Outputs
from .plain import backward_once, bench_forward, module_bytes
from .probe import Probe, block_sensitivity, captured_inputs, gate_values, opened_gates


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' loader reports the fusion tensors as unexpected when the base class reads a fused
    directory, and draws progress bars: neither belongs in verify's report."""
    import transformers

    level = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def load_models(ckpt: Checkpoint, extra: list[Checkpoint], device: torch.device, dtype: torch.dtype,
                fused: bool) -> Any:
    """The base model (``fused=False``) or the fused one, in eval mode on ``device``."""
    from ..hf.loading import load_checkpoint

    with _quiet_transformers():
        model = load_checkpoint(ckpt, extra, fused=fused, dtype=dtype)
    return model.to(device).eval()


def hf_blocks(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """``{layer index: fusion block}`` of a ``fusionsurgery.hf`` model."""
    from ..hf.layers import decoder_layer_list

    return {i: layer.fusion_layer for i, layer in enumerate(decoder_layer_list(model)) if hasattr(layer, "fusion_layer")}


def run_hf(ckpt: Checkpoint, extra: list[Checkpoint], device: torch.device, dtype: torch.dtype, probe: Probe, *,
           bench_len: int) -> Outputs:
    """Every measurement of the forward checks, through transformers (see the module docstring).

    Args:
        ckpt (Checkpoint): the fused checkpoint (an adapter attached to its base).
        extra (list[Checkpoint]): an adapter's base, whose config and sidecars are read first.
        device (torch.device): where both models run.
        dtype (torch.dtype): their dtype.
        probe (Probe): tokens and encoder inputs.
        bench_len (int): tokens per pass of the throughput figure.

    Returns:
        Outputs: what ``numerics`` judges.
    """
    base = load_models(ckpt, extra, device, dtype, fused=False)
    with torch.no_grad():
        base_logits = base(probe.tokens).logits
    del base
    model = load_models(ckpt, extra, device, dtype, fused=True)
    blocks = hf_blocks(model)
    tokens, enc_a = probe.tokens, probe.enc_a
    with torch.no_grad():
        text = model(tokens).logits
        enc = model(tokens, cross_attention_states=enc_a).logits
    with opened_gates(blocks) as restored, torch.no_grad():
        with captured_inputs(blocks) as inputs:
            open_a = model(tokens, cross_attention_states=enc_a).logits
        open_b = model(tokens, cross_attention_states=probe.enc_b).logits
        sensitivity = {i: block_sensitivity(b, inputs[i], enc_a, probe.enc_b) for i, b in blocks.items()}
    train_finite, loss, grads, leaked = _backward(model, blocks, probe)
    decode, reset, after = _decode(model, blocks, probe)
    vocab = model.get_input_embeddings().weight.shape[0]
    figures = bench_forward(lambda t, e: model(t, cross_attention_states=e), vocab, probe, bench_len)
    figures["resident_weight_bytes"] = module_bytes(model)
    figures["engine"] = f"transformers {type(model).__name__}"
    return Outputs(gate_values(blocks), base_logits, text, enc, open_a, open_b, sensitivity, restored[0],
                   train_finite, loss, grads, leaked, decode, reset, after, figures)


def _backward(model: torch.nn.Module, blocks: dict, probe: Probe) -> tuple[bool, float, dict[str, GradInfo], list[str]]:
    """Freeze the base, open the gates, one backward pass: which parameters got gradients."""
    from ..hf.training import freeze_all_but_fusion

    fusion_params = freeze_all_but_fusion(model)
    return backward_once(model, fusion_params, blocks, probe,
                         lambda: model(probe.train_tokens, cross_attention_states=probe.enc_a).logits)


def _decode(model: torch.nn.Module, blocks: dict, probe: Probe) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Token-by-token decoding through transformers' cache (gates opened; the encoder states at the
    first step only, later steps read their keys/values from the cache), then a text-only prefill
    through a fresh cache: it must not see the earlier encoder input."""
    from ..hf.blocks import ENCODER_KV_ATTR

    tokens = probe.tokens
    problems: list[str] = []
    # transformers 5 renames ``past_key_values`` to ``cache`` (the old name is deprecated where the new exists)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with opened_gates(blocks), torch.no_grad():
        out = model(tokens[:, :1], cross_attention_states=probe.enc_a, use_cache=True)
        cache, steps = _returned_cache(out), [out.logits]
        if cache is None:
            problems.append("the model returned no cache with use_cache=True")
        stored = getattr(cache, ENCODER_KV_ATTR, None) or {}
        missing = sorted(set(blocks) - set(stored))
        if missing:
            problems.append(f"the cache holds no encoder keys/values for fusion layer(s) {missing}")
        for t in range(1, tokens.shape[1]):
            out = model(tokens[:, t:t + 1], use_cache=True, **{cache_kw: cache})
            cache = _returned_cache(out)
            steps.append(out.logits)
        fresh = model(tokens, use_cache=True)
        if getattr(_returned_cache(fresh), ENCODER_KV_ATTR, None):
            problems.append("a new cache holds encoder keys/values without an encoder input")
        after = fresh.logits
    return torch.cat(steps, 1), problems, after


def _returned_cache(out: Any) -> Any:
    """The cache a transformers forward returned: ``cache`` in transformers 5's outputs (reading the old
    ``past_key_values`` name there warns that it is deprecated), ``past_key_values`` before."""
    return out["cache"] if "cache" in out else out.get("past_key_values")
