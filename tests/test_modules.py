"""The FusionLayer contract (DESIGN.md section 1) and the modules under it."""

from __future__ import annotations

import torch
from torch import nn

from fusionsurgery import FusionEmbedding, FusionLayer, get_fusion_params, set_trainable_params
from fusionsurgery.arch.config import FusionConfig, ModelConfig
from fusionsurgery.native.builders import build_decoder, build_fusion_layer, build_self_attention_layer
from fusionsurgery.modules import RotaryEmbedding, TransformerDecoder
from fusionsurgery.modules.norm import RMSNorm
from helpers import open_gates

CFG = ModelConfig(family="torchtune", model_type="llama", num_layers=4, dim=32, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_dim=48, vocab_size=50, rope_theta=10000.0)
FUSION = FusionConfig(layers=[1, 3], encoder_dim=24)


def _decoder(fused: set[int]) -> TransformerDecoder:
    torch.manual_seed(0)
    rope = RotaryEmbedding(CFG.head_dim, 10000.0, layout="interleaved")
    layers = []
    for i in range(CFG.num_layers):
        layer: nn.Module = build_self_attention_layer(CFG, rope)
        if i in fused:
            layer = FusionLayer(layer, build_fusion_layer(CFG, FUSION))
        layers.append(layer)
    return TransformerDecoder(tok_embeddings=nn.Embedding(CFG.vocab_size, CFG.dim), layers=layers,
                              norm=RMSNorm(CFG.dim), output=nn.Linear(CFG.dim, CFG.vocab_size, bias=False))


def test_seed_example_wrap_build_and_load_original_state_dict():
    """torchtune's example: wrap a self-attention layer, build the decoder, load the original weights."""
    original = _decoder(set())
    fused = _decoder({1, 3})
    result = fused.load_state_dict(original.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(".fusion_layer." in k for k in result.missing_keys)
    fused_sd = fused.state_dict()
    base_part = {k: v for k, v in fused_sd.items() if ".fusion_layer." not in k}
    assert base_part.keys() == original.state_dict().keys()
    for k, v in original.state_dict().items():
        assert torch.equal(base_part[k], v)
    t = torch.randint(0, CFG.vocab_size, (2, 6))
    with torch.no_grad():
        assert torch.equal(fused(t, encoder_input=torch.randn(2, 3, 24)), original(t))


def test_state_dict_keys_and_parameter_names_differ_by_layer_segment():
    fused = _decoder({1})
    keys = set(fused.state_dict())
    names = {n for n, _ in fused.named_parameters()}
    assert "layers.1.attn.q_proj.weight" in keys and "layers.1.layer.attn.q_proj.weight" in names
    assert "layers.1.fusion_layer.ca_scale.scale" in keys and "layers.1.fusion_layer.ca_scale.scale" in names
    fused.load_state_dict(fused.state_dict(), strict=True)


def test_only_the_leading_layer_segment_is_stripped():
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.sublayer = nn.Linear(2, 2)  # a name that ends in "layer"
            self.layer = nn.Linear(2, 2)  # and one that *is* "layer"

        def forward(self, x, **_):
            return x

    fl = FusionLayer(Wrapped(), Wrapped())
    keys = set(fl.state_dict())
    assert keys == {"sublayer.weight", "sublayer.bias", "layer.weight", "layer.bias",
                    "fusion_layer.sublayer.weight", "fusion_layer.sublayer.bias",
                    "fusion_layer.layer.weight", "fusion_layer.layer.bias"}
    other = FusionLayer(Wrapped(), Wrapped())
    other.load_state_dict(fl.state_dict(), strict=True)
    for (n1, p1), (n2, p2) in zip(fl.named_parameters(), other.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_fusion_params_and_get_fusion_params():
    fused = _decoder({1, 3})
    fl = fused.layers[1]
    assert set(fl.fusion_params()) == {f"fusion_layer.{n}" for n, _ in fl.fusion_layer.named_parameters()}
    params = get_fusion_params(fused)
    assert all(n.startswith(("layers.1.fusion_layer.", "layers.3.fusion_layer.")) for n in params)
    assert len(params) == 2 * len(list(fl.fusion_layer.parameters()))
    set_trainable_params(fused, params)
    trainable = {n for n, p in fused.named_parameters() if p.requires_grad}
    assert trainable == set(params)


def test_fusion_first_and_after_differ():
    torch.manual_seed(0)
    rope = RotaryEmbedding(CFG.head_dim, 10000.0)
    layer, fusion = build_self_attention_layer(CFG, rope), build_fusion_layer(CFG, FUSION)
    with torch.no_grad():
        fusion.ca_scale.scale.fill_(1.0)
        fusion.mlp_scale.scale.fill_(1.0)
    x, enc, pos = torch.randn(1, 5, CFG.dim), torch.randn(1, 3, 24), torch.arange(5)
    first = FusionLayer(layer, fusion, fusion_first=True)(x, positions=pos, encoder_input=enc)
    after = FusionLayer(layer, fusion, fusion_first=False)(x, positions=pos, encoder_input=enc)
    assert torch.allclose(first, layer(fusion(x, encoder_input=enc), positions=pos))
    assert torch.allclose(after, fusion(layer(x, positions=pos), encoder_input=enc))
    assert not torch.allclose(first, after)


def test_cross_attention_without_encoder_is_identity_even_with_open_gates():
    fusion = build_fusion_layer(CFG, FUSION)
    with torch.no_grad():
        fusion.ca_scale.scale.fill_(2.0)
    x = torch.randn(2, 4, CFG.dim)
    assert fusion(x) is x


def test_fully_masked_tokens_get_no_cross_attention():
    fusion = build_fusion_layer(CFG, FUSION)
    with torch.no_grad():
        fusion.ca_scale.scale.fill_(1.0)
        fusion.mlp_scale.scale.fill_(1.0)
    x, enc = torch.randn(1, 3, CFG.dim), torch.randn(1, 4, 24)
    mask = torch.tensor([[[True, True, False, False], [False] * 4, [True] * 4]])
    out = fusion(x, encoder_input=enc, encoder_mask=mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, 1], x[0, 1])
    assert not torch.allclose(out[0, 0], x[0, 0])


def test_kv_cache_decoding_matches_full_forward_and_reset_empties():
    model = build_decoder(CFG, FUSION).eval()
    open_gates(model, 0.7)
    t, enc = torch.randint(0, CFG.vocab_size, (2, 7)), torch.randn(2, 5, 24)
    with torch.no_grad():
        full = model(t, encoder_input=enc)
        model.setup_cache(2, torch.float32, encoder_max_seq_len=8, decoder_max_seq_len=16)
        assert model.cache_enabled and model.layers[1].cache_enabled
        steps = [model(t[:, :1], encoder_input=enc)]
        steps += [model(t[:, i:i + 1]) for i in range(1, 7)]  # encoder keys/values come from the cache
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
        model.reset_cache()
        assert all(m.kv_cache.size == 0 for m in model.modules() if getattr(m, "kv_cache", None) is not None)
        again = model(t, encoder_input=enc)
    assert torch.allclose(again, full, atol=1e-5)


def test_fusion_embedding_keeps_the_original_key():
    emb = FusionEmbedding(10, 3, 4)
    assert set(emb.state_dict()) == {"weight", "fusion_embedding.weight"}
    plain = nn.Embedding(10, 4)
    assert emb.load_state_dict(plain.state_dict(), strict=False).missing_keys == ["fusion_embedding.weight"]
    assert torch.equal(emb.weight, plain.weight)
    ids = torch.tensor([[0, 9, 10, 12]])
    out = emb(ids)
    assert torch.equal(out[0, 1], plain.weight[9]) and torch.equal(out[0, 3], emb.fusion_embedding.weight[2])
