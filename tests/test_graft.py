"""graft: an adapter (import --adapter-only, fuse --adapter-only) on another base of the same dimensions."""

from __future__ import annotations

import json

import pytest
import torch

import fusionsurgery as fs
from fusionsurgery.cli import main
from fusionsurgery.errors import UsageError
from fusionsurgery.exporting import export, unfuse
from fusionsurgery.io.checkpoint import Checkpoint
from fusionsurgery.verification import verify
from helpers import hf_model, image_inputs, make_base, mllama_model, read_json, save_sharded, tokens

VOCAB = 128


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A tiny Mllama with a vision tower, its adapter and text base, and another Llama of the same dimensions."""
    tmp = tmp_path_factory.mktemp("graft")
    mllama = tmp / "mllama"
    mllama_model(True).save_pretrained(str(mllama))
    (mllama / "preprocessor_config.json").write_text('{"image_processor_type": "MllamaImageProcessor"}')
    full = fs.import_mllama(mllama, tmp / "imported").output
    adapter = fs.import_mllama(mllama, tmp / "adapter", adapter_only=True).output
    text_base = unfuse(full, tmp / "text-base").output
    llama = hf_model("llama", seed=3)
    mine = tmp / "my-llama"
    save_sharded(llama, mine)
    (mine / "tokenizer.json").write_text('{"version": "1.0"}')
    grafted = fs.graft(adapter, mine, tmp / "grafted", was=text_base)
    return {"tmp": tmp, "mllama": mllama, "full": full, "adapter": adapter, "text_base": text_base, "llama": llama,
            "mine": mine, "grafted": grafted}


def test_graft_exports_to_an_mllama_with_the_new_base(setting, tmp_path):
    import transformers

    out = export(setting["grafted"].output, tmp_path / "m", to="mllama").output
    model, info = transformers.MllamaForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32,
                                                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model.eval()
    t = tokens(vocab=VOCAB)
    with torch.no_grad():
        assert torch.equal(model(input_ids=t).logits, setting["llama"](t).logits)
        assert model(**image_inputs()).logits.isfinite().all()
    # the cross-attention layers (and the vision parts) are the adapter's, bit for bit
    got, adapter, source = Checkpoint.open(out), Checkpoint.open(setting["adapter"]), Checkpoint.open(setting["mllama"])
    for mllama_layer, layer in ((1, 1), (4, 3)):
        for name in ("cross_attn.q_proj.weight", "cross_attn.k_norm.weight", "cross_attn_attn_gate", "mlp.down_proj.weight"):
            assert got.read_bytes(f"language_model.model.layers.{mllama_layer}.{name}") == \
                adapter.read_bytes(f"model.layers.{layer}.fusion_layer.{name}")
    assert sorted(k for k in got.keys() if k.startswith("vision_model.")) == sorted(
        k for k in source.keys() if k.startswith("vision_model."))
    for key in (k for k in source.keys() if k.startswith(("vision_model.", "multi_modal_projector."))):
        assert got.read_bytes(key) == source.read_bytes(key), key
    config = read_json(out / "config.json")
    assert config["text_config"]["rope_parameters"]["rope_type"] == "llama3"  # the new base's RoPE, not the Mllama's
    assert config["vision_config"] == read_json(setting["mllama"] / "config.json")["vision_config"]


def test_graft_output_is_a_fused_checkpoint_of_the_base(setting):
    out = setting["grafted"].output
    for shard in (p.name for p in setting["mine"].glob("model-*.safetensors")):
        assert (out / shard).read_bytes() == (setting["mine"] / shard).read_bytes(), shard
    assert (out / "tokenizer.json").exists() and (out / "preprocessor_config.json").exists()
    report = verify(out)
    assert report.ok, [c.details for c in report.checks]
    manifest = read_json(out / "fusion_manifest.json")
    g = manifest["graft"]
    assert g["adapter"]["digest"] == setting["grafted"].adapter_digest and len(g["adapter"]["digest"]) == 64
    assert g["adapter_base"]["files"] == read_json(setting["adapter"] / "fusion_manifest.json")["base"]["files"]
    assert g["base"] == {"name": setting["mine"].name, "files": manifest["base"]["files"]}  # a name, not a path
    assert g["same_as_adapter_base"]["tensors"] == 0
    assert {e["init"] for e in manifest["new_tensors"]} == {"imported"}
    notes = " ".join(fs.inspect_checkpoint(out).notes)
    assert "graft of the adapter" in notes and "53 vision tower and projector tensors in vision/" in notes
    t = tokens(vocab=VOCAB)
    with torch.no_grad():
        assert torch.allclose(fs.load_fused(out, dtype=torch.float32)(t), setting["llama"](t).logits, atol=1e-5)
    unfuse(out, setting["tmp"] / "mine-again")
    for shard in (p.name for p in setting["mine"].glob("model-*.safetensors")):
        assert (setting["tmp"] / "mine-again" / shard).read_bytes() == (setting["mine"] / shard).read_bytes()


def test_was_reports_how_far_the_base_moved(setting, tmp_path):
    drift = setting["grafted"].drift
    summary = drift.summary()
    assert summary["tensors"] == 39 and summary["identical"] == 0 and summary["max"] > 0.1
    assert drift.matches_adapter_base == 39  # --was is the adapter's very base
    layers = drift.to_dict()["layers_moved_most"]
    assert [r["layer"] for r in layers] == sorted(range(4), key=lambda i: -dict(drift.layers())[i])
    assert {r["layer"] for r in layers if r["has_fusion_layer"]} == {1, 3}
    assert read_json(setting["grafted"].output / "fusion_manifest.json")["graft"]["was"]["summary"] == summary
    # back onto the adapter's own base, compared with the full import: nothing moved
    same = fs.graft(setting["adapter"], setting["text_base"], tmp_path / "same", was=setting["full"], link=True)
    assert same.drift.summary()["identical"] == 39 and same.drift.summary()["max"] == 0.0
    assert same.same_as_adapter_base == 39 and same.layout == "link"
    assert (tmp_path / "same" / "model.safetensors").stat().st_nlink > 1


def test_graft_of_a_fuse_adapter(tmp_path):
    base_a, _ = make_base(tmp_path, "llama")
    fs.fuse(base_a, tmp_path / "adapter", every=2, fusion_vocab=3, adapter_only=True, seed=4)
    other = hf_model("llama", seed=9)
    base_b = tmp_path / "b"
    other.save_pretrained(str(base_b))
    result = fs.graft(tmp_path / "adapter", base_b, tmp_path / "g")
    assert result.vision_tensors == 0 and result.fusion.layers == [1, 3]
    adapter = Checkpoint.open(tmp_path / "adapter")
    got = Checkpoint.open(tmp_path / "g")
    assert all(got.read_bytes(k) == adapter.read_bytes(k) for k in adapter.keys())
    t = tokens(vocab=VOCAB)
    with torch.no_grad():
        assert torch.allclose(fs.load_fused(tmp_path / "g", dtype=torch.float32)(t), other(t).logits, atol=1e-5)


def test_refusals_name_the_first_mismatch(setting, tmp_path, capsys):
    adapter = str(setting["adapter"])
    deeper = tmp_path / "deeper"
    hf_model("llama", num_hidden_layers=6).save_pretrained(str(deeper))
    narrow = tmp_path / "narrow"
    hf_model("llama", intermediate_size=80).save_pretrained(str(narrow))
    capsys.readouterr()
    cases = [
        (["graft", adapter, "--onto", str(deeper)], "layers differ (the adapter's base has 4"),
        (["graft", adapter, "--onto", str(narrow)], "MLP width differ (the adapter's base has 96"),
        (["graft", str(setting["full"]), "--onto", str(setting["mine"])], "is not an adapter"),
        (["graft", str(setting["mine"]), "--onto", str(setting["mine"])], "not an adapter (no fusion_manifest.json)"),
        (["graft", adapter, "--onto", str(setting["full"])], "already a fused checkpoint"),
        (["graft", adapter, "--onto", str(setting["mllama"])], "is an Mllama checkpoint: `fusionsurgery import` it"),
        (["graft", adapter, "--onto", str(setting["mine"]), "--was", str(deeper)], "--was"),
    ]
    for argv, message in cases:
        assert main([*argv, "-o", str(tmp_path / "out")]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(UsageError, match="layers differ"):
        fs.graft(adapter, deeper, tmp_path / "x")


def test_cli_graft_json(setting, tmp_path, capsys):
    argv = ["graft", str(setting["adapter"]), "--onto", str(setting["mine"]), "-o", str(tmp_path / "g"),
            "--was", str(setting["text_base"]), "--json"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fused_layers"] == [1, 3] and doc["vision_tensors"] == 53
    assert doc["drift"]["summary"]["tensors"] == 39 and len(doc["drift"]["layers_moved_most"]) == 4
    assert main(argv[:-1]) == 2 and "--force" in capsys.readouterr().err
    assert main([*argv[:-1], "--force"]) == 0
    assert "Layers that moved most" in capsys.readouterr().out
