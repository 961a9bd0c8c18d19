"""The streamed engine: one decoder layer at a time on the device, read straight from the files.

Peak device memory is about one (fused) layer plus activations: the embedding is a gather of the
rows the probe uses, the output projection is applied in row chunks, and every probe lane (base,
text-only, encoder, gates opened, KV-cache decoding) passes through a layer while it is loaded.
Decoding is layer-major (each layer decodes every position with its own cache, then is freed),
which computes what token-major decoding computes. The backward pass recomputes each layer from
its saved input, last layer first (per-layer activation checkpointing).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..arch.config import FusionConfig, ModelConfig
from ..native.builders import build_fusion_layer, build_norm, build_rope, build_self_attention_layer
from ..errors import CheckpointError, UsageError
from ..io.checkpoint import Checkpoint
from ..io.safetensors_format import read_exact
from ..io.torch_dtypes import tensor_from_bytes
from ..modules import FusionLayer, RMSNorm, RotaryEmbedding, get_fusion_params, set_trainable_params
from .outputs import GradInfo, Outputs
from .plain import grad_info, module_bytes
from ..modules.caches import remove_caches
from .probe import (Probe, block_sensitivity, cache_problems, captured_inputs, fusion_blocks,
                    gate_values, opened_gates)

#: Largest slice of the output projection held on the device at once.
HEAD_CHUNK_BYTES = 64 * 1024**2
FUSION_EMBEDDING = "tok_embeddings.fusion_embedding.weight"


class LayerStream:
    """Builds and loads one piece of the model at a time on the device, and tracks the peak."""

    def __init__(self, ckpt: Checkpoint, cfg: ModelConfig, fusion: FusionConfig, device: torch.device,
                 dtype: torch.dtype, head_chunk_bytes: int = HEAD_CHUNK_BYTES) -> None:
        if cfg.rope_theta is None:
            raise UsageError("RoPE theta is unknown (no config.json gave it); verify needs the base's config")
        self.ckpt, self.cfg, self.fusion, self.device, self.dtype = ckpt, cfg, fusion, device, dtype
        self.family = cfg.family_obj
        self.head_chunk_bytes = head_chunk_bytes
        self.peak_bytes = 0

    def _key(self, canonical: str) -> str:
        return self.family.to_family(canonical)

    def _seen(self, nbytes: int) -> None:
        self.peak_bytes = max(self.peak_bytes, nbytes)

    def layer(self, i: int) -> nn.Module:
        """Decoder layer ``i`` (a ``FusionLayer`` when fused) on the device, weights loaded."""
        cfg = self.cfg
        with torch.device("meta"):
            rope = build_rope(cfg)
            module: nn.Module = build_self_attention_layer(cfg, rope)
            if i in self.fusion.layers:
                module = FusionLayer(module, build_fusion_layer(cfg, self.fusion), fusion_first=self.fusion.fusion_first)
        module = module.to_empty(device=self.device).to(self.dtype)
        for m in module.modules():
            if isinstance(m, RotaryEmbedding):
                m.reset_buffers()
        self._load(module, f"layers.{i}.")
        self._seen(module_bytes(module))
        return module.eval()

    def norm(self) -> RMSNorm:
        norm = build_norm(self.cfg, self.cfg.dim, self.cfg.norm_eps).to(self.device, self.dtype)
        self._load(norm, "norm.")
        return norm

    def _load(self, module: nn.Module, prefix: str) -> None:
        with torch.no_grad():
            for local, target in module.state_dict(keep_vars=True).items():
                src = self.ckpt.read_tensor(self._key(prefix + local))
                if tuple(src.shape) != tuple(target.shape):
                    raise CheckpointError(f"{prefix}{local}: shape {list(src.shape)}, expected {list(target.shape)}")
                target.copy_(src)

    def rows(self, canonical: str, rows: list[int]) -> torch.Tensor:
        """Rows of a 2-D tensor, read from the file one row at a time."""
        key = self._key(canonical)
        info = self.ckpt.info(key)
        row_bytes = info.nbytes // info.shape[0]
        with open(self.ckpt.path_of(self.ckpt.key_to_file[key]), "rb") as fh:
            data = b"".join(read_exact(fh, info.start + r * row_bytes, row_bytes) for r in rows)
        return tensor_from_bytes(data, info.dtype, (len(rows), info.shape[1])).to(self.device, self.dtype)

    def embed(self, tokens: torch.Tensor, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings ``[b, s, dim]``; ids past the vocab read the fusion embedding.

        Returns the embeddings and, with ``grad``, the leaf holding the fusion-embedding rows used.
        """
        vocab = self.cfg.vocab_size
        flat = tokens.flatten().cpu()
        ids, inverse = torch.unique(flat.clamp(max=vocab - 1), return_inverse=True)
        h = self.rows("tok_embeddings.weight", ids.tolist())[inverse.to(self.device)]
        leaf = None
        extra = flat >= vocab
        if bool(extra.any()):
            fids, finv = torch.unique((flat - vocab).clamp(min=0), return_inverse=True)
            leaf = self.rows(FUSION_EMBEDDING, fids.tolist()).requires_grad_(grad)
            h = torch.where(extra.to(self.device)[:, None], leaf[finv.to(self.device)], h)
        if self.cfg.embed_scale is not None:  # Gemma scales embeddings by sqrt(width), in their dtype
            h = h * torch.tensor(self.cfg.embed_scale, dtype=h.dtype, device=h.device)
        return h.reshape(*tokens.shape, -1), leaf

    def _head_chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        canonical = "tok_embeddings.weight" if self.cfg.tie_embeddings else "output.weight"
        key = self._key(canonical)
        info = self.ckpt.info(key)
        rows, row_bytes = info.shape[0], info.nbytes // info.shape[0]
        step = max(1, self.head_chunk_bytes // row_bytes)
        with open(self.ckpt.path_of(self.ckpt.key_to_file[key]), "rb") as fh:
            for r0 in range(0, rows, step):
                n = min(step, rows - r0)
                raw = read_exact(fh, info.start + r0 * row_bytes, n * row_bytes)
                w = tensor_from_bytes(raw, info.dtype, (n, info.shape[1])).to(self.device, self.dtype)
                self._seen(w.numel() * w.element_size())
                yield r0, w

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection, chunk by chunk: ``[b, s, dim] -> [b, s, vocab]``."""
        with torch.no_grad():
            return self.logits_from_normed(self.norm()(h))

    def loss_and_grad(self, h: torch.Tensor, targets: torch.Tensor) -> tuple[float, torch.Tensor, bool]:
        """Cross-entropy over the head and its gradient with respect to ``h`` (the last layer's output)."""
        h = h.detach().requires_grad_()
        x = self.norm()(h)
        logits = self.logits_from_normed(x.detach())
        flat, tgt = logits.float().flatten(0, 1), targets.flatten()
        loss = F.cross_entropy(flat, tgt)
        dlogits = flat.softmax(-1)
        dlogits[torch.arange(tgt.numel(), device=tgt.device), tgt] -= 1.0
        dlogits = (dlogits / tgt.numel()).to(self.dtype).view_as(logits)
        dx = torch.zeros_like(x)
        for r0, w in self._head_chunks():
            dx += dlogits[..., r0:r0 + w.shape[0]] @ w
        x.backward(dx)
        return float(loss), h.grad, bool(torch.isfinite(logits).all())

    def logits_from_normed(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([x @ w.t() for _, w in self._head_chunks()], -1)


LANES = ("base", "text", "enc", "open_a", "open_b", "decode", "after")


def run_stream(stream: LayerStream, probe: Probe) -> Outputs:
    """Every measurement of the plain engine, one layer on the device at a time."""
    s = probe.tokens.shape[1]
    pos = torch.arange(s, device=probe.tokens.device)
    start = time.perf_counter()
    with torch.no_grad():
        h0, _ = stream.embed(probe.tokens)
    lanes = dict.fromkeys(LANES, h0)
    train_embed, leaf = stream.embed(probe.train_tokens, grad=True)
    h_train, train_inputs = train_embed.detach(), []
    gates, sensitivity, problems, restored = {}, {}, [], True
    for i in range(stream.cfg.num_layers):
        layer = stream.layer(i)
        blocks = fusion_blocks({i: layer})
        gates.update(gate_values(blocks))
        with torch.no_grad():
            lanes["base"] = (layer.layer if blocks else layer)(lanes["base"], positions=pos)
            lanes["text"] = layer(lanes["text"], positions=pos)
            lanes["enc"] = layer(lanes["enc"], positions=pos, encoder_input=probe.enc_a)
            with opened_gates(blocks) as ok:
                with captured_inputs(blocks) as inputs:
                    lanes["open_a"] = layer(lanes["open_a"], positions=pos, encoder_input=probe.enc_a)
                lanes["open_b"] = layer(lanes["open_b"], positions=pos, encoder_input=probe.enc_b)
                for j, blk in blocks.items():
                    sensitivity[j] = block_sensitivity(blk, inputs[j], probe.enc_a, probe.enc_b)
                train_inputs.append(h_train)
                h_train = layer(h_train, positions=pos, encoder_input=probe.enc_a)
                lanes["decode"], lanes["after"], found = _decode_layer(stream, layer, i, lanes, probe)
            restored &= ok[0]
        problems += found
        del layer
    sweep = time.perf_counter() - start
    logits = {name: stream.logits(h) for name, h in lanes.items()}
    loss, grad, finite = stream.loss_and_grad(h_train, probe.targets)
    grads, leaked, grad = _backward(stream, train_inputs, grad, probe)
    if leaf is not None:
        train_embed.backward(grad)
        grads[FUSION_EMBEDDING] = grad_info(leaf.grad)
    b = probe.tokens.shape[0]
    figures = {"forward_tokens_per_s": len(LANES) * b * s / sweep, "forward_tokens": b * s,
               "stream_sweep_seconds": sweep, "resident_weight_bytes": stream.peak_bytes}
    return Outputs(gates, logits["base"], logits["text"], logits["enc"], logits["open_a"], logits["open_b"],
                   sensitivity, restored, finite, loss, grads, leaked, logits["decode"], problems, logits["after"],
                   figures)


def _decode_layer(stream: LayerStream, layer: nn.Module, i: int, lanes: dict[str, torch.Tensor],
                  probe: Probe) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """This layer's share of KV-cache decoding: every position in turn, then reset and a text-only prefill."""
    b, s, e = probe.shape
    layer.setup_cache(b, stream.dtype, encoder_max_seq_len=e, decoder_max_seq_len=s)
    try:
        x = lanes["decode"]
        steps = [layer(x[:, :1], positions=torch.tensor([0], device=x.device), encoder_input=probe.enc_a)]
        steps += [layer(x[:, t:t + 1], positions=torch.tensor([t], device=x.device)) for t in range(1, s)]
        layer.reset_cache()
        stream._seen(module_bytes(layer))
        found = cache_problems(layer, f"layers.{i}.")
        after = layer(lanes["after"], positions=torch.arange(s, device=x.device))
    finally:
        remove_caches(layer)
    return torch.cat(steps, 1), after, found


def _backward(stream: LayerStream, inputs: list[torch.Tensor], grad: torch.Tensor,
              probe: Probe) -> tuple[dict[str, GradInfo], list[str], torch.Tensor]:
    """Recompute each layer from its saved input, last first, and push the gradient through it."""
    s = probe.tokens.shape[1]
    pos = torch.arange(s, device=grad.device)
    grads: dict[str, GradInfo] = {}
    leaked: list[str] = []
    for i in reversed(range(stream.cfg.num_layers)):
        layer = stream.layer(i)
        fusion = get_fusion_params(layer)
        set_trainable_params(layer, fusion)
        x = inputs[i].detach().requires_grad_()
        with opened_gates(fusion_blocks({i: layer})):
            layer(x, positions=pos, encoder_input=probe.enc_a).backward(grad)
        grads.update({f"layers.{i}.{n}": grad_info(p.grad) for n, p in fusion.items()})
        leaked += [f"layers.{i}.{n}" for n, p in layer.named_parameters() if n not in fusion and p.grad is not None]
        grad = x.grad
        del layer
    return grads, leaked, grad
