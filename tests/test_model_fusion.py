"""torchtune's model_fusion contract, both API eras: FusionLayer around anyone's layers,
DeepFusionModel, register_fusion_module / get_fusion_params (DESIGN.md section 1, issue 13)."""

from __future__ import annotations

import copy
import io
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusionsurgery as fs
from fusionsurgery import (DeepFusionModel, FusionLayer, ProjectedEncoder, get_fusion_params, project_encoder,
                           register_fusion_module)
from fusionsurgery.modules import TransformerDecoder
from fusionsurgery.modules.norm import RMSNorm
from helpers import make_base, open_gates

DIM, VOCAB = 16, 40


# ---------------------------------------------------------------- a user's own layer pair
class SeedEraSelfAttention(nn.Module):
    """A user's causal self-attention layer with its own KV cache, spelled as torchtune 0.3 did:
    ``setup_cache``, ``reset_cache`` and a ``cache_enabled`` attribute."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.cache_enabled = False
        self.k = self.v = None
        self.decoder_max_seq_len = None

    def setup_cache(self, batch_size, dtype, *, encoder_max_seq_len, decoder_max_seq_len):
        dim = self.out.in_features
        self.k = torch.zeros(batch_size, decoder_max_seq_len, dim, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.decoder_max_seq_len, self.cache_enabled = decoder_max_seq_len, True

    def reset_cache(self):
        self.k.zero_()
        self.v.zero_()

    def forward(self, x, *, input_pos=None, **_):
        q, k, v = self.qkv(x).chunk(3, -1)
        pos = torch.arange(x.shape[1]) if input_pos is None else input_pos
        if self.cache_enabled:
            self.k[:, pos], self.v[:, pos] = k, v
            k, v = self.k, self.v
            mask = pos[:, None] >= torch.arange(k.shape[1])[None, :]
            return x + self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        return x + self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True))


class TodayCrossAttention(nn.Module):
    """A user's gated cross-attention layer caching the encoder's keys/values, spelled as today's
    torchtune: ``setup_caches``, ``reset_caches``, ``caches_are_setup()``, ``caches_are_enabled()``."""

    def __init__(self, dim: int, encoder_dim: int) -> None:
        super().__init__()
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(encoder_dim, 2 * dim), nn.Linear(dim, dim)
        self.gate = nn.Parameter(torch.zeros(1))
        self.cache = None
        self.filled = 0
        self.encoder_max_seq_len = None

    def setup_caches(self, batch_size, dtype, *, encoder_max_seq_len, decoder_max_seq_len):
        self.cache = torch.zeros(batch_size, encoder_max_seq_len, 2 * self.q.out_features, dtype=dtype)
        self.encoder_max_seq_len, self.filled = encoder_max_seq_len, 0

    def caches_are_setup(self):
        return self.cache is not None

    def caches_are_enabled(self):
        return self.cache is not None

    def reset_caches(self):
        self.cache.zero_()
        self.filled = 0

    def forward(self, x, *, encoder_input=None, encoder_mask=None, **_):
        if encoder_input is not None:
            kv = self.kv(encoder_input)
            if self.cache is not None:
                self.cache[:, : kv.shape[1]], self.filled = kv, kv.shape[1]
        elif self.filled:
            kv = self.cache[:, : self.filled]
        else:
            return x
        k, v = kv.chunk(2, -1)
        mask = None if encoder_mask is None else encoder_mask.bool()
        return x + self.gate.tanh() * self.out(F.scaled_dot_product_attention(self.q(x), k, v, attn_mask=mask))


def user_decoder(seed: int = 0, encoder_dim: int = 12) -> TransformerDecoder:
    """Our decoder stack around the user's layers: layers 1 and 3 fused."""
    torch.manual_seed(seed)
    layers = [SeedEraSelfAttention(DIM) for _ in range(4)]
    for i in (1, 3):
        layers[i] = FusionLayer(layers[i], TodayCrossAttention(DIM, encoder_dim))
        with torch.no_grad():
            layers[i].fusion_layer.gate.fill_(0.8)
    return TransformerDecoder(tok_embeddings=nn.Embedding(VOCAB, DIM), layers=layers, norm=RMSNorm(DIM),
                              output=nn.Linear(DIM, VOCAB, bias=False)).eval()


def test_fusion_layer_forwards_cache_calls_in_each_wrapped_modules_own_spelling():
    fl = FusionLayer(SeedEraSelfAttention(DIM), TodayCrossAttention(DIM, 12))
    assert not fl.cache_enabled and not fl.caches_are_enabled() and not fl.caches_are_setup()
    fl.setup_cache(2, torch.float32, encoder_max_seq_len=5, decoder_max_seq_len=9)  # the seed era's name
    assert fl.layer.decoder_max_seq_len == 9 and fl.fusion_layer.encoder_max_seq_len == 5
    assert fl.layer.k.shape[1] == 9 and fl.fusion_layer.cache.shape[1] == 5
    assert fl.cache_enabled and fl.caches_are_enabled() and fl.caches_are_setup()
    fl.layer.cache_enabled = False  # enabled-ness is the original layer's, as in torchtune
    assert not fl.cache_enabled and not fl.caches_are_enabled()
    fl.layer.cache_enabled = True
    fl.fusion_layer.filled = 3
    fl.layer.k.fill_(1.0)
    fl.reset_caches()  # today's name reaches reset_cache on one side and reset_caches on the other
    assert fl.fusion_layer.filled == 0 and not fl.layer.k.any()
    fl.setup_caches(1, torch.float64, encoder_max_seq_len=4, decoder_max_seq_len=6)  # today's name
    assert fl.layer.k.dtype == torch.float64 and fl.fusion_layer.cache.shape[:2] == (1, 4)


def test_fusion_layer_passes_only_the_lengths_given_and_names_what_is_missing():
    class Minimal(nn.Module):  # torchtune 0.3.0's test layer: setup_cache(batch_size, dtype) only
        def __init__(self):
            super().__init__()
            self.cache_enabled, self.seen = False, None

        def setup_cache(self, batch_size, dtype):
            self.cache_enabled, self.seen = True, (batch_size, dtype)

        def reset_cache(self):
            self.cache_enabled = False

    fl = FusionLayer(Minimal(), Minimal())
    fl.setup_cache(3, torch.bfloat16)
    assert fl.layer.seen == fl.fusion_layer.seen == (3, torch.bfloat16) and fl.cache_enabled
    fl.reset_cache()
    assert not fl.cache_enabled
    bare = FusionLayer(nn.Linear(2, 2), Minimal())
    with pytest.raises(TypeError, match="Linear has no setup_caches or setup_cache method"):
        bare.setup_caches(1, torch.float32)
    with pytest.raises(TypeError, match="Linear has no caches_are_enabled, cache_enabled or caches_are_setup"):
        bare.caches_are_enabled()


def test_our_layers_need_their_own_cache_length():
    model = fs.build_decoder(*_small_configs())
    with pytest.raises(ValueError, match="DecoderLayer.setup_caches needs decoder_max_seq_len="):
        model.setup_caches(1, torch.float32, encoder_max_seq_len=4)
    with pytest.raises(ValueError, match="GatedCrossAttentionLayer.setup_caches needs encoder_max_seq_len="):
        model.setup_caches(1, torch.float32, decoder_max_seq_len=4)


def test_user_layers_decode_through_their_caches_like_a_full_forward():
    """Our decoder and DeepFusionModel drive the user's layers through their own cache methods."""
    model = DeepFusionModel(user_decoder(), nn.Linear(7, 12))
    t, feats = torch.randint(0, VOCAB, (2, 6)), {"input": torch.randn(2, 4, 7)}
    with torch.no_grad():
        full = model(t, encoder_input=feats)
        assert not torch.allclose(full, model(t))  # the encoder matters
        model.setup_caches(2, torch.float32, encoder_max_seq_len=4, decoder_max_seq_len=8)
        assert model.caches_are_setup() and model.caches_are_enabled() and model.cache_enabled
        steps = [model(t[:, :2], encoder_input=feats, input_pos=torch.arange(2))]
        steps += [model(t[:, i:i + 1], input_pos=torch.tensor([i])) for i in range(2, 6)]
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
        model.reset_cache()
        assert model.decoder.layers[1].fusion_layer.filled == 0 and not model.decoder.layers[0].k.any()
        assert torch.allclose(model(t), full_text_only(model, t), atol=1e-5)


def full_text_only(model: DeepFusionModel, t: torch.Tensor) -> torch.Tensor:
    plain = copy.deepcopy(model.decoder)
    for layer in plain.layers:
        if isinstance(layer, FusionLayer):
            layer.layer.cache_enabled = False
            layer.fusion_layer.cache = None
        else:
            layer.cache_enabled = False
    return plain(t)


# ---------------------------------------------------------------- fusion parameters
def test_register_fusion_module_and_get_fusion_params():
    head = register_fusion_module(nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 5)))
    assert set(head.fusion_params()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    model = nn.ModuleDict({"encoder": nn.Sequential(nn.Linear(2, 3), head),
                           "fused": FusionLayer(nn.Linear(5, 5), nn.Linear(5, 5))})
    assert set(get_fusion_params(model)) == {"encoder.1.0.weight", "encoder.1.0.bias", "encoder.1.2.weight",
                                             "encoder.1.2.bias", "fused.fusion_layer.weight", "fused.fusion_layer.bias"}
    assert get_fusion_params(model)["encoder.1.2.bias"] is head[2].bias
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # the mark survives copies
        assert set(get_fusion_params(clone)) == set(get_fusion_params(model))
        assert get_fusion_params(clone)["encoder.1.2.bias"] is clone["encoder"][1][2].bias


def test_get_fusion_params_refuses_a_name_that_is_no_parameter():
    class Liar(nn.Linear):
        def fusion_params(self):
            return ["weight", "gate"]

    with pytest.raises(ValueError, match="fusion_params\\(\\) names no parameter 'gate'"):
        get_fusion_params(nn.Sequential(Liar(2, 2)))


# ---------------------------------------------------------------- DeepFusionModel
class Recorder(nn.Module):
    """A decoder that records what DeepFusionModel hands it (torchtune's keywords only)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(1, 1)
        self.seen: dict = {}

    def forward(self, tokens, *, mask, encoder_input, encoder_mask, input_pos):
        self.seen = dict(tokens=tokens, mask=mask, encoder_input=encoder_input, encoder_mask=encoder_mask,
                         input_pos=input_pos)
        return tokens


def test_encoder_mask_while_decoding_is_accepted_as_either_era_passes_it():
    model = DeepFusionModel(Recorder(), nn.Identity())
    whole = torch.rand(2, 10, 6) > 0.5
    model(torch.zeros(2, 1, dtype=torch.long), encoder_mask=whole, input_pos=torch.tensor([3]))
    assert torch.equal(model.decoder.seen["encoder_mask"], whole[:, 3:4])  # seed era: sliced here
    model(torch.zeros(2, 1, dtype=torch.long), encoder_mask=whole[:, 3:4], input_pos=torch.tensor([3]))
    assert torch.equal(model.decoder.seen["encoder_mask"], whole[:, 3:4])  # today: passed as sliced
    model(torch.zeros(2, 2, dtype=torch.long), encoder_mask=whole, input_pos=torch.tensor([[4, 5], [7, 8]]))
    assert torch.equal(model.decoder.seen["encoder_mask"], torch.stack([whole[0, 4:6], whole[1, 7:9]]))
    model(torch.zeros(2, 10, dtype=torch.long), encoder_mask=whole)  # training: the whole mask, no positions
    assert model.decoder.seen["encoder_mask"] is whole
    with pytest.raises(ValueError, match="encoder_mask has 10 row"):
        model(torch.zeros(2, 1, dtype=torch.long), encoder_mask=whole, input_pos=torch.tensor([10]))


def test_deep_fusion_forward_passes_torchtune_keywords_and_encoder_kwargs():
    class Encoder(nn.Module):
        def forward(self, images, scale=1.0):
            return images * scale

    model = DeepFusionModel(Recorder(), Encoder())
    t, images, mask = torch.zeros(1, 3, dtype=torch.long), torch.randn(1, 2, 4), torch.ones(1, 3, 3, dtype=torch.bool)
    model(t, mask=mask, encoder_input={"images": images, "scale": 2.0})
    seen = model.decoder.seen
    assert seen["tokens"] is t and seen["mask"] is mask and torch.equal(seen["encoder_input"], images * 2)
    model(t)
    assert model.decoder.seen["encoder_input"] is None
    with pytest.raises(TypeError, match="encoder_input is a dict of the encoder's keyword arguments"):
        model(t, encoder_input=images)


def test_trainable_flags_go_by_fusion_params(fused_dir: Path):
    encoder = nn.Sequential(nn.Linear(7, 7), nn.Linear(7, 10))

    def trainable(**flags) -> set[str]:
        model = DeepFusionModel(fs.load_fused(fused_dir, dtype=torch.float32), copy.deepcopy(encoder),
                                encoder_width=10, **flags)
        return {n for n, p in model.named_parameters() if p.requires_grad}

    model = DeepFusionModel(fs.load_fused(fused_dir, dtype=torch.float32), encoder, encoder_width=10)
    every = {n for n, _ in model.named_parameters()}
    fusion = set(get_fusion_params(model))
    assert "encoder.projection.weight" in fusion and "decoder.tok_embeddings.fusion_embedding.weight" in fusion
    assert any(".fusion_layer.attn." in n for n in fusion)
    enc = {n for n in every if n.startswith("encoder.")} - fusion
    dec = {n for n in every if n.startswith("decoder.")} - fusion
    assert enc and dec and every == enc | dec | fusion
    assert trainable() == fusion
    assert trainable(encoder_trainable=True, fusion_trainable=False) == enc
    assert trainable(decoder_trainable=True, fusion_trainable=False) == dec
    assert trainable(decoder_trainable=True) == dec | fusion
    assert trainable(encoder_trainable=True, decoder_trainable=True) == every
    assert trainable(fusion_trainable=False) == set()


def test_encoder_width_adds_a_projection_only_when_widths_differ(fused_dir: Path):
    decoder = fs.load_fused(fused_dir, dtype=torch.float32)
    assert decoder.encoder_dim == 48
    assert isinstance(DeepFusionModel(decoder, nn.Linear(3, 48), encoder_width=48).encoder, nn.Linear)
    model = DeepFusionModel(decoder, nn.Linear(3, 20), encoder_width=20)
    assert isinstance(model.encoder, ProjectedEncoder)
    assert tuple(model.encoder.projection.weight.shape) == (48, 20)
    assert {"encoder.encoder.weight", "encoder.projection.weight"} <= set(model.state_dict())
    with pytest.raises(ValueError, match="does not say which width its fusion layers read"):
        DeepFusionModel(Recorder(), nn.Identity(), encoder_width=5)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the whole module pickles, state-dict hooks included
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False).state_dict().keys() == model.state_dict().keys()
    custom = project_encoder(nn.Identity(), 5, 7, bias=True)
    assert set(custom.projection.fusion_params()) == {"weight", "bias"}


@pytest.mark.parametrize("era", ["seed: whole-sequence mask", "today: sliced mask"])
def test_fused_checkpoint_with_an_encoder_decodes_through_the_cache_like_a_full_forward(fused_dir: Path, era):
    """``DeepFusionModel(load_fused(dir), encoder, encoder_width=...)``: prefill then one token at a time."""
    torch.manual_seed(0)
    model = DeepFusionModel(fs.load_fused(fused_dir, dtype=torch.float32), nn.Linear(6, 20), encoder_width=20)
    open_gates(model, 0.7)
    t = torch.randint(0, 128, (2, 8))
    feats = {"input": torch.randn(2, 5, 6)}
    emask = torch.rand(2, 8, 5) > 0.3
    with torch.no_grad():
        text = model(t)
        full = model(t, encoder_input=feats, encoder_mask=emask)
        assert not torch.allclose(full, text, atol=1e-3)
        model.setup_caches(2, torch.float32, encoder_max_seq_len=5, decoder_max_seq_len=12)
        steps = [model(t[:, :3], encoder_input=feats, encoder_mask=emask[:, :3], input_pos=torch.arange(3))]
        for i in range(3, 8):
            rows = emask if era.startswith("seed") else emask[:, i:i + 1]
            steps.append(model(t[:, i:i + 1], encoder_mask=rows, input_pos=torch.tensor([i])))
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
        model.reset_caches()
        assert model.caches_are_setup()
        assert torch.allclose(model(t), text, atol=1e-5)  # reset emptied the encoder cache too


def test_decoder_takes_torchtune_keywords(fused_dir: Path):
    model = fs.load_fused(fused_dir, dtype=torch.float32)
    t = torch.randint(0, 128, (1, 6))
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool))[None]
    with torch.no_grad():
        default = model(tokens=t)
        assert torch.allclose(model(tokens=t, mask=causal), default, atol=1e-6)
        assert torch.allclose(model(t, mask=causal, input_pos=torch.arange(6)), default, atol=1e-6)
        blocks = causal.clone()
        blocks[:, 3:, :3] = False  # two documents packed in one row
        packed = model(t, mask=blocks)
        assert torch.allclose(packed[:, :3], default[:, :3], atol=1e-6)
        assert torch.allclose(packed[:, 3:], model(t[:, 3:]), atol=1e-5)


def test_decoding_with_per_sequence_positions_and_masks_as_torchtune_generate_passes_them(fused_dir: Path):
    """``input_pos [b, s]`` and a ``mask [b, s, cache length]``: row 1 sits two slots further on
    (left padding its mask hides), and RoPE being relative, it still computes its full forward."""
    model = DeepFusionModel(fs.load_fused(fused_dir, dtype=torch.float32), nn.Identity())
    open_gates(model, 0.5)
    t, enc = torch.randint(0, 128, (2, 6)), torch.randn(2, 3, 48)
    offset = torch.tensor([[0], [2]])
    slots = torch.arange(12)
    with torch.no_grad():
        full = model(t, encoder_input={"input": enc})
        model.setup_caches(2, torch.float32, encoder_max_seq_len=3, decoder_max_seq_len=12)

        def step(i: int, j: int, **kw) -> torch.Tensor:
            pos = torch.arange(i, j)[None] + offset  # [2, j - i]
            mask = (slots[None, None] <= pos[..., None]) & (slots[None, None] >= offset[..., None])
            return model(t[:, i:j], mask=mask, input_pos=pos, **kw)

        steps = [step(0, 2, encoder_input={"input": enc})] + [step(i, i + 1) for i in range(2, 6)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


# ---------------------------------------------------------------- fixtures
def _small_configs():
    from fusionsurgery.arch.config import FusionConfig, ModelConfig

    cfg = ModelConfig(family="torchtune", model_type="llama", num_layers=2, dim=16, num_heads=2, num_kv_heads=1,
                      head_dim=8, intermediate_dim=24, vocab_size=20, rope_theta=10000.0)
    return cfg, FusionConfig(layers=[1], encoder_dim=16)


@pytest.fixture(scope="module")
def fused_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("deep-fusion")
    base, _ = make_base(tmp)
    fs.fuse(base, tmp / "fused", every=2, seed=1, encoder_dim=48, fusion_vocab=2)
    return tmp / "fused"


# ---------------------------------------------------------------- against torchtune itself
def _torchtune():
    """torchtune's modules where torchtune imports here (it needs torchao); the suite does not depend on it."""
    try:
        import torchtune.modules as tt
        from torchtune.modules import model_fusion
    except Exception as e:  # noqa: BLE001  (ImportError, or a broken torchao/torchvision build)
        pytest.skip(f"torchtune does not import here: {type(e).__name__}: {e}")
    return tt, model_fusion


def _torchtune_decoder(tt, wrap, seed: int):
    """A tiny torchtune decoder (layers 1 and 3 fused, as Llama 3.2 Vision builds them) using ``wrap``."""
    torch.manual_seed(seed)
    dim, heads, kv, hidden, enc_dim, vocab = 32, 4, 2, 48, 24, 50
    rope = tt.RotaryPositionalEmbeddings(dim // heads, max_seq_len=64)

    def attn(causal: bool, kv_dim: int):
        hd = dim // heads
        return tt.MultiHeadAttention(
            embed_dim=dim, num_heads=heads, num_kv_heads=kv, head_dim=hd,
            q_proj=nn.Linear(dim, heads * hd, bias=False), k_proj=nn.Linear(kv_dim, kv * hd, bias=False),
            v_proj=nn.Linear(kv_dim, kv * hd, bias=False), output_proj=nn.Linear(dim, dim, bias=False),
            q_norm=None if causal else tt.RMSNorm(hd), k_norm=None if causal else tt.RMSNorm(hd),
            pos_embeddings=rope if causal else None, max_seq_len=64, is_causal=causal)

    def mlp():
        return tt.FeedForward(gate_proj=nn.Linear(dim, hidden, bias=False), down_proj=nn.Linear(hidden, dim, bias=False),
                              up_proj=nn.Linear(dim, hidden, bias=False))

    layers = []
    for i in range(4):
        layer = tt.TransformerSelfAttentionLayer(attn=attn(True, dim), mlp=mlp(), sa_norm=tt.RMSNorm(dim),
                                                 mlp_norm=tt.RMSNorm(dim))
        if i in (1, 3):
            cross = tt.TransformerCrossAttentionLayer(attn=attn(False, enc_dim), mlp=mlp(), ca_norm=tt.RMSNorm(dim),
                                                      mlp_norm=tt.RMSNorm(dim), ca_scale=tt.TanhGate(),
                                                      mlp_scale=tt.TanhGate())
            with torch.no_grad():
                cross.ca_scale.scale.fill_(0.6)
                cross.mlp_scale.scale.fill_(-0.4)
            layer = wrap(layer, cross)
        layers.append(layer)
    return tt.TransformerDecoder(tok_embeddings=nn.Embedding(vocab, dim), layers=nn.ModuleList(layers), max_seq_len=64,
                                 num_heads=heads, head_dim=dim // heads, norm=tt.RMSNorm(dim),
                                 output=nn.Linear(dim, vocab, bias=False)).eval()


def test_torchtune_layers_in_our_wrappers_match_torchtunes_own():
    """torchtune's own layers, decoder and caches inside our FusionLayer and DeepFusionModel compute
    what torchtune's FusionLayer and DeepFusionModel compute, prefill and cached decoding alike."""
    tt, mf = _torchtune()
    theirs = mf.DeepFusionModel(_torchtune_decoder(tt, mf.FusionLayer, 3), nn.Linear(6, 24))
    ours = DeepFusionModel(_torchtune_decoder(tt, FusionLayer, 3), copy.deepcopy(theirs.encoder))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in theirs.named_parameters() if p.requires_grad}
    t, feats = torch.randint(0, 50, (2, 7)), {"input": torch.randn(2, 5, 6)}
    emask = torch.rand(2, 7, 5) > 0.3
    outputs = []
    with torch.no_grad():
        for model in (theirs, ours):
            full = model(t, encoder_input=feats, encoder_mask=emask)
            model.setup_caches(2, torch.float32, encoder_max_seq_len=5, decoder_max_seq_len=16)
            assert model.caches_are_setup() and model.caches_are_enabled()
            causal = torch.tril(torch.ones(16, 16, dtype=torch.bool))[None].expand(2, -1, -1)
            steps = [model(t[:, :3], mask=causal[:, :3], encoder_input=feats, encoder_mask=emask[:, :3],
                           input_pos=torch.arange(3)[None].expand(2, -1))]
            for i in range(3, 7):
                steps.append(model(t[:, i:i + 1], mask=causal[:, i:i + 1], encoder_mask=emask[:, i:i + 1],
                                   input_pos=torch.full((2, 1), i)))
            model.reset_caches()
            outputs.append((full, torch.cat(steps, 1)))
    (their_full, their_steps), (our_full, our_steps) = outputs
    assert torch.allclose(our_full, their_full, atol=1e-6) and torch.allclose(our_steps, their_steps, atol=1e-6)
    assert torch.allclose(our_steps, our_full, atol=1e-5)
