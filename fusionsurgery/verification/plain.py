"""The plain engine: the whole fused model on the device, driven through its public API.

``load_fused``-style model, ``model(tokens, encoder_input=...)``, ``get_fusion_params``,
``setup_cache`` / ``reset_cache``; the text-only base is built separately (no fusion) and loaded
with the original tensors only.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..arch.config import FusionConfig, ModelConfig
from ..native.builders import build_empty
from ..errors import CheckpointError
from ..io.checkpoint import Checkpoint
from ..native.loading import load_tensors
from ..modules import TransformerDecoder, get_fusion_params, set_trainable_params
from .outputs import GradInfo, Outputs
from ..modules.caches import remove_caches
from .probe import (Probe, block_sensitivity, cache_problems, captured_inputs, fusion_blocks,
                    gate_values, opened_gates)


def load_base(ckpt: Checkpoint, cfg: ModelConfig, original_keys: list[str], device: torch.device,
              dtype: torch.dtype) -> TransformerDecoder:
    """The text-only decoder (no fusion at all) with the original tensors of ``ckpt``."""
    model = build_empty(cfg, None, dtype=dtype, device=device)
    targets = model.state_dict(keep_vars=True)
    if set(targets) != set(original_keys):
        raise CheckpointError(f"{ckpt.root}: the original tensors do not form the base model its config describes")
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(ckpt.read_tensor(key))
    return model.eval()


def load_fused_model(ckpt: Checkpoint, cfg: ModelConfig, fusion: FusionConfig, device: torch.device,
                     dtype: torch.dtype) -> TransformerDecoder:
    model = build_empty(cfg, fusion, dtype=dtype, device=device)
    load_tensors(model, ckpt)
    return model.eval()


def base_logits(base: TransformerDecoder, probe: Probe) -> torch.Tensor:
    with torch.no_grad():
        return base(probe.tokens)


def run_plain(model: TransformerDecoder, base: torch.Tensor, probe: Probe, *, bench_len: int) -> Outputs:
    """Run every measurement on the fused ``model``; ``base`` holds the base model's logits for the probe."""
    blocks = fusion_blocks(dict(enumerate(model.layers)))
    tokens = probe.tokens
    with torch.no_grad():
        text = model(tokens)
        enc = model(tokens, encoder_input=probe.enc_a)
    with opened_gates(blocks) as restored, torch.no_grad():
        with captured_inputs(blocks) as inputs:
            open_a = model(tokens, encoder_input=probe.enc_a)
        open_b = model(tokens, encoder_input=probe.enc_b)
        sensitivity = {i: block_sensitivity(blk, inputs[i], probe.enc_a, probe.enc_b) for i, blk in blocks.items()}
    train_finite, loss, grads, leaked = _backward(model, blocks, probe)
    decode, reset, after = _decode(model, blocks, probe)
    figures = bench_forward(lambda t, e: model(t, encoder_input=e), model.tok_embeddings.weight.shape[0], probe,
                            bench_len)
    figures["resident_weight_bytes"] = module_bytes(model)
    return Outputs(gate_values(blocks), base, text, enc, open_a, open_b, sensitivity, restored[0],
                   train_finite, loss, grads, leaked, decode, reset, after, figures)


def _backward(model: TransformerDecoder, blocks: dict, probe: Probe) -> tuple[bool, float, dict[str, GradInfo], list[str]]:
    """Freeze the base, open the gates, one backward pass: which parameters got gradients."""
    fusion_params = get_fusion_params(model)
    set_trainable_params(model, fusion_params)
    return backward_once(model, fusion_params, blocks, probe,
                         lambda: model(probe.train_tokens, encoder_input=probe.enc_a))


def backward_once(model: torch.nn.Module, fusion_params: dict[str, torch.nn.Parameter], blocks: dict, probe: Probe,
                  forward: Callable[[], torch.Tensor]) -> tuple[bool, float, dict[str, GradInfo], list[str]]:
    """One backward pass through ``forward()`` (logits ``[b, s, vocab]``) with the gates opened.

    Args:
        model (torch.nn.Module): the fused model, only ``fusion_params`` trainable.
        fusion_params (dict[str, torch.nn.Parameter]): the parameters that should get gradients.
        blocks (dict): ``{layer: fusion block}`` whose gates are opened for the pass.
        probe (Probe): the targets of the loss.
        forward (Callable[[], torch.Tensor]): runs the model on the probe's training tokens.

    Returns:
        tuple: (logits finite, loss, gradient figures per fusion parameter, base parameters that got one).
    """
    model.zero_grad(set_to_none=True)
    with opened_gates(blocks):
        logits = forward()
        loss = F.cross_entropy(logits.float().flatten(0, 1), probe.targets.flatten())
        loss.backward()
    grads = {name: grad_info(p.grad) for name, p in fusion_params.items()}
    leaked = [n for n, p in model.named_parameters() if n not in fusion_params and p.grad is not None]
    finite = bool(torch.isfinite(logits).all())
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    return finite, float(loss.detach()), grads, leaked


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (KV caches included)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def grad_info(grad: torch.Tensor | None) -> GradInfo:
    if grad is None:
        return GradInfo(False, False, False)
    return GradInfo(True, bool(torch.isfinite(grad).all()), bool(grad.any()))


def _decode(model: TransformerDecoder, blocks: dict, probe: Probe) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Token-by-token decoding through KV caches (gates opened), then ``reset_cache`` and a text-only prefill."""
    b, s, e = probe.shape
    tokens = probe.tokens
    model.setup_cache(b, probe.enc_a.dtype, encoder_max_seq_len=e, decoder_max_seq_len=s)
    try:
        with opened_gates(blocks), torch.no_grad():
            steps = [model(tokens[:, :1], encoder_input=probe.enc_a)]
            steps += [model(tokens[:, t:t + 1]) for t in range(1, s)]
            model.reset_cache()
            problems = cache_problems(model)
            after = model(tokens)
    finally:
        remove_caches(model)
    return torch.cat(steps, 1), problems, after


def bench_forward(forward: Callable[[torch.Tensor, torch.Tensor], object], vocab: int, probe: Probe,
                  bench_len: int) -> dict[str, float]:
    """Forward throughput: one sequence of ``bench_len`` tokens with an encoder input, after a warm-up.

    Args:
        forward: runs the model on ``(tokens [1, bench_len], encoder states [1, e, encoder_dim])``.
        vocab (int): token ids are drawn below it.
        probe (Probe): gives the device and the encoder states.
        bench_len (int): tokens per pass.

    Returns:
        dict: ``forward_tokens_per_s``, ``forward_tokens``, ``forward_runs``.
    """
    device = probe.tokens.device
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (1, bench_len), generator=g).to(device)
    enc = probe.enc_a[:1]
    runs, elapsed = 0, 0.0
    with torch.no_grad():
        forward(tokens, enc)
        sync(device)
        while runs < 3 or elapsed < 0.2:
            t0 = time.perf_counter()
            forward(tokens, enc)
            sync(device)
            elapsed += time.perf_counter() - t0
            runs += 1
            if runs >= 20:
                break
    return {"forward_tokens_per_s": runs * bench_len / elapsed, "forward_tokens": bench_len, "forward_runs": runs}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
