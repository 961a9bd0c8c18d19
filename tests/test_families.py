"""Gemma and Phi-3: fused checkpoints against transformers' own models, the same way as Llama."""

from __future__ import annotations


import pytest
import torch

import fusionsurgery as fs
from fusionsurgery.arch.config import read_model_config
from fusionsurgery.errors import CheckpointError, UsageError
from fusionsurgery.io.checkpoint import Checkpoint
from helpers import open_gates, tokens

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    # Gemma: 1 + w norms, embeddings times sqrt(width), GeGLU, head_dim not width / heads, tied output
    "gemma": dict(SMALL, head_dim=24, hidden_act="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10000.0),
    # Phi-3: fused qkv_proj and gate_up_proj
    "phi3": dict(SMALL, rms_norm_eps=1e-5, rope_theta=10000.0),
    # Phi-3 with a sliding window shorter than the test sequence
    "phi3-window": dict(SMALL, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=5),
}


def reference(arch: str, seed: int = 0):
    import transformers

    kind = arch.split("-")[0]
    cfg_cls = {"gemma": transformers.GemmaConfig, "phi3": transformers.Phi3Config}[kind]
    model_cls = {"gemma": transformers.GemmaForCausalLM, "phi3": transformers.Phi3ForCausalLM}[kind]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**CONFIGS[arch])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma norms start at zero (scale 1 + 0): perturb them all
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def fused(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    ref = reference(request.param)
    base = tmp / "base"
    ref.save_pretrained(str(base))
    out = tmp / "fused"
    fs.fuse(base, out, every=2, seed=3)
    return request.param, base, ref, out


def encoder(ref, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 7, ref.config.hidden_size, generator=torch.Generator().manual_seed(seed))


def test_config_read_as_the_architecture_says(fused):
    arch, base, _, _ = fused
    cfg = read_model_config(Checkpoint.open(base))
    if arch == "gemma":
        assert (cfg.model_type, cfg.norm_offset, cfg.activation, cfg.head_dim) == ("gemma", 1.0, "gelu_pytorch_tanh", 24)
        assert cfg.embed_scale == pytest.approx(8.0) and cfg.tie_embeddings
    else:
        assert cfg.model_type == "phi3" and cfg.fused_qkv and cfg.fused_gate_up and cfg.norm_offset == 0
        assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_dim) == (4, 2, 16, 96)
        assert cfg.sliding_window == (5 if arch == "phi3-window" else None)


def test_original_keys_and_bytes_preserved(fused):
    _, base, _, out = fused
    b, f = Checkpoint.open(base), Checkpoint.open(out)
    for key in b.keys():
        assert f.read_bytes(key) == b.read_bytes(key), key
    if "phi3" in str(base):
        assert "model.layers.1.self_attn.qkv_proj.weight" in f.keys()
        assert "model.layers.1.mlp.gate_up_proj.weight" in f.keys()


def test_fusion_layer_is_mllama_shaped(fused):
    """The fusion layer keeps separate q/k/v and gate/up projections, whatever the base fuses."""
    _, _, _, out = fused
    keys = set(Checkpoint.open(out).keys())
    for part in ("cross_attn.q_proj.weight", "cross_attn.k_proj.weight", "cross_attn.v_proj.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight", "cross_attn_attn_gate"):
        assert f"model.layers.1.fusion_layer.{part}" in keys


def test_new_norms_start_as_identity(fused):
    arch, _, _, out = fused
    ckpt = Checkpoint.open(out)
    stored = 0.0 if arch == "gemma" else 1.0  # Gemma's norm multiplies by 1 + w
    norms = [k for k in ckpt.keys() if ".fusion_layer." in k and "norm" in k]
    assert len(norms) == 2 * 4
    for key in norms:
        assert torch.all(ckpt.read_tensor(key) == stored), key


def test_logits_equal_transformers(fused):
    arch, _, ref, out = fused
    model = fs.load_fused(out, dtype=torch.float32)
    t = tokens(vocab=ref.config.vocab_size)
    with torch.no_grad():
        expected = ref(t).logits
        assert torch.allclose(model(t), expected, atol=1e-4, rtol=0), arch
        assert torch.allclose(model(t, encoder_input=encoder(ref)), expected, atol=1e-4, rtol=0), arch


def test_open_gates_change_output_and_gemma_norm_scale_is_effective(fused):
    arch, _, ref, out = fused
    model = fs.load_fused(out, dtype=torch.float32)
    t, enc = tokens(vocab=ref.config.vocab_size), encoder(ref)
    with torch.no_grad():
        closed = model(t, encoder_input=enc)
        open_gates(model, 0.5)
        opened = model(t, encoder_input=enc)
        assert not torch.allclose(opened, closed, atol=1e-3)
        # the stored zeros of a Gemma norm act as a scale of one: a fusion norm equals the plain formula
        layer = model.layers[1].fusion_layer
        x = torch.randn(2, 3, 64)
        plain = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + layer.ca_norm.eps)
        assert torch.allclose(layer.ca_norm(x), plain, atol=1e-6)


def test_kv_cache_decoding_matches_full_forward(fused):
    arch, _, ref, out = fused
    model = fs.load_fused(out, dtype=torch.float32)
    t = tokens(batch=1, seq=10, vocab=ref.config.vocab_size)
    with torch.no_grad():
        full = model(t)
        model.setup_cache(1, torch.float32, encoder_max_seq_len=8, decoder_max_seq_len=16)
        steps = [model(t[:, :4])] + [model(t[:, i:i + 1]) for i in range(4, 10)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4), arch


def test_init_copy_reads_parts_of_fused_projections(tmp_path):
    ref = reference("phi3")
    base = tmp_path / "base"
    ref.save_pretrained(str(base))
    out = tmp_path / "copy"
    fs.fuse(base, out, layers="1", init="copy", dtype="same")
    ckpt = Checkpoint.open(out)
    qkv = ckpt.read_tensor("model.layers.1.self_attn.qkv_proj.weight")
    gate_up = ckpt.read_tensor("model.layers.1.mlp.gate_up_proj.weight")
    q, kv = 64, 32
    parts = {"cross_attn.q_proj": qkv[:q], "cross_attn.k_proj": qkv[q:q + kv], "cross_attn.v_proj": qkv[q + kv:],
             "mlp.gate_proj": gate_up[:96], "mlp.up_proj": gate_up[96:]}
    for name, expected in parts.items():
        assert torch.equal(ckpt.read_tensor(f"model.layers.1.fusion_layer.{name}.weight"), expected), name
    manifest = ckpt.read_manifest()
    inits = {t["name"]: t["init"] for t in manifest["new_tensors"]}
    assert inits["model.layers.1.fusion_layer.cross_attn.k_proj.weight"] == \
        "copy(model.layers.1.self_attn.qkv_proj.weight[64:96])"


def test_phi3_without_config_is_inferred_from_fused_shapes(tmp_path):
    ref = reference("phi3")
    base = tmp_path / "base"
    ref.save_pretrained(str(base))
    (base / "config.json").unlink()
    ckpt = Checkpoint.open(base)
    with pytest.raises(UsageError, match="`num_heads`"):
        read_model_config(ckpt)
    cfg = read_model_config(ckpt, num_heads=4)
    assert cfg.model_type == "phi3" and cfg.num_kv_heads == 2 and cfg.rope_theta is None


def test_config_that_contradicts_the_tensors_is_refused(tmp_path):
    import json

    base = tmp_path / "base"
    reference("phi3").save_pretrained(str(base))
    bad = json.loads((base / "config.json").read_text())
    bad["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="fused self_attn.qkv_proj"):
        read_model_config(Checkpoint.open(base, config=tmp_path / "config.json"))


def test_streamed_verification_computes_the_reference_logits(fused):
    """verify --stream builds its layers, norms and embeddings the architecture's way."""
    from fusionsurgery.verification import structure
    from fusionsurgery.verification.probe import make_probe
    from fusionsurgery.verification.stream import LayerStream, run_stream

    _, _, ref, out = fused
    ckpt = Checkpoint.open(out)
    _, layout = structure.check_structure(ckpt)
    dev, dt = torch.device("cpu"), torch.float32
    probe = make_probe(layout.cfg, layout.fusion, dev, dt)
    streamed = run_stream(LayerStream(ckpt, layout.cfg, layout.fusion, dev, dt), probe)
    with torch.no_grad():
        expected = ref(probe.tokens).logits
    torch.testing.assert_close(streamed.text, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(streamed.base, expected, rtol=0, atol=1e-4)
