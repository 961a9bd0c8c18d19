"""Encoder inputs reach the fused layers even where the base's own code drops keyword arguments on the way
down (transformers 5.0's GPT-2 head and StableLM / Falcon-H1 models do): a fused decoder layer takes them
from the model's call in progress (``fusionsurgery.hf.model.EncoderInputs``), also when gradient
checkpointing recomputes the layer in the backward pass. Simulated on any release by wrapping the inner
model's forward so that it drops them. A few seconds.
"""

from __future__ import annotations

import pytest
import torch

import fusionsurgery as fs
from any_decoder import save_tiny
from helpers import open_gates

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("fusionsurgery.hf")

ENCODER_KWARGS = ("cross_attention_states", "cross_attention_mask")


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dropped")
    fs.fuse(save_tiny("gpt2", tmp / "base"), tmp / "fused", every=2, seed=1)
    return tmp / "fused"


def _load(path, drop: bool):
    model = hf.from_pretrained(path, dtype=torch.float32)
    open_gates(model, 0.5)
    if drop:  # what an older release's code does: the inner model never passes the encoder inputs on
        inner = model.transformer
        forward = inner.forward

        def dropping(*args, **kwargs):
            for name in ENCODER_KWARGS:
                kwargs.pop(name, None)
            return forward(*args, **kwargs)

        inner.forward = dropping
    return model


def _inputs(model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 8), generator=g)
    states = torch.randn(2, 5, model.fusion.encoder_dim, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return ids, states, mask


def test_dropped_encoder_inputs_still_reach_the_fused_layers(fused):
    plain, dropping = _load(fused, drop=False), _load(fused, drop=True)
    ids, states, mask = _inputs(plain)
    with torch.no_grad():
        want = plain.eval()(ids, cross_attention_states=states, cross_attention_mask=mask).logits
        got = dropping.eval()(ids, cross_attention_states=states, cross_attention_mask=mask).logits
        text_only = dropping(ids).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (got - text_only).abs().max() > 1e-3  # the states changed the logits: they were read
    assert not dropping.fusion_inputs  # nothing is held between calls


def test_gradient_checkpointing_recomputes_with_the_same_encoder_inputs(fused):
    grads = []
    for drop in (False, True):
        model = _load(fused, drop=drop)
        hf.freeze_all_but_fusion(model)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model.train()
        ids, states, mask = _inputs(model)
        torch.manual_seed(0)  # GPT-2 trains with dropout: the same masks in both runs
        model(ids, cross_attention_states=states, cross_attention_mask=mask, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        assert grad is not None and grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=0)
