"""Grouped-query self-attention (RoPE, KV cache) and cross-attention to encoder states."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .norm import RMSNorm
from .rope import RotaryEmbedding


class KVCache(nn.Module):
    """Key/value buffers ``[batch, kv_heads, max_seq_len, head_dim]`` and how much is filled."""

    def __init__(self, batch_size: int, num_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | None = None) -> None:
        super().__init__()
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.size = 0

    @property
    def max_seq_len(self) -> int:
        return self.k_cache.shape[2]

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()
        self.size = 0

    def write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` ``[b, kv, s, d]`` at ``positions`` ``[s]`` (or ``[b, s]``, one row of
        positions per sequence); return the whole buffers."""
        if k.shape[0] > self.k_cache.shape[0]:
            raise ValueError(f"batch {k.shape[0]} exceeds the cache's batch size {self.k_cache.shape[0]}")
        if int(positions.max()) >= self.max_seq_len:
            raise ValueError(f"position {int(positions.max())} exceeds the cache length {self.max_seq_len}")
        b = k.shape[0]
        if positions.dim() == 2:  # advanced indices on dims 0 and 2: the slots come out as [b, s, kv, d]
            rows = torch.arange(b, device=positions.device)[:, None]
            self.k_cache[rows, :, positions] = k.transpose(1, 2).to(self.k_cache.dtype)
            self.v_cache[rows, :, positions] = v.transpose(1, 2).to(self.v_cache.dtype)
        else:
            self.k_cache[:b, :, positions] = k.to(self.k_cache.dtype)
            self.v_cache[:b, :, positions] = v.to(self.v_cache.dtype)
        self.size = max(self.size, int(positions.max()) + 1)
        return self.k_cache[:b], self.v_cache[:b]

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Replace the contents with ``k``/``v`` ``[b, kv, s, d]`` (encoder states for cross-attention)."""
        s = k.shape[2]
        self.reset()
        self.write(k, v, torch.arange(s, device=k.device))

    def read(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_cache[:batch, :, : self.size], self.v_cache[:batch, :, : self.size]


class _CachedAttention(nn.Module):
    """What both attentions share: a key/value cache on the device of their weights."""

    num_kv_heads: int
    head_dim: int
    output_proj: nn.Linear

    def setup_cache(self, batch_size: int, dtype: torch.dtype, max_seq_len: int) -> None:
        """Allocate (and enable) a ``KVCache`` of ``batch_size`` rows and ``max_seq_len`` positions.

        Args:
            batch_size: the most sequences decoded at once.
            dtype: the cache's dtype.
            max_seq_len: positions it holds (the encoder's length for cross-attention).
        """
        self.kv_cache = KVCache(batch_size, self.num_kv_heads, max_seq_len, self.head_dim, dtype,
                                device=self.output_proj.weight.device)
        self.cache_enabled = True


class SelfAttention(_CachedAttention):
    """Causal grouped-query attention with RoPE, optional q/k biases and q/k RMSNorms.

    Options (all off for Llama): ``bias`` on q/k/v; ``qk_norm_eps`` adds RMSNorms over ``head_dim``
    on queries and keys (Qwen3); ``fused_qkv`` keeps one ``qkv_proj`` whose rows are q, then k, then
    v (Phi-3), so a checkpoint's fused tensor loads as it is; ``sliding_window`` lets a token see
    only the last ``sliding_window`` positions (itself included), as Mistral and Phi-3 configs say.
    Shapes: ``x [b, s, dim] -> [b, s, dim]``; ``positions [s]`` absolute token positions.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, rope: RotaryEmbedding,
                 bias: bool = False, qk_norm_eps: float | None = None, *, fused_qkv: bool = False,
                 sliding_window: int | None = None, norm_offset: float = 0.0, norm_fp32_scale: bool = False) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        q_out, kv_out = num_heads * head_dim, num_kv_heads * head_dim
        self.split = (q_out, kv_out, kv_out)
        if fused_qkv:
            self.qkv_proj = nn.Linear(dim, q_out + 2 * kv_out, bias=bias)
            self.q_proj = self.k_proj = self.v_proj = None
        else:
            self.qkv_proj = None
            self.q_proj = nn.Linear(dim, q_out, bias=bias)
            self.k_proj = nn.Linear(dim, kv_out, bias=bias)
            self.v_proj = nn.Linear(dim, kv_out, bias=bias)
        self.output_proj = nn.Linear(q_out, dim, bias=False)
        norm = dict(offset=norm_offset, fp32_scale=norm_fp32_scale)
        self.q_norm = RMSNorm(head_dim, qk_norm_eps, **norm) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps, **norm) if qk_norm_eps is not None else None
        self.rope = rope
        self.sliding_window = sliding_window
        self.kv_cache: KVCache | None = None
        self.cache_enabled = False

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_proj is not None:
            return self.qkv_proj(x).split(self.split, dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor, *, positions: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask [b, s, keys]`` (True: may attend), where given, replaces the causal/sliding mask;
        while decoding its keys are the cache's positions (a shorter mask is padded with False)."""
        b, s, _ = x.shape
        q, k, v = self._qkv(x)
        q = q.view(b, s, self.num_heads, self.head_dim)
        k = k.view(b, s, self.num_kv_heads, self.head_dim)
        v = v.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = self.rope(q.transpose(1, 2), positions)
        k = self.rope(k.transpose(1, 2), positions)
        caching = self.kv_cache is not None and self.cache_enabled
        if caching:
            k, v = self.kv_cache.write(k, v, positions)
            key_pos = torch.arange(k.shape[2], device=x.device)
        else:
            key_pos = positions
        windowed = self.sliding_window is not None and k.shape[2] > self.sliding_window
        if mask is not None:
            mask = mask.to(torch.bool)
            if mask.shape[-1] < k.shape[2]:
                mask = F.pad(mask, (0, k.shape[2] - mask.shape[-1]), value=False)
        elif caching or windowed:
            gap = positions[..., :, None] - key_pos[..., None, :]  # query minus key position: [(b,) s, keys]
            mask = gap >= 0
            if windowed:
                mask = mask & (gap < self.sliding_window)
        if mask is not None and mask.dim() == 3:
            mask = mask[:, None]  # [b, 1, s, keys]: one mask for every head
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and s > 1,
                                             enable_gqa=True)
        return self.output_proj(out.transpose(1, 2).reshape(b, s, -1))


class CrossAttention(_CachedAttention):
    """Non-causal grouped-query attention from decoder tokens to encoder states, no RoPE.

    Queries and keys pass through RMSNorm over ``head_dim``. Keys/values come from ``encoder_input``
    ``[b, e, encoder_dim]`` or, during decoding, from the cache. ``encoder_mask`` ``[b, s, e]`` is
    True where a token may attend; a token that may attend nothing gets a zero output.
    """

    def __init__(self, dim: int, encoder_dim: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 qk_norm_eps: float = 1e-5, *, norm_offset: float = 0.0, norm_fp32_scale: bool = False) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(encoder_dim, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(encoder_dim, num_kv_heads * head_dim, bias=False)
        self.output_proj = nn.Linear(num_heads * head_dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, qk_norm_eps, offset=norm_offset, fp32_scale=norm_fp32_scale)
        self.k_norm = RMSNorm(head_dim, qk_norm_eps, offset=norm_offset, fp32_scale=norm_fp32_scale)
        self.kv_cache: KVCache | None = None
        self.cache_enabled = False

    @property
    def has_cached_input(self) -> bool:
        return self.kv_cache is not None and self.cache_enabled and self.kv_cache.size > 0

    def forward(self, x: torch.Tensor, encoder_input: torch.Tensor | None = None,
                encoder_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.num_heads, self.head_dim)).transpose(1, 2)
        if encoder_input is not None:
            e = encoder_input.shape[1]
            k = self.k_norm(self.k_proj(encoder_input).view(b, e, self.num_kv_heads, self.head_dim)).transpose(1, 2)
            v = self.v_proj(encoder_input).view(b, e, self.num_kv_heads, self.head_dim).transpose(1, 2)
            if self.kv_cache is not None and self.cache_enabled:
                self.kv_cache.store(k, v)
        elif self.has_cached_input:
            k, v = self.kv_cache.read(b)
        else:
            raise ValueError("cross-attention needs encoder_input or a filled cache")
        mask, dead = None, None
        if encoder_mask is not None:
            mask = encoder_mask.to(torch.bool)
            dead = ~mask.any(-1)  # [b, s]: tokens that may attend nothing
            mask = (mask | dead[..., None])[:, None]  # keep softmax finite; zeroed below
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, enable_gqa=True)
        out = self.output_proj(out.transpose(1, 2).reshape(b, s, -1))
        if dead is not None:
            out = out.masked_fill(dead[..., None], 0.0)
        return out
