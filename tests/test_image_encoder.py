"""fusionsurgery.ImageEncoder / ImageTokens: any torch image encoder as the encoder of a fused model.

A tiny random conv net stands in for a pretrained backbone: feature maps become tokens in row-major
order, the position embedding tells cells apart, only the adapter is a fusion parameter, the frozen
backbone stays frozen (and in eval mode), cached features give the same tokens as images, and the
encoder feeds both ``DeepFusionModel`` and a ``fusionsurgery.hf`` model (``cross_attention_states``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import fusionsurgery as fs
from fusionsurgery import DeepFusionModel, ImageEncoder, ImageTokens, generate, get_fusion_params
from fusionsurgery.errors import CheckpointError
from helpers import make_base, open_gates, tokens


def conv_backbone(seed: int = 0) -> nn.Module:
    """``[b, 3, 16, 16] -> [b, 6, 4, 4]`` with a batch norm (its running statistics must not move)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Dropout(0.5))


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def fused_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("image_encoder")
    base, _ = make_base(tmp, "llama")
    out = tmp / "fused"
    fs.fuse(base, out, every=2, encoder_dim=24, seed=1)
    return out


def test_tokens_are_row_major_cells_projected_plus_their_position():
    torch.manual_seed(0)
    adapter = ImageTokens(5, 8, (2, 3))
    maps = torch.randn(2, 5, 2, 3)
    out = adapter(maps)
    assert out.shape == (2, 6, 8) and adapter.num_tokens == 6
    w, b = adapter.projection.weight, adapter.projection.bias
    for i in range(2):
        for j in range(3):
            expected = maps[:, :, i, j] @ w.T + b + adapter.position[i * 3 + j]
            torch.testing.assert_close(out[:, i * 3 + j], expected)
    # the same content in another cell gives another token: the position is readable
    same = maps[:, :, :1, :1].expand(-1, -1, 2, 3)
    t = adapter(same)
    assert not torch.allclose(t[:, 0], t[:, 5])
    assert set(adapter.fusion_params()) == {"projection.weight", "projection.bias", "position"}
    assert ImageTokens(5, 8, 4).grid == (4, 4)


def test_wrong_shapes_fail_in_one_line():
    adapter = ImageTokens(5, 8, (2, 3))
    for bad in (torch.randn(2, 4, 2, 3), torch.randn(2, 5, 3, 2), torch.randn(5, 2, 3)):
        with pytest.raises(ValueError, match=r"expected feature maps \[batch, 5, 2, 3\]"):
            adapter(bad)
    with pytest.raises(ValueError, match="must be positive"):
        ImageTokens(0, 8, 2)
    encoder = ImageEncoder(None, adapter)
    with pytest.raises(ValueError, match="either images= or features="):
        encoder()
    with pytest.raises(ValueError, match="either images= or features="):
        encoder(images=torch.randn(1, 3, 4, 4), features=torch.randn(1, 5, 2, 3))
    with pytest.raises(ValueError, match="has no backbone"):
        encoder(images=torch.randn(1, 3, 4, 4))
    with pytest.raises(TypeError, match="must be callable"):
        ImageEncoder(42, adapter)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"must return feature maps \[batch, channels, h, w\]"):
        ImageEncoder.from_backbone(nn.Flatten(), 8, 16)


def test_from_backbone_probes_the_shape_and_freezes_the_backbone():
    backbone = conv_backbone()
    encoder = ImageEncoder.from_backbone(backbone, 12, 16)
    assert (encoder.tokens.channels, encoder.tokens.grid, encoder.tokens.dim) == (6, (4, 4), 12)
    assert not any(p.requires_grad for p in backbone.parameters())
    stats = backbone[1].running_mean.clone()
    encoder.train()
    assert not backbone.training and encoder.tokens.training  # batch norm and dropout as pretrained
    x = images(3)
    out = encoder(images=x)
    assert out.shape == (3, 16, 12)
    assert torch.equal(backbone[1].running_mean, stats)
    # cached feature maps give the very same tokens
    assert torch.equal(encoder(features=encoder.features(x)), out)
    out.sum().backward()
    assert encoder.tokens.position.grad is not None
    assert all(p.grad is None for p in backbone.parameters())
    # a bound method (no module registered, nothing of it in the state dict) works alike
    by_method = ImageEncoder(backbone.forward, encoder.tokens)
    assert torch.equal(by_method(images=x), out)
    assert set(by_method.state_dict()) == {"tokens.projection.weight", "tokens.projection.bias", "tokens.position"}
    fresh = conv_backbone(seed=3).train()
    ImageEncoder(fresh.forward, ImageTokens(6, 12, 4))
    assert not fresh.training and not any(p.requires_grad for p in fresh.parameters())  # its owner is frozen
    # a trainable backbone follows train() and gets gradients
    trainable = ImageEncoder.from_backbone(conv_backbone(), 12, 16, backbone_trainable=True)
    trainable.train()
    assert trainable.backbone.training
    trainable(images=x).sum().backward()
    assert trainable.backbone[0].weight.grad is not None


def test_save_pretrained_round_trip_and_bad_directories(tmp_path: Path):
    encoder = ImageEncoder.from_backbone(conv_backbone(), 12, 16, bias=False)
    with torch.no_grad():
        encoder.tokens.position.add_(1.0)
    out = encoder.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == ["image_tokens.json", "image_tokens.safetensors"]
    again = ImageEncoder.from_pretrained(out, encoder.backbone)
    x = images()
    assert again.tokens.projection.bias is None
    assert torch.equal(again(images=x), encoder(images=x))
    assert torch.equal(ImageEncoder.from_pretrained(out)(features=encoder.features(x)), encoder(images=x))
    with pytest.raises(CheckpointError, match="has no image_tokens.json"):
        ImageEncoder.from_pretrained(tmp_path)
    (out / "image_tokens.json").write_text('{"format": "something else"}')
    with pytest.raises(CheckpointError, match="is not 'fusionsurgery.image_tokens/1'"):
        ImageEncoder.from_pretrained(out)
    (out / "image_tokens.json").write_text('{"format": "fusionsurgery.image_tokens/1", "channels": 6, "dim": 13, '
                                           '"grid": [4, 4], "bias": false}')
    with pytest.raises(CheckpointError, match="do not fit image_tokens.json"):
        ImageEncoder.from_pretrained(out)


def test_feeds_deep_fusion_model_and_generate(fused_dir: Path):
    decoder = fs.load_fused(fused_dir, dtype=torch.float32)
    model = DeepFusionModel(decoder, ImageEncoder.from_backbone(conv_backbone(), decoder.encoder_dim, 16))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    fusion = set(get_fusion_params(model))
    assert {"encoder.tokens.projection.weight", "encoder.tokens.position"} <= fusion
    assert trainable == fusion and not any(n.startswith("encoder.backbone.") for n in trainable)
    t, x = tokens(2, 7), images()
    closed = model(t, encoder_input={"images": x})
    torch.testing.assert_close(closed, model(t))  # zero gates: identity at init
    open_gates(model, 0.5)
    logits = model(t, encoder_input={"images": x})
    assert not torch.allclose(logits, model(t))
    torch.testing.assert_close(model(t, encoder_input={"features": model.encoder.features(x)}), logits)
    loss = logits.logsumexp(-1).mean()
    loss.backward()
    assert model.encoder.tokens.position.grad is not None
    out = generate(model.eval(), t[:, :3], encoder_input={"images": x}, max_new_tokens=4,
                   encoder_max_seq_len=model.encoder.tokens.num_tokens)
    assert out.shape == (2, 7)


def test_feeds_a_transformers_model_as_cross_attention_states(fused_dir: Path):
    hf = pytest.importorskip("fusionsurgery.hf")
    model = hf.from_pretrained(fused_dir, dtype=torch.float32).eval()
    encoder = ImageEncoder.from_backbone(conv_backbone(), model.fusion.encoder_dim, 16)
    open_gates(model, 0.5)
    t, x = tokens(2, 7), images()
    states = encoder(images=x)
    ours = DeepFusionModel(fs.load_fused(fused_dir, dtype=torch.float32), encoder).eval()
    open_gates(ours, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(model(t, cross_attention_states=states).logits,
                                   ours(t, encoder_input={"images": x}), atol=1e-4, rtol=1e-4)
        out = model.generate(t[:, :3], cross_attention_states=states, max_new_tokens=3, do_sample=False)
    assert out.shape[1] >= 4
