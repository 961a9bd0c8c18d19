"""export --to torchtune (and back with --to hf), torchtune-named checkpoints and --rope-defaults."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file

import fusionsurgery as fs
from fusionsurgery.arch.config import FusionConfig, read_model_config
from fusionsurgery.arch.families import FAMILIES
from fusionsurgery.native.builders import build_decoder
from fusionsurgery.cli import main
from fusionsurgery.errors import UsageError
from fusionsurgery.exporting import export
from fusionsurgery.io.checkpoint import Checkpoint
from helpers import make_base, read_json, tokens
from test_export import mllama, set_gates

# torchtune's Llama 3 RoPE (Llama3ScaledRoPE's defaults), so --rope-defaults llama3 describes the base
LLAMA3_ROPE = dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
HEADS, KV_HEADS, HEAD_DIM, DIM = 4, 2, 16, 64


def hf_to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from HF's half layout to interleaved pairs (written independently of
    the tool: split each head into its two halves and zip them)."""
    rest = w.shape[1:]
    halves = w.reshape(heads, 2, HEAD_DIM // 2, *rest)  # [head, which half, pair, ...]
    return halves.transpose(1, 2).reshape(heads * HEAD_DIM, *rest)  # [head, pair, which half, ...]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    base, ref = make_base(tmp, "llama", **LLAMA3_ROPE)
    fused = tmp / "fused"
    fs.fuse(base, fused, every=2, seed=9, fusion_vocab=3)
    set_gates(fused, 0.4)
    tune = tmp / "tune"
    result = export(fused, tune, to="torchtune")
    return tmp, base, ref, fused, tune, result


def test_torchtune_names_throughout(setup):
    _, _, _, fused, tune, _ = setup
    keys = Checkpoint.open(tune).keys()
    tt = FAMILIES["torchtune"]
    assert all(tt.knows(k) for k in keys)
    assert {"tok_embeddings.weight", "tok_embeddings.fusion_embedding.weight", "output.weight", "norm.scale",
            "layers.1.fusion_layer.attn.q_norm.scale", "layers.1.fusion_layer.ca_scale.scale"} <= set(keys)
    assert len(keys) == len(Checkpoint.open(fused).keys())


def test_qk_permuted_and_everything_else_bit_identical(setup):
    _, _, _, fused, tune, result = setup
    src, dst = Checkpoint.open(fused), Checkpoint.open(tune)
    hf = FAMILIES["hf"]
    permuted = set()
    for key in src.keys():
        canonical = hf.to_canonical(key)
        new = dst.read_tensor(canonical)
        if canonical.endswith(("attn.q_proj.weight", "attn.k_proj.weight")) and ".fusion_layer." not in canonical:
            heads = HEADS if "q_proj" in canonical else KV_HEADS
            assert torch.equal(new, hf_to_interleaved(src.read_tensor(key), heads)), canonical
            assert not torch.equal(new, src.read_tensor(key))
            permuted.add(canonical)
        else:
            assert dst.read_bytes(canonical) == src.read_bytes(key), canonical
            assert dst.info(canonical).dtype == src.info(key).dtype
    assert len(permuted) == 8
    manifest = read_json(tune / "export_manifest.json")
    assert {e["name"] for e in manifest["transformed"]} == permuted
    assert all("half -> interleaved" in e["transform"] for e in manifest["transformed"])
    assert {t["name"] for t in result.transformed} == permuted


def test_logits_the_torchtune_way_equal_the_base(setup):
    """load_fused reads torchtune names with interleaved RoPE: same logits as the HF checkpoint."""
    _, _, ref, fused, tune, _ = setup
    theirs = fs.load_fused(tune, dtype=torch.float32)
    assert all(m.layout == "interleaved" for m in theirs.modules() if hasattr(m, "layout"))
    ours = fs.load_fused(fused, dtype=torch.float32)
    t = tokens(vocab=128 + 3)
    enc = torch.randn(2, 5, DIM)
    with torch.no_grad():
        assert torch.allclose(theirs(t.clamp(max=127)), ref(t.clamp(max=127)).logits, atol=1e-4, rtol=0)
        assert torch.allclose(theirs(t, encoder_input=enc), ours(t, encoder_input=enc), atol=1e-4, rtol=0)


def test_strict_load_into_a_torchtune_named_decoder(setup):
    _, _, _, fused, tune, _ = setup
    loaded = fs.open_model(fused, dtype=torch.float32)
    cfg = read_model_config(Checkpoint.open(tune))
    assert cfg.family == "torchtune"
    model = build_decoder(cfg, FusionConfig(layers=[1, 3], fusion_vocab=3, encoder_dim=DIM))
    state = load_file(str(tune / "model.safetensors"))
    model.load_state_dict(state, strict=True)  # torchtune's FusionLayer contract: original keys, fusion_layer.*
    t = tokens(vocab=131)
    with torch.no_grad():
        assert torch.allclose(model.float()(t), loaded.model(t), atol=1e-4)


def test_round_trip_hf_torchtune_hf_is_bit_identical(setup):
    tmp, _, _, fused, tune, _ = setup
    back = tmp / "back"
    export(tune, back, to="hf")
    a, b = Checkpoint.open(fused), Checkpoint.open(back)
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
        assert (a.info(key).dtype, a.info(key).shape) == (b.info(key).dtype, b.info(key).shape)
        assert a.read_bytes(key) == b.read_bytes(key), key
    assert read_json(back / "config.json") == read_json(fused / "config.json")
    manifest = read_json(back / "fusion_manifest.json")  # still a fused checkpoint of this tool
    assert {e["name"] for e in manifest["new_tensors"]} == {k for k in a.keys() if "fusion" in k}


def test_torchtune_named_base_fused_agrees_with_hf_naming(setup):
    tmp, base, ref, fused, _, _ = setup
    tune_base = tmp / "tune-base"
    export(base, tune_base, to="torchtune")  # a plain base converts too
    tune_fused = tmp / "tune-fused"
    fs.fuse(tune_base, tune_fused, every=2, seed=9, fusion_vocab=3)
    a, b = Checkpoint.open(fused), Checkpoint.open(tune_fused)
    # same seed, same fusion weights, whatever the naming
    assert b.read_bytes("layers.1.fusion_layer.attn.q_proj.weight") == \
        a.read_bytes("model.layers.1.fusion_layer.cross_attn.q_proj.weight")
    set_gates(tune_fused, 0.4)
    theirs = fs.load_fused(tune_fused, dtype=torch.float32)
    ours = fs.load_fused(fused, dtype=torch.float32)
    t = tokens(vocab=131, seed=5)
    enc = torch.randn(2, 6, DIM)
    with torch.no_grad():
        assert torch.allclose(theirs(t, encoder_input=enc), ours(t, encoder_input=enc), atol=1e-4, rtol=0)
        assert torch.allclose(theirs(t.clamp(max=127)), ref(t.clamp(max=127)).logits, atol=1e-4, rtol=0)
    assert sorted(a.keys()) == sorted(FAMILIES["hf"].to_family(k) for k in b.keys())


def test_without_config_rope_needs_config_or_defaults(setup):
    """A torchtune base with no config.json: shapes give the architecture, but never RoPE."""
    tmp, base, ref, _, _, _ = setup
    bare = tmp / "bare-base"
    export(base, bare, to="torchtune")
    (bare / "config.json").unlink()
    fused = tmp / "bare-fused"
    fs.fuse(bare, fused, every=2, seed=1, num_heads=HEADS)
    assert "rope_theta" not in read_json(fused / "config.json")
    with pytest.raises(UsageError, match="`config` PATH .* or `rope_defaults` llama3"):
        fs.load_fused(fused, dtype=torch.float32)
    with pytest.raises(UsageError, match="`config` PATH"):
        export(fused, tmp / "bare-m", to="mllama")
    model = fs.load_fused(fused, dtype=torch.float32, rope_defaults="llama3")
    t = tokens(vocab=128)
    with torch.no_grad():
        assert torch.allclose(model(t), ref(t).logits, atol=1e-4, rtol=0)
    assert main(["export", str(fused), "--to", "mllama", "-o", str(tmp / "bare-m"), "--rope-defaults", "llama3"]) == 0
    rope = read_json(tmp / "bare-m" / "config.json")["rope_parameters"]
    assert rope == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    theirs, _ = mllama(tmp / "bare-m")
    with torch.no_grad():
        assert torch.allclose(theirs(t).logits, ref(t).logits, atol=1e-4, rtol=0)


def test_bad_rope_defaults(tmp_path):
    """(The other native types' torchtune exports: test_torchtune_families.py.)"""
    qwen, _ = make_base(tmp_path, "qwen2")
    with pytest.raises(UsageError, match="`rope_defaults` must be one of llama3"):
        fs.load_fused(qwen, rope_defaults="llama9")


def test_verify_accepts_the_torchtune_export(setup):
    _, _, _, _, tune, _ = setup
    assert main(["verify", str(tune), "--device", "cpu"]) == 0


def test_torchtune_itself_loads_strictly_and_agrees(setup):
    """Runs where torchtune installs (it needs torchao and torchvision); the suite does not depend on it."""
    tt = pytest.importorskip("torchtune.models.llama3_2_vision")
    tmp, base, _, _, _, _ = setup
    closed = tmp / "closed"
    fs.fuse(base, closed, every=2, seed=9, fusion_vocab=3)
    export(closed, tmp / "closed-tune", to="torchtune")
    model = tt.llama3_2_vision_decoder(vocab_size=128, num_layers=4, fusion_interval=2, num_special_tokens=3,
                                       num_heads=HEADS, num_kv_heads=KV_HEADS, embed_dim=DIM, max_seq_len=256,
                                       encoder_max_seq_len=16, rope_base=500000, intermediate_dim=96)
    model.load_state_dict(load_file(str(tmp / "closed-tune" / "model.safetensors")), strict=True)
    ours = fs.load_fused(closed, dtype=torch.float32)
    t = tokens(vocab=131)
    enc = torch.randn(2, 5, DIM)
    with torch.no_grad():
        assert torch.allclose(model.float().eval()(t, encoder_input=enc), ours(t, encoder_input=enc), atol=1e-4)
