"""fusionsurgery.hf on the outputs of import and graft: they open as transformers models with clean
load info, compute load_fused's (and the Mllama's) logits, and save to directories that verify and
export --to mllama read, vision parts included."""

from __future__ import annotations

import logging

import pytest
import torch

import fusionsurgery as fs
from fusionsurgery.exporting import export, unfuse
from fusionsurgery.io.checkpoint import Checkpoint
from fusionsurgery.verification import verify
from helpers import hf_model, image_inputs, mllama_model, open_gates, read_json, save_sharded, tokens

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("fusionsurgery.hf")

VOCAB = 128
VISION = ("vision_model.", "multi_modal_projector.")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """An Mllama with a vision tower, its import, its adapter and text base, and a graft onto another Llama."""
    tmp = tmp_path_factory.mktemp("hf-transplant")
    mllama = mllama_model(True)
    mllama.save_pretrained(str(tmp / "mllama"))
    (tmp / "mllama" / "preprocessor_config.json").write_text('{"image_processor_type": "MllamaImageProcessor"}')
    imported = fs.import_mllama(tmp / "mllama", tmp / "imported").output
    adapter = fs.import_mllama(tmp / "mllama", tmp / "adapter", adapter_only=True).output
    text_base = unfuse(imported, tmp / "text-base").output
    llama = hf_model("llama", seed=3)
    save_sharded(llama, tmp / "my-llama")
    grafted = fs.graft(adapter, tmp / "my-llama", tmp / "grafted").output
    return {"tmp": tmp, "mllama": mllama, "imported": imported, "adapter": adapter, "text_base": text_base,
            "llama": llama, "grafted": grafted}


def text_only(made, name):
    """What the checkpoint computes text-only: the Mllama's own logits, or the new base's for a graft."""
    model = made["llama"] if name == "grafted" else made["mllama"]
    return lambda t: model(input_ids=t).logits


def open_model(made, name):
    if name == "adapter":
        return hf.from_pretrained(made["adapter"], base=made["text_base"], dtype=torch.float32, output_loading_info=True)
    return hf.from_pretrained(made[name], dtype=torch.float32, output_loading_info=True)


def reference(made, name):
    if name == "adapter":
        return fs.load_fused(made["adapter"], base=made["text_base"], dtype=torch.float32)
    return fs.load_fused(made[name], dtype=torch.float32)


@pytest.mark.parametrize("name", ["imported", "grafted", "adapter"])
def test_opens_with_clean_load_info_and_load_fused_logits(made, name, caplog):
    with caplog.at_level(logging.WARNING):
        model, info = open_model(made, name)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not [r for r in caplog.records if "missing" in r.getMessage().lower() or "unexpected" in r.getMessage().lower()]
    assert type(model).__name__ == "FusedLlamaForCausalLM"
    assert model.fusion.layers == [1, 3] and model.fusion.fusion_vocab == 8
    ours = reference(made, name)
    t = tokens(vocab=VOCAB)
    extra = tokens(vocab=VOCAB + 8, seed=4)  # ids of the 8-row fusion vocabulary too
    states = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(t).logits, text_only(made, name)(t), atol=1e-5, rtol=0)
        for ids in (t, extra):
            assert torch.allclose(model(ids).logits, ours(ids), atol=1e-4, rtol=0)
            with_states = model(ids, cross_attention_states=states).logits
            assert torch.allclose(with_states, ours(ids, encoder_input=states), atol=1e-4, rtol=0)
            assert not torch.allclose(with_states, model(ids).logits, atol=1e-3)  # the imported gates are open


def test_encoder_states_give_the_mllamas_logits(tmp_path):
    """A text-only Mllama (MllamaForCausalLM), imported: with the same states, the Mllama's own logits."""
    mllama = mllama_model(False, seed=5)
    mllama.save_pretrained(str(tmp_path / "m"))
    model = hf.from_pretrained(fs.import_mllama(tmp_path / "m", tmp_path / "i").output, dtype=torch.float32).eval()
    t = tokens(vocab=VOCAB + 8)
    states = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    visible = torch.zeros(2, 1, t.shape[1], states.shape[1])  # Mllama's additive mask: every state visible
    with torch.no_grad():
        theirs = mllama(t, cross_attention_states=states, cross_attention_mask=visible).logits
        assert torch.allclose(model(t, cross_attention_states=states).logits, theirs, atol=1e-4, rtol=0)
        assert torch.allclose(model(t).logits, mllama(t).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["imported", "grafted", "adapter"])
def test_save_pretrained_keeps_the_vision_parts(made, name, tmp_path):
    model, _ = open_model(made, name)
    open_gates(model, 0.3)  # "trained"
    out = tmp_path / "saved"
    model.save_pretrained(out)
    model.save_pretrained(out)  # into an existing directory (as Trainer does): vision/ replaced whole
    source = made[name]
    assert sorted(p.name for p in (out / "vision").iterdir()) == sorted(p.name for p in (source / "vision").iterdir())
    for f in (source / "vision").iterdir():
        assert (out / "vision" / f.name).read_bytes() == f.read_bytes()
    manifest = read_json(out / "fusion_manifest.json")
    assert manifest["mllama"]["vision"] == read_json(source / "fusion_manifest.json")["mllama"]["vision"]
    assert ("graft" in manifest) == (name == "grafted")
    base = made["text_base"] if name == "adapter" else None  # an adapter is saved as an adapter
    assert (manifest["layout"] == "adapter") == (base is not None)
    report = verify(out, base=base)
    assert report.ok, [c.details for c in report.checks]
    t = tokens(vocab=VOCAB)
    states = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(fs.load_fused(out, base=base, dtype=torch.float32)(t, encoder_input=states),
                              model.eval()(t, cross_attention_states=states).logits, atol=1e-4, rtol=0)
    # export rebuilds an MllamaForConditionalGeneration: the vision tower back in place, the new gates in it
    back = export(out, tmp_path / "mllama", to="mllama", base=base).output
    again, info = transformers.MllamaForConditionalGeneration.from_pretrained(str(back), dtype=torch.float32,
                                                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    got, mllama_dir = Checkpoint.open(back), Checkpoint.open(made["tmp"] / "mllama")
    assert all(got.read_bytes(k) == mllama_dir.read_bytes(k) for k in mllama_dir.keys() if k.startswith(VISION))
    assert again.model.language_model.layers[1].cross_attn_attn_gate.item() == pytest.approx(0.3)
    with torch.no_grad():
        assert again.eval()(**image_inputs()).logits.isfinite().all()
