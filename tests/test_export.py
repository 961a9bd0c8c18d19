"""export --to mllama: transformers' MllamaForCausalLM loads the output and computes load_fused's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fusionsurgery as fs
from fusionsurgery.cli import main
from fusionsurgery.errors import UsageError
from fusionsurgery.exporting import export
from fusionsurgery.io.checkpoint import Checkpoint
from helpers import make_base, read_json, tokens

VOCAB, DIM = 128, 64


def set_gates(fused: Path, value: float) -> None:
    """Open (or close) every tanh gate of a fused directory in place."""
    for f in fused.glob("fusion-*.safetensors"):
        tensors = load_file(str(f))
        for k in tensors:
            if k.endswith("_gate") or k.endswith("_scale.scale"):
                tensors[k] = torch.full_like(tensors[k], value)
        save_file(tensors, str(f), metadata={"format": "pt"})


def mllama(path: Path, attn: str = "eager"):
    import transformers

    model, info = transformers.MllamaForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                                 attn_implementation=attn, output_loading_info=True)
    return model.eval(), info


def sidecars(base: Path) -> None:
    (base / "tokenizer.json").write_text('{"version": "1.0"}')
    (base / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    (base / "chat_template.jinja").write_text("{{ messages }}")


@pytest.fixture(scope="module", params=["untied", "tied"])
def exported(request, tmp_path_factory):
    tied = request.param == "tied"
    tmp = tmp_path_factory.mktemp(request.param)
    base, ref = make_base(tmp, "llama", tie_word_embeddings=tied)
    sidecars(base)
    fused = tmp / "fused"
    # untied: 3 fusion tokens (padded to 8); tied: 10 (trimmed to 8)
    fs.fuse(base, fused, every=2, seed=5, fusion_vocab=10 if tied else 3)
    set_gates(fused, 0.6)  # open: the cross-attention contributes
    closed = tmp / "fused-closed"
    fs.fuse(base, closed, every=2, seed=5, fusion_vocab=10 if tied else 3)
    out = {}
    for name, src in (("open", fused), ("closed", closed)):
        out[name] = (src, tmp / f"mllama-{name}", export(src, tmp / f"mllama-{name}", to="mllama"))
    return tied, base, ref, out


def inputs(extra: int):
    t = tokens(batch=2, seq=12, vocab=VOCAB + extra, seed=3)
    t[:, 2] = VOCAB + extra - 1  # make sure fusion-vocabulary ids are used
    enc = torch.randn(2, 7, DIM, generator=torch.Generator().manual_seed(4))
    return t, enc


def test_loads_with_no_missing_unexpected_or_mismatched_keys(exported):
    _, _, _, out = exported
    for _, path, _ in out.values():
        _, info = mllama(path)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


@pytest.mark.parametrize("gates", ["open", "closed"])
def test_logits_equal_load_fused(exported, gates):
    tied, _, ref, out = exported
    src, path, _ = out[gates]
    ours = fs.load_fused(src, dtype=torch.float32)
    theirs, _ = mllama(path)
    t, enc = inputs(8 if tied else 3)
    with torch.no_grad():
        expected = ours(t, encoder_input=enc)
        assert torch.allclose(theirs(t, cross_attention_states=enc).logits, expected, atol=1e-4, rtol=0)
        assert torch.allclose(theirs(t).logits, ours(t), atol=1e-4, rtol=0)  # text only skips cross-attention
        if gates == "closed":
            base_only = t.clamp(max=VOCAB - 1)
            assert torch.allclose(theirs(base_only, cross_attention_states=enc).logits, ref(base_only).logits,
                                  atol=1e-4, rtol=0)
        else:
            assert not torch.allclose(expected, ours(t), atol=1e-3)  # the open gates do matter


def test_sdpa_needs_a_cross_attention_mask(exported):
    """transformers' SDPA path makes mask-less cross-attention causal; with a mask (as MllamaForConditionalGeneration
    always passes) it equals load_fused's."""
    tied, _, _, out = exported
    src, path, _ = out["open"]
    ours = fs.load_fused(src, dtype=torch.float32)
    theirs, _ = mllama(path, attn="sdpa")
    t, enc = inputs(8 if tied else 3)
    visible = torch.zeros(2, 1, t.shape[1], enc.shape[1])  # additive mask: every encoder position visible
    with torch.no_grad():
        got = theirs(t, cross_attention_states=enc, cross_attention_mask=visible).logits
        assert torch.allclose(got, ours(t, encoder_input=enc), atol=1e-4, rtol=0)


def test_config_carries_the_base_settings(exported):
    tied, base, _, out = exported
    _, path, result = out["open"]
    cfg, base_cfg = read_json(path / "config.json"), read_json(base / "config.json")
    assert cfg["model_type"] == "mllama_text_model" and cfg["architectures"] == ["MllamaForCausalLM"]
    assert cfg["cross_attention_layers"] == [1, 4] and cfg["num_hidden_layers"] == 6
    rope = cfg["rope_parameters"]
    assert rope["rope_theta"] == 500000.0 and rope["rope_type"] == "llama3"
    assert rope["original_max_position_embeddings"] == 64 and rope["factor"] == 8.0
    assert cfg["rms_norm_eps"] == base_cfg["rms_norm_eps"] and cfg["tie_word_embeddings"] is False
    assert 0 <= cfg["pad_token_id"] < VOCAB + 8
    assert [m["kind"] for m in result.layer_map] == ["self", "cross", "self", "self", "cross", "self"]
    notes = " ".join(result.notes)
    assert ("trimmed from 10" in notes) if tied else ("padded with 5 zero row(s)" in notes)
    if tied:
        assert "untied" in notes


def test_bytes_kept_except_the_named_transforms(exported):
    tied, _, _, out = exported
    src_path, path, result = out["open"]
    src, dst = Checkpoint.open(src_path), Checkpoint.open(path)
    manifest = read_json(path / "export_manifest.json")
    transformed = {e["name"] for e in manifest["transformed"]}
    assert transformed == ({"model.embed_tokens.weight", "lm_head.weight"} if tied else {"model.embed_tokens.weight"})
    for entry in manifest["tensors"]:
        if entry["transform"] is None:
            (source,) = entry["from"]
            assert dst.read_bytes(entry["name"]) == src.read_bytes(source), entry["name"]
    embed = dst.read_tensor("model.embed_tokens.weight")
    assert torch.equal(embed[:VOCAB], src.read_tensor("model.embed_tokens.weight"))
    extra = src.read_tensor("model.embed_tokens.fusion_embedding.weight")
    kept = min(extra.shape[0], 8)
    assert torch.equal(embed[VOCAB:VOCAB + kept], extra[:kept])
    assert torch.count_nonzero(embed[VOCAB + kept:]) == 0
    if tied:
        assert dst.read_bytes("lm_head.weight") == src.read_bytes("model.embed_tokens.weight")


def test_tokenizer_and_template_files_carried(exported):
    _, _, _, out = exported
    _, path, _ = out["open"]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (path / name).exists(), name


def test_fusion_after_becomes_the_layer_after(tmp_path):
    base, _ = make_base(tmp_path, "llama")
    fused = tmp_path / "fused"
    fs.fuse(base, fused, layers="1,3", fusion_after=True, seed=2)
    set_gates(fused, 0.5)
    result = export(fused, tmp_path / "m", to="mllama")
    assert read_json(tmp_path / "m" / "config.json")["cross_attention_layers"] == [2, 5]  # 5: the last layer
    assert [(m["kind"], m["source_layer"]) for m in result.layer_map][-2:] == [("self", 3), ("cross", 3)]
    theirs, _ = mllama(tmp_path / "m")
    ours = fs.load_fused(fused, dtype=torch.float32)
    t, enc = inputs(0)
    with torch.no_grad():
        assert torch.allclose(theirs(t, cross_attention_states=enc).logits, ours(t, encoder_input=enc), atol=1e-4)


def test_refusals_say_why(tmp_path):
    base, _ = make_base(tmp_path, "llama")
    with pytest.raises(UsageError, match="not a fused checkpoint"):
        export(base, tmp_path / "a", to="mllama")
    wide = tmp_path / "wide"
    fs.fuse(base, wide, every=2, encoder_dim=48)
    with pytest.raises(UsageError, match=r"`encoder_dim` 48.*as wide as the decoder \(64\)"):
        export(wide, tmp_path / "b", to="mllama")
    qwen, _ = make_base(tmp_path, "qwen2")
    fs.fuse(qwen, tmp_path / "qf", every=2)
    with pytest.raises(UsageError, match="q/k/v biases"):
        export(tmp_path / "qf", tmp_path / "c", to="mllama")
    with pytest.raises(UsageError, match="`to` must be one of"):
        export(tmp_path / "qf", tmp_path / "d", to="gguf")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing half-written


def test_torchtune_named_source_gives_the_same_mllama_bytes(tmp_path):
    base, _ = make_base(tmp_path, "llama")
    fused = tmp_path / "fused"
    fs.fuse(base, fused, every=2, fusion_vocab=2)
    export(fused, tmp_path / "direct", to="mllama")
    export(fused, tmp_path / "tune", to="torchtune")
    export(tmp_path / "tune", tmp_path / "via-tune", to="mllama")
    a, b = Checkpoint.open(tmp_path / "direct"), Checkpoint.open(tmp_path / "via-tune")
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
        assert a.read_bytes(key) == b.read_bytes(key), key


def test_cli_export_json(tmp_path, capsys):
    base, _ = make_base(tmp_path, "llama")
    fs.fuse(base, tmp_path / "fused", every=2)
    assert main(["export", str(tmp_path / "fused"), "--to", "mllama", "-o", str(tmp_path / "m"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["target"] == "mllama" and doc["transformed"][0]["name"] == "model.embed_tokens.weight"
    assert main(["export", str(tmp_path / "fused"), "--to", "mllama", "-o", str(tmp_path / "m")]) == 2  # exists
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(base), "--to", "mllama", "-o", str(tmp_path / "x")]) == 2
    assert "fusionsurgery fuse" in capsys.readouterr().err
