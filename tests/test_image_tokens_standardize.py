"""ImageTokens(standardize=True): per-channel standardisation of the feature maps before the projection.

Channels of very different scales (stages of a backbone side by side) start on an equal footing;
the statistics come from training features (``fit_standardization``), are buffers, not trained,
and travel with ``save_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fusionsurgery import ImageEncoder, ImageTokens


def scaled_maps(batch: int = 8) -> torch.Tensor:
    """``[batch, 3, 2, 2]`` whose channels have means 5, -2, 0 and scales 100, 0.01, 1."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 2, 2, generator=g)
    return x * torch.tensor([100.0, 0.01, 1.0]).view(1, 3, 1, 1) + torch.tensor([5.0, -2.0, 0.0]).view(1, 3, 1, 1)


def test_standardize_divides_each_channel_by_its_training_scale():
    torch.manual_seed(0)
    adapter = ImageTokens(3, 4, 2, standardize=True)
    maps = scaled_maps()
    identity = adapter(maps)  # before fitting the statistics are 0 and 1
    plain = ImageTokens(3, 4, 2)
    plain.load_state_dict({k: v for k, v in adapter.state_dict().items() if not k.startswith("feature_")})
    torch.testing.assert_close(identity, plain(maps))
    adapter.fit_standardization(maps)
    flat = maps.transpose(0, 1).flatten(1)
    torch.testing.assert_close(adapter.feature_mean, flat.mean(1))
    torch.testing.assert_close(adapter.feature_std, flat.std(1, unbiased=False))
    z = (maps - adapter.feature_mean.view(1, 3, 1, 1)) / adapter.feature_std.view(1, 3, 1, 1)
    torch.testing.assert_close(adapter(maps), plain(z))
    assert set(adapter.fusion_params()) == {"projection.weight", "projection.bias", "position"}  # buffers do not train
    with pytest.raises(ValueError, match="standardize=False"):
        plain.fit_standardization(maps)
    with pytest.raises(ValueError, match=r"expected feature maps \[batch, 3, h, w\]"):
        adapter.fit_standardization(maps[:, :2])


def test_standardized_adapter_round_trips(tmp_path: Path):
    torch.manual_seed(0)
    encoder = ImageEncoder(None, ImageTokens(3, 4, 2, standardize=True))
    maps = scaled_maps()
    encoder.tokens.fit_standardization(maps)
    again = ImageEncoder.from_pretrained(encoder.save_pretrained(tmp_path / "adapter"))
    assert again.tokens.standardize and again.tokens.settings() == encoder.tokens.settings()
    assert torch.equal(again(features=maps), encoder(features=maps))
