"""A fused model must actually learn: the short version of examples/train_fusion.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from fusionsurgery.surgery.fuse import fuse

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example():
    spec = importlib.util.spec_from_file_location("train_fusion", EXAMPLES / "train_fusion.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_fusion_parameters_learn_what_only_the_encoder_knows(tmp_path: Path) -> None:
    tf = _example()
    out = tmp_path / "fused"
    fuse(tf.EXAMPLE, out, every=4, dtype="fp32")
    before = {k: v.clone() for k, v in tf.load_fused(out, dtype=torch.float32).state_dict().items()}
    r = tf.train(out, steps=100, batch_size=16, lr=1e-2, log_every=0)
    assert r["loss"] < 0.6 * r["chance"], r  # well below chance among the candidate tokens
    assert r["accuracy"] > 0.9, r
    assert r["text_only_loss"] > r["chance"], r  # the text-only path cannot know the token
    assert r["trainable_params"] < r["total_params"]
    # training changed a loaded copy; the checkpoint on disk is untouched
    after = tf.load_fused(out, dtype=torch.float32).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_base_stays_frozen_while_fusion_trains(tmp_path: Path) -> None:
    tf = _example()
    out = tmp_path / "fused"
    fuse(tf.EXAMPLE, out, every=4, dtype="fp32")
    model = tf.load_fused(out, dtype=torch.float32)
    params = tf.get_fusion_params(model)
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    task = tf.make_task(model.tok_embeddings.weight.shape[0], 128)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in params}
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        tokens, enc, targets = task.batch(8, gen)
        loss = tf.last_loss(model, tokens, enc, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)
    gates = [p for n, p in params.items() if n.endswith("_scale.scale")]
    assert gates and all(g.abs().item() > 0 for g in gates)  # the gates opened
