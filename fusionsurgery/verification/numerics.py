"""Checks 3 to 6, judged from an engine's ``Outputs``: identity at init, a live fusion path, forward and
backward, and KV-cache decoding."""

from __future__ import annotations

import torch

from .outputs import Outputs
from .probe import OPEN_GATE, max_abs_diff
from .report import CheckResult
from ..errors import listed

#: A fusion block is live when at least this share of its update depends on the encoder input.
MIN_BLOCK_SENSITIVITY = 1e-3
#: The model is live when opened gates move its logits by at least this share of their scale.
MIN_MODEL_SENSITIVITY = 1e-4
#: Cached decoding vs the full forward pass: allowed max |difference| relative to max(1, max |logits|).
DECODE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def _scale(t: torch.Tensor) -> float:
    return max(1.0, t.float().abs().max().item())


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def check_identity(out: Outputs) -> CheckResult:
    """Zero gates: fused logits equal the base's exactly, with and without an encoder input."""
    r = CheckResult("identity", "Identity at init: zero gates give the base model's logits exactly")
    trained = {i: g for i, g in out.gates.items() if g["attn"] != 0.0 or g["mlp"] != 0.0}
    text_diff, enc_diff = max_abs_diff(out.text, out.base), max_abs_diff(out.enc, out.base)
    r.figures = {"max_abs_diff_text_only": text_diff, "max_abs_diff_with_encoder": enc_diff,
                 "gates": {str(i): g for i, g in out.gates.items()}, "trained_gates": sorted(trained)}
    if not _finite(out.base):
        r.fail("the base model's logits are not finite")
    if not torch.equal(out.text, out.base):
        r.fail(f"text-only logits of the fused model differ from the base model's (max |diff| {text_diff:.3g})")
    if not trained:
        if not torch.equal(out.enc, out.base):
            r.fail(f"with zero gates and an encoder input the logits differ from the base model's "
                   f"(max |diff| {enc_diff:.3g})")
        return r.finish(f"logits equal the base model's exactly ({len(out.gates)} fusion layers, all gates zero)")
    shown = ", ".join(f"layer {i}: attn {g['attn']:.4g} mlp {g['mlp']:.4g}" for i, g in sorted(trained.items()))
    r.notes.append(f"trained gates (not a failure): {shown}; with an encoder input the logits deviate from "
                   f"the base model's by up to {enc_diff:.4g}")
    return r.finish(f"text-only logits equal the base model's exactly; {len(trained)} layer(s) have trained "
                    f"gates (deviation {enc_diff:.3g} with an encoder input)")


def check_live(out: Outputs) -> CheckResult:
    """Gates opened: the output depends on the encoder input, through every fusion layer."""
    r = CheckResult("live", "Fusion path is live: with gates opened the output depends on the encoder input")
    change = max_abs_diff(out.open_a, out.open_b) / _scale(out.open_a)
    r.figures = {"open_gate": OPEN_GATE, "relative_logit_change": change,
                 "layer_sensitivity": {str(i): v for i, v in out.layer_sensitivity.items()}}
    if not (_finite(out.open_a) and _finite(out.open_b)):
        r.fail("logits with the gates opened are not finite")
    if not change > MIN_MODEL_SENSITIVITY:
        r.fail(f"two different encoder inputs give the same logits (relative change {change:.3g})")
    dead = [f"{i} ({v:.2g})" for i, v in sorted(out.layer_sensitivity.items()) if not v > MIN_BLOCK_SENSITIVITY]
    if dead:
        r.fail(f"fusion layer(s) whose output ignores the encoder input: {listed(dead)}")
    if not out.gates_restored:
        r.fail("the gates did not come back to their stored values after being opened")
    weakest = min(out.layer_sensitivity.values(), default=0.0)
    return r.finish(f"encoder input changes the logits by {change:.3g} of their scale; every fusion layer "
                    f"responds (weakest {weakest:.3g}); gates restored")


def check_forward_backward(out: Outputs) -> CheckResult:
    """Finite logits, and a backward pass with the base frozen reaches the fusion parameters only."""
    r = CheckResult("backward", "Forward and backward: finite logits, gradients to the fusion parameters only")
    missing = sorted(n for n, g in out.grads.items() if not g.has_grad)
    bad = sorted(n for n, g in out.grads.items() if g.has_grad and not g.finite)
    zero = sorted(n for n, g in out.grads.items() if g.has_grad and g.finite and not g.nonzero)
    r.figures = {"loss": out.loss, "fusion_params_with_grad": sum(g.has_grad for g in out.grads.values()),
                 "fusion_params": len(out.grads), "base_params_with_grad": len(out.base_params_with_grad)}
    if not out.train_logits_finite or not torch.isfinite(torch.tensor(out.loss)):
        r.fail(f"logits or loss not finite (loss {out.loss})")
    if not out.grads:
        r.fail("the model has no fusion parameters")
    if missing:
        r.fail(f"{len(missing)} fusion parameter(s) got no gradient: {listed(missing)}")
    if bad:
        r.fail(f"{len(bad)} fusion parameter(s) got non-finite gradients: {listed(bad)}")
    if zero:
        r.fail(f"{len(zero)} fusion parameter(s) got an all-zero gradient (gates opened): {listed(zero)}")
    if out.base_params_with_grad:
        r.fail(f"{len(out.base_params_with_grad)} frozen base parameter(s) got gradients: "
               f"{listed(out.base_params_with_grad)}")
    return r.finish(f"loss {out.loss:.4g}; all {len(out.grads)} fusion parameters got finite non-zero "
                    f"gradients, no base parameter did")


def check_kv_cache(out: Outputs, dtype: torch.dtype) -> CheckResult:
    """Token-by-token decoding with caches matches the full pass; ``reset_cache`` empties them."""
    r = CheckResult("kv_cache", "KV cache: token-by-token decoding matches the full forward pass; reset empties it")
    tol = DECODE_TOLERANCE.get(dtype, 6e-2)
    decode = max_abs_diff(out.decode, out.open_a) / _scale(out.open_a)
    after = max_abs_diff(out.after_reset, out.text) / _scale(out.text)
    argmax = (out.decode.argmax(-1) == out.open_a.argmax(-1)).float().mean().item()
    r.figures = {"relative_max_diff_decode": decode, "relative_max_diff_after_reset": after,
                 "argmax_agreement": argmax, "tolerance": tol}
    if not decode <= tol:
        r.fail(f"cached decoding differs from the full forward pass by {decode:.3g} of the logit scale "
               f"(tolerance {tol:g}, dtype {str(dtype).removeprefix('torch.')})")
    for p in out.reset_problems:
        r.fail(f"after reset_cache: {p}")
    if not after <= tol:
        r.fail(f"after reset_cache a text-only pass differs from the uncached one by {after:.3g} "
               "(stale keys/values or position)")
    return r.finish(f"decoding matches the full pass within {decode:.2g} (tolerance {tol:g}), argmax agreement "
                    f"{argmax:.0%}; reset_cache empties every cache")
