"""Fused checkpoints against transformers' own models: bytes kept, logits equal, still loadable."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import fusionsurgery as fs
from fusionsurgery.io.checkpoint import Checkpoint
from helpers import make_base, open_gates, tokens

ARCHS = ["llama", "qwen2", "qwen3"]


@pytest.fixture(scope="module", params=ARCHS)
def fused(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    base, ref = make_base(tmp, request.param)
    out = tmp / "fused"
    result = fs.fuse(base, out, every=2, seed=7)
    return request.param, base, ref, out, result


def test_original_keys_and_bytes_preserved(fused):
    _, base, _, out, _ = fused
    b, f = Checkpoint.open(base), Checkpoint.open(out)
    assert set(b.keys()) <= set(f.keys())
    for key in b.keys():
        assert f.read_bytes(key) == b.read_bytes(key), key
        assert f.info(key).dtype == b.info(key).dtype and f.info(key).shape == b.info(key).shape
    # the original shard file itself is carried over unchanged
    assert (out / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()


def test_fused_layers_where_asked(fused):
    _, _, ref, out, result = fused
    n = ref.config.num_hidden_layers
    expected = [i for i in range(n) if (i + 1) % 2 == 0]
    assert result.fusion.layers == expected
    keys = Checkpoint.open(out).keys()
    fused_layers = sorted({int(k.split(".")[2]) for k in keys if ".fusion_layer." in k})
    assert fused_layers == expected
    for i in expected:
        assert f"model.layers.{i}.fusion_layer.cross_attn.q_proj.weight" in keys
        assert f"model.layers.{i}.fusion_layer.cross_attn_attn_gate" in keys
        assert f"model.layers.{i}.fusion_layer.mlp.gate_proj.weight" in keys


def test_logits_equal_transformers_text_only_and_with_encoder(fused):
    arch, _, ref, out, _ = fused
    model = fs.load_fused(out, dtype=torch.float32)
    t = tokens(vocab=ref.config.vocab_size)
    enc = torch.randn(2, 7, ref.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(t).logits
        text_only = model(t)
        with_encoder = model(t, encoder_input=enc)
    assert text_only.shape == (2, t.shape[1], ref.config.vocab_size)
    assert torch.allclose(text_only, expected, atol=1e-4, rtol=0), arch
    assert torch.allclose(with_encoder, expected, atol=1e-4, rtol=0), arch


def test_opening_gates_changes_output(fused):
    _, _, ref, out, _ = fused
    model = fs.load_fused(out, dtype=torch.float32)
    t = tokens(vocab=ref.config.vocab_size)
    enc = torch.randn(2, 7, ref.config.hidden_size)
    with torch.no_grad():
        closed = model(t, encoder_input=enc)
        open_gates(model, 0.5)
        opened = model(t, encoder_input=enc)
        text_only = model(t)
    assert not torch.allclose(opened, closed, atol=1e-3)
    # text-only still skips the cross-attention entirely
    assert torch.equal(text_only, closed)


def test_transformers_still_loads_the_fused_directory(fused):
    arch, _, ref, out, _ = fused
    import transformers

    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    t = tokens(vocab=ref.config.vocab_size)
    with torch.no_grad():
        assert torch.allclose(loaded(t).logits, ref(t).logits, atol=1e-5)


def test_fusion_tensors_follow_the_manifest(fused):
    _, _, _, out, result = fused
    manifest = Checkpoint.open(out).read_manifest()
    assert manifest["totals"]["fusion_params"] == result.fusion_params
    with safe_open(str(out / "fusion-00001-of-00001.safetensors"), "pt") as fh:
        for entry in manifest["new_tensors"]:
            t = fh.get_tensor(entry["name"])
            assert list(t.shape) == entry["shape"]
            if entry["name"].endswith("_gate"):
                assert torch.count_nonzero(t) == 0
            elif "norm" in entry["name"]:
                assert torch.all(t == 1)
            else:
                assert t.float().std() > 0


def test_interleaved_layout_on_hf_weights_is_wrong(fused):
    """The RoPE layout matters: HF q/k rows read with torchtune's layout give other logits."""
    _, _, ref, out, _ = fused
    loaded = fs.open_model(out, dtype=torch.float32)
    from fusionsurgery.native.builders import build_empty
    from fusionsurgery.native.loading import load_tensors

    wrong = build_empty(loaded.config, loaded.fusion, dtype=torch.float32, device="cpu", rope_layout="interleaved")
    load_tensors(wrong, loaded.checkpoint)
    t = tokens(vocab=ref.config.vocab_size)
    with torch.no_grad():
        assert not torch.allclose(wrong(t), ref(t).logits, atol=1e-4)
