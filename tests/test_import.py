"""import: a transformers Mllama into the fused layout, and back with export --to mllama, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import fusionsurgery as fs
from fusionsurgery.cli import main
from fusionsurgery.errors import CheckpointError, UsageError
from fusionsurgery.exporting import export, unfuse
from fusionsurgery.io.checkpoint import Checkpoint
from fusionsurgery.verification import verify
from helpers import image_inputs, make_base, mllama_model, read_json, same_checkpoint, tokens

VOCAB = 128


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Tiny Mllama checkpoints: with a vision tower (Hub names), and text only (MllamaForCausalLM)."""
    tmp = tmp_path_factory.mktemp("mllama")
    out = {}
    for name, vision in (("vision", True), ("text", False)):
        model = mllama_model(vision)
        model.save_pretrained(str(tmp / name))
        out[name] = (tmp / name, model)
    (tmp / "vision" / "preprocessor_config.json").write_text('{"image_processor_type": "MllamaImageProcessor"}')
    return tmp, out


@pytest.fixture(scope="module")
def imported(sources):
    tmp, models = sources
    return {name: (path, model, fs.import_mllama(path, tmp / f"{name}-imported")) for name, (path, model) in models.items()}


def test_layout_of_an_import(imported):
    path, _, result = imported["vision"]
    out = result.output
    assert (result.architecture, result.source_layout) == ("MllamaForConditionalGeneration", "hub")
    assert result.fused_layers == [1, 3] and result.fusion_first and result.cross_attention_layers == [1, 4]
    config = read_json(out / "config.json")
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 4
    assert config["fusion"]["layers"] == [1, 3] and config["fusion"]["fusion_vocab"] == 8
    src, dst = Checkpoint.open(path), Checkpoint.open(out)
    # Mllama layers 0, 2, 3, 5 are the base's 0..3; cross-attention layer 1 wraps layer 1 (Mllama's 2), 4 wraps 3 (5)
    for mllama, ours in ((0, "model.layers.0."), (2, "model.layers.1."), (5, "model.layers.3."),
                         (1, "model.layers.1.fusion_layer."), (4, "model.layers.3.fusion_layer.")):
        name = "cross_attn.q_proj.weight" if "fusion" in ours else "self_attn.q_proj.weight"
        assert dst.read_bytes(ours + name) == src.read_bytes(f"language_model.model.layers.{mllama}.{name}")
    embed = src.read_bytes("language_model.model.embed_tokens.weight")
    row = 64 * 4
    assert dst.read_bytes("model.embed_tokens.weight") == embed[:VOCAB * row]
    assert dst.read_bytes("model.embed_tokens.fusion_embedding.weight") == embed[VOCAB * row:]
    assert dst.read_bytes("lm_head.weight") == src.read_bytes("language_model.lm_head.weight")
    # the vision tower and projector: their own files, original names and bytes, named in the manifest
    vision = Checkpoint.open(out / "vision")
    assert sorted(vision.keys()) == sorted(k for k in src.keys() if k.startswith(("vision_model.", "multi_modal_projector.")))
    assert all(vision.read_bytes(k) == src.read_bytes(k) for k in vision.keys())
    manifest = read_json(out / "fusion_manifest.json")
    assert {t["name"] for t in manifest["mllama"]["vision"]["tensors"]} == set(vision.keys())
    assert manifest["mllama"]["config"] == read_json(path / "config.json")
    assert (out / "preprocessor_config.json").exists()


@pytest.mark.parametrize("name", ["vision", "text"])
def test_export_rebuilds_the_same_checkpoint(imported, tmp_path, name):
    import transformers

    path, model, result = imported[name]
    back = tmp_path / "back"
    export(result.output, back, to="mllama")
    same_checkpoint(path, back)
    cls = transformers.MllamaForConditionalGeneration if name == "vision" else transformers.MllamaForCausalLM
    again, info = cls.from_pretrained(str(back), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        if name == "vision":
            assert torch.equal(again.eval()(**image_inputs()).logits, model(**image_inputs()).logits)
        else:
            states = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
            t = tokens(vocab=VOCAB + 8)
            assert torch.equal(again.eval()(t, cross_attention_states=states).logits,
                               model(t, cross_attention_states=states).logits)


@pytest.mark.parametrize("name", ["vision", "text"])
def test_text_base_is_the_mllama_text_only(imported, tmp_path, name):
    """unfuse gives the text base; transformers' Llama computes the Mllama's text-only logits from it."""
    import transformers

    _, model, result = imported[name]
    unfuse(result.output, tmp_path / "base")
    assert "fusion" not in read_json(tmp_path / "base" / "config.json")
    llama = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32).eval()
    t = tokens(vocab=VOCAB)
    with torch.no_grad():
        expected = model(input_ids=t).logits
        assert torch.equal(llama(t).logits, expected)
        assert torch.allclose(fs.load_fused(result.output, dtype=torch.float32)(t), expected, atol=1e-5, rtol=0)


def test_load_fused_computes_the_mllama_with_cross_attention(imported):
    _, model, result = imported["text"]
    ours = fs.load_fused(result.output, dtype=torch.float32)
    states = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    t = tokens(vocab=VOCAB + 8)
    visible = torch.zeros(2, 1, t.shape[1], states.shape[1])  # SDPA needs the (additive) mask to see every state
    with torch.no_grad():
        theirs = model(t, cross_attention_states=states, cross_attention_mask=visible).logits
        assert torch.allclose(ours(t, encoder_input=states), theirs, atol=1e-4, rtol=0)


def test_verify_reads_an_import(imported):
    report = verify(imported["vision"][2].output)
    assert report.ok, [c.details for c in report.checks]
    identity = next(c for c in report.checks if c.name == "identity")
    assert identity.figures["trained_gates"] == [1, 3]  # the Mllama's gates are open: reported, not failed
    originals = report.check("originals")
    assert originals.figures["vision_tensors"] > 0 and originals.figures["changed_vision_tensors"] == []


def test_verify_checks_the_vision_parts(imported, tmp_path):
    """A missing vision/ fails the structure check; a changed vision tensor is named (trained?), not failed."""
    import shutil

    src = imported["vision"][2].output
    gone = tmp_path / "gone"
    shutil.copytree(src, gone)
    shutil.rmtree(gone / "vision")
    report = verify(gone)
    assert not report.ok and "vision" in " ".join(report.check("structure").details).lower()

    changed = tmp_path / "changed"
    shutil.copytree(src, changed)
    shard = sorted((changed / "vision").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10  # a bit of the last tensor's last bytes
    shard.write_bytes(bytes(data))
    report = verify(changed)
    assert report.ok, [c.details for c in report.failures]
    assert len(report.check("originals").figures["changed_vision_tensors"]) == 1


def test_adapter_only_names_the_base_a_full_import_writes(imported, tmp_path):
    path, _, full = imported["vision"]
    adapter = fs.import_mllama(path, tmp_path / "adapter", adapter_only=True)
    assert adapter.layout == "adapter"
    names = sorted(p.relative_to(adapter.output).as_posix() for p in adapter.output.rglob("*") if p.is_file())
    assert names == ["config.json", "fusion-00001-of-00001.safetensors", "fusion_manifest.json",
                     "generation_config.json", "preprocessor_config.json", "vision/vision.safetensors"]
    a, f = read_json(adapter.output / "fusion_manifest.json"), read_json(full.output / "fusion_manifest.json")
    assert a["layout"] == "adapter" and a["base"]["files"] == f["base"]["files"]
    unfuse(full.output, tmp_path / "text-base")
    t = tokens(vocab=VOCAB + 8)
    with torch.no_grad():
        assert torch.equal(fs.load_fused(adapter.output, base=tmp_path / "text-base", dtype=torch.float32)(t),
                           fs.load_fused(full.output, dtype=torch.float32)(t))
    export(adapter.output, tmp_path / "back", to="mllama", base=tmp_path / "text-base")
    same_checkpoint(path, tmp_path / "back")


def test_vision_parts_travel_through_torchtune_names(imported, tmp_path):
    path, _, result = imported["vision"]
    tune = export(result.output, tmp_path / "tune", to="torchtune")
    assert any("vision" in n for n in tune.notes) and (tmp_path / "tune" / "vision" / "vision.safetensors").exists()
    export(tmp_path / "tune", tmp_path / "hf", to="hf")
    export(tmp_path / "hf", tmp_path / "back", to="mllama")
    same_checkpoint(path, tmp_path / "back")


def test_module_names_round_trip(sources, tmp_path):
    """A state_dict saved as is (model.language_model.*, model.vision_model.*) comes back under those names."""
    _, models = sources
    path, model = models["vision"]
    raw = tmp_path / "raw"
    raw.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(raw / "model.safetensors"))
    (raw / "config.json").write_text((path / "config.json").read_text())
    result = fs.import_mllama(raw, tmp_path / "imp")
    assert result.source_layout == "module"
    export(result.output, tmp_path / "back", to="mllama")
    same_checkpoint(raw, tmp_path / "back")


def test_a_last_cross_attention_layer_becomes_a_fusion_after(tmp_path):
    import transformers

    model = mllama_model(False, cross_attention_layers=[2, 5])
    model.save_pretrained(str(tmp_path / "m"))
    result = fs.import_mllama(tmp_path / "m", tmp_path / "imp")
    assert not result.fusion_first and result.fused_layers == [1, 3]
    export(result.output, tmp_path / "back", to="mllama")
    same_checkpoint(tmp_path / "m", tmp_path / "back")
    assert transformers.MllamaForCausalLM.from_pretrained(str(tmp_path / "back")).config.cross_attention_layers == [2, 5]


def test_refusals_are_one_line_and_leave_nothing(tmp_path, capsys):
    base, _ = make_base(tmp_path, "llama")
    assert main(["import", str(base), "-o", str(tmp_path / "a")]) == 2
    assert "not an Mllama checkpoint" in capsys.readouterr().err
    model = mllama_model(False, cross_attention_layers=[1, 2])
    model.save_pretrained(str(tmp_path / "adjacent"))
    with pytest.raises(UsageError, match=r"cross-attention layers \[1, 2\] cannot each sit beside"):
        fs.import_mllama(tmp_path / "adjacent", tmp_path / "b")
    (tmp_path / "adjacent" / "config.json").unlink()
    capsys.readouterr()
    assert main(["import", str(tmp_path / "adjacent"), "-o", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "no config.json" in err and len(err.strip().splitlines()) == 1
    assert main(["import", str(tmp_path / "nowhere"), "-o", str(tmp_path / "d")]) == 2
    assert not [p.name for p in tmp_path.iterdir() if p.name[:1] in "abcd." and p.name not in ("adjacent",)]


def test_a_foreign_tensor_is_refused(sources, tmp_path):
    _, models = sources
    path, model = models["text"]
    odd = tmp_path / "odd"
    odd.mkdir()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tensors["model.layers.0.self_attn.rotary.weight"] = torch.zeros(2)
    save_file(tensors, str(odd / "model.safetensors"))
    (odd / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match="rotary.weight has no place"):
        fs.import_mllama(odd, tmp_path / "x")


def test_cli_import_json(sources, tmp_path, capsys):
    _, models = sources
    path, _ = models["vision"]
    assert main(["import", str(path), "-o", str(tmp_path / "i"), "--adapter-only", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["layout"] == "adapter" and doc["tensors"] == {"base": 39, "fusion": 27, "vision": 53}
    assert main(["import", str(path), "-o", str(tmp_path / "i")]) == 2  # exists
    assert "--force" in capsys.readouterr().err
