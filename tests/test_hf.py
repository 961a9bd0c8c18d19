"""fusionsurgery.hf: every family's fused checkpoint as its own transformers class, against load_fused
and the plain transformers base model: logits, encoder masks, loss, generate, save_pretrained + verify."""

from __future__ import annotations

import logging

import pytest
import torch

import fusionsurgery as fs
from fusionsurgery.errors import UsageError
from fusionsurgery.exporting import export, unfuse
from fusionsurgery.io.checkpoint import Checkpoint
from fusionsurgery.verification import verify
from helpers import ARCHS, make_base, open_gates, tokens

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("fusionsurgery.hf")

# per family: fuse options that exercise what the family adds (encoder width, fusion vocabulary, placement)
FUSE_OPTIONS = {
    "llama": dict(every=2, fusion_vocab=3),
    "qwen2": dict(every=2),
    "qwen3": dict(every=2, encoder_dim=40),
    "gemma": dict(every=2, encoder_dim=40, fusion_vocab=3),
    "phi3": dict(every=2, fusion_after=True),
    "mistral": dict(layers="0,3"),
    "smollm": dict(every=4, fusion_vocab=2),
}


@pytest.fixture(scope="module", params=list(ARCHS))
def family(request, tmp_path_factory):
    arch = request.param
    tmp = tmp_path_factory.mktemp(arch)
    base, ref = make_base(tmp, arch)
    out = tmp / "fused"
    fs.fuse(base, out, seed=1, **FUSE_OPTIONS[arch])
    return arch, base, ref, out


def load(path, **kwargs):
    return hf.from_pretrained(path, dtype=torch.float32, **kwargs)


def states(model, batch=2, length=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, model.fusion.encoder_dim, generator=g)


def test_opens_as_the_base_class_with_the_checkpoint_keys(family, caplog):
    arch, base, ref, out = family
    with caplog.at_level(logging.WARNING):
        model, info = load(out, output_loading_info=True)
    assert isinstance(model, type(ref)) and type(model).__name__ == f"Fused{type(ref).__name__}"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not [r for r in caplog.records if "missing" in r.getMessage().lower() or "unexpected" in r.getMessage().lower()]
    keys = set(Checkpoint.open(out).keys())
    tied = set(model.all_tied_weights_keys)  # transformers keeps a tied lm_head in every state dict
    assert set(model.state_dict()) - tied == keys and not tied & keys
    assert {n for n, _ in model.named_parameters()} <= keys | tied
    fused_layers = fs.FusionConfig.from_dict(model.config.fusion).layers
    assert [i for i, layer in enumerate(model.model.layers) if hasattr(layer, "fusion_layer")] == fused_layers


def test_logits_equal_load_fused_and_the_base_model(family):
    arch, _, ref, out = family
    model, own = load(out), fs.load_fused(out, dtype=torch.float32)
    t = tokens(vocab=ARCHS[arch]["vocab_size"])
    s = states(model)
    with torch.no_grad():
        plain = ref.float()(t).logits
        for logits in (model(t).logits, model(t, cross_attention_states=s).logits):  # closed gates
            torch.testing.assert_close(logits, plain, atol=1e-4, rtol=0)
        torch.testing.assert_close(model(t).logits, own(t), atol=1e-4, rtol=0)
        open_gates(model, 0.7)
        open_gates(own, 0.7)
        opened = model(t, cross_attention_states=s).logits
        torch.testing.assert_close(opened, own(t, encoder_input=s), atol=1e-4, rtol=0)
        assert (opened - plain).abs().max() > 1e-2
        torch.testing.assert_close(model(t).logits, plain, atol=1e-4, rtol=0)  # no states: text-only


def test_fusion_vocabulary_tokens(family):
    arch, _, _, out = family
    if not FUSE_OPTIONS[arch].get("fusion_vocab"):
        pytest.skip("fused without a fusion vocabulary")
    model, own = load(out), fs.load_fused(out, dtype=torch.float32)
    vocab = ARCHS[arch]["vocab_size"]
    t = tokens(vocab=vocab)
    t[:, ::3] = vocab + torch.arange(t[:, ::3].numel()).view(2, -1) % FUSE_OPTIONS[arch]["fusion_vocab"]
    with torch.no_grad():
        torch.testing.assert_close(model(t).logits, own(t), atol=1e-4, rtol=0)


def test_mask_hides_encoder_positions_per_sample(family):
    arch, _, _, out = family
    model, own = load(out), fs.load_fused(out, dtype=torch.float32)
    open_gates(model, 0.7)
    open_gates(own, 0.7)
    t, s = tokens(vocab=ARCHS[arch]["vocab_size"]), states(model)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0  # sample 0: the last two positions are padding
    mask[1] = 0  # sample 1: sees no encoder position at all
    with torch.no_grad():
        logits = model(t, cross_attention_states=s, cross_attention_mask=mask).logits
        trimmed = model(t[:1], cross_attention_states=s[:1, :4]).logits
        text_only = model(t[1:]).logits
        per_token = mask[:, None, :].expand(2, t.shape[1], 6).bool()
        torch.testing.assert_close(logits, own(t, encoder_input=s, encoder_mask=per_token), atol=1e-4, rtol=0)
        # and a per-token mask [b, s, e] gives the same
        torch.testing.assert_close(model(t, cross_attention_states=s, cross_attention_mask=per_token).logits, logits)
    torch.testing.assert_close(logits[:1], trimmed, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1:], text_only, atol=1e-5, rtol=0)


def test_labels_give_the_usual_causal_lm_loss(family):
    arch, _, _, out = family
    model = load(out)
    open_gates(model, 0.5)
    t, s = tokens(vocab=ARCHS[arch]["vocab_size"]), states(model)
    labels = t.clone()
    labels[0, :3] = -100
    result = model(t, cross_attention_states=s, labels=labels)
    expected = torch.nn.functional.cross_entropy(result.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(result.loss, expected)


def test_generate_matches_token_by_token_load_fused(family):
    arch, _, _, out = family
    model, own = load(out), fs.load_fused(out, dtype=torch.float32)
    open_gates(model, 1.5)
    open_gates(own, 1.5)
    prompt, s = tokens(seq=5, vocab=ARCHS[arch]["vocab_size"], seed=3), states(model, length=5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    projections = []
    hooks = [m.register_forward_hook(lambda *_: projections.append(1))
             for name, m in model.named_modules() if name.endswith("fusion_layer.cross_attn.k_proj")]
    with torch.no_grad():
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), cross_attention_states=s,
                                   cross_attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                   pad_token_id=0)[:, prompt.shape[1]:]
        own.setup_cache(2, torch.float32, encoder_max_seq_len=5, decoder_max_seq_len=16)
        logits = own(prompt, encoder_input=s, encoder_mask=mask[:, None].expand(2, 5, 5))
        expected = [logits[:, -1].argmax(-1)]
        for _ in range(7):
            expected.append(own(expected[-1][:, None], encoder_mask=mask[:, None])[:, -1].argmax(-1))
    assert torch.equal(generated, torch.stack(expected, 1)), arch
    assert len(projections) == len(hooks)  # encoder keys/values computed once per generation, not per step
    text = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert text.shape == (2, 9)


def test_save_pretrained_is_verified_and_read_by_every_command(family, tmp_path):
    arch, base, _, out = family
    model = load(out)
    hf.freeze_all_but_fusion(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    t, s = tokens(vocab=ARCHS[arch]["vocab_size"]), states(model)
    for _ in range(2):
        model(t, cross_attention_states=s, labels=t).loss.backward()
        opt.step()
        opt.zero_grad()
    saved = tmp_path / "trained"
    model.save_pretrained(saved)
    assert sorted(p.name for p in saved.iterdir()) == sorted(p.name for p in out.iterdir())
    report = verify(saved, base, device="cpu")
    assert report.ok, [c.message for c in report.failures]
    trained = report.check("originals").figures["changed_fusion_tensors"]
    assert set(trained) == {k for k in Checkpoint.open(out).keys() if ".fusion_layer." in k}
    base_ckpt, saved_ckpt = Checkpoint.open(base), Checkpoint.open(saved)
    assert all(saved_ckpt.read_bytes(k) == base_ckpt.read_bytes(k) for k in base_ckpt.keys())
    manifest = saved_ckpt.read_manifest()
    assert manifest["history"][-1]["changed_original_tensors"] == []
    with torch.no_grad():  # load_fused and from_pretrained read the trained weights back
        torch.testing.assert_close(fs.load_fused(saved, dtype=torch.float32)(t, encoder_input=s),
                                   model(t, cross_attention_states=s).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(load(saved)(t, cross_attention_states=s).logits,
                                   model(t, cross_attention_states=s).logits)
    again = unfuse(saved, tmp_path / "unfused")
    assert not again.modified
    if arch in ("llama", "smollm"):  # families the exports take (Mllama refuses sliding windows, Mistral's here)
        assert export(saved, tmp_path / "out", to="mllama" if arch == "llama" else "torchtune").tensors


def test_deep_fusion_model_refuses_a_transformers_decoder_in_one_line(tmp_path):
    """DeepFusionModel speaks torchtune's keywords; an hf model is told how to take its encoder instead."""
    base, _ = make_base(tmp_path, "llama")
    model = load(fs.fuse(base, tmp_path / "fused", every=2).output)
    with pytest.raises(TypeError, match="cross_attention_states") as info:
        fs.DeepFusionModel(model, torch.nn.Identity())
    assert "\n" not in str(info.value)
