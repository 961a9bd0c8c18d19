"""RoPE row layouts: the one place that knows how q/k rows move between Hugging Face and torchtune.

torchtune (like Meta's original checkpoints) rotates interleaved pairs of each head's dimensions,
``(0, 1), (2, 3), ...``; Hugging Face rotates the two halves, ``(j, j + head_dim/2)``, and its
checkpoints hold the q/k rows of every head permuted to match. Converting between the namings moves
those rows inside each head; no value changes, so the conversion is exact and reversible.
"""

from __future__ import annotations

import re

LAYOUTS = ("half", "interleaved")
#: Canonical per-layer tensors whose rows (or elements) follow the RoPE layout, head by head.
ROPE_ROWS = ("attn.q_proj.weight", "attn.k_proj.weight", "attn.q_proj.bias", "attn.k_proj.bias",
             "attn.q_norm.scale", "attn.k_norm.scale")
_SELF_ATTENTION = re.compile(r"layers\.(\d+)\.(?P<suffix>attn\..+)")


def head_permutation(head_dim: int, src: str, dst: str) -> tuple[int, ...]:
    """``perm`` such that row ``r`` of a head in layout ``dst`` is row ``perm[r]`` in layout ``src``."""
    if src not in LAYOUTS or dst not in LAYOUTS:
        raise ValueError(f"unknown RoPE layout {src!r} or {dst!r}")
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    if src == dst:
        return tuple(range(head_dim))
    half = head_dim // 2
    # interleaved row 2i is the first element of pair i (half-layout row i); 2i+1 its second (row i + half)
    to_interleaved = tuple(r // 2 + (r % 2) * half for r in range(head_dim))
    if dst == "interleaved":
        return to_interleaved
    back = [0] * head_dim
    for r, p in enumerate(to_interleaved):
        back[p] = r
    return tuple(back)


def rotates(canonical: str) -> bool:
    """True for a self-attention tensor whose rows follow the RoPE layout (fusion layers have no RoPE)."""
    m = _SELF_ATTENTION.fullmatch(canonical)
    return bool(m) and m.group("suffix") in ROPE_ROWS


def permute_heads(raw: bytes | memoryview, row_bytes: int, perm: tuple[int, ...]) -> bytes:
    """Reorder the rows of every block of ``len(perm)`` rows (one head) in ``raw``; bytes are moved, not changed."""
    block = len(perm) * row_bytes
    if len(raw) % block:
        raise ValueError(f"{len(raw)} bytes are not whole heads of {len(perm)} rows of {row_bytes} bytes")
    mv = memoryview(raw)
    out = bytearray(len(raw))
    pos = 0
    for start in range(0, len(raw), block):
        for r in perm:
            src = start + r * row_bytes
            out[pos:pos + row_bytes] = mv[src:src + row_bytes]
            pos += row_bytes
    return bytes(out)


def describe(src: str, dst: str, heads: int, head_dim: int) -> str:
    return (f"rows permuted per head for RoPE: {src} -> {dst} layout "
            f"({heads} heads of {head_dim}; bytes moved, none changed)")
