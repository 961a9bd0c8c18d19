"""What an engine (plain or streamed) measures; the numeric checks judge only this."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class GradInfo:
    """A fusion parameter's gradient after the backward pass."""

    has_grad: bool
    finite: bool
    nonzero: bool


@dataclass
class Outputs:
    """Logits and facts gathered from one run of the probe through the model.

    Every logits tensor is ``[b, s, vocab]`` on the device; the ``open_*`` ones were computed with
    the gates opened (``probe.OPEN_GATE``).
    """

    gates: dict[int, dict[str, float]]  # stored gate values (pre-tanh), per fused layer
    base: torch.Tensor  # the text-only base model
    text: torch.Tensor  # the fused model, no encoder input
    enc: torch.Tensor  # the fused model with encoder input A, stored gates
    open_a: torch.Tensor  # gates opened, encoder input A
    open_b: torch.Tensor  # gates opened, encoder input B
    layer_sensitivity: dict[int, float]  # per fusion block: share of its update that depends on the encoder
    gates_restored: bool
    train_logits_finite: bool
    loss: float
    grads: dict[str, GradInfo]  # fusion parameters
    base_params_with_grad: list[str]
    decode: torch.Tensor  # token by token from a KV cache, gates opened, encoder input A at step 0
    reset_problems: list[str]
    after_reset: torch.Tensor  # text-only prefill through the (reset) caches
    figures: dict[str, Any] = field(default_factory=dict)  # timings, memory
