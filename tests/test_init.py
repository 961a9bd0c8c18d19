"""The new weights' values: distributions, reproducibility, and the rounded-normal tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusionsurgery.surgery.rounded_normal import rounded_normal

TORCH = {"BF16": torch.bfloat16, "F16": torch.float16}


def _uniform32(seed: int, n: int) -> np.ndarray:
    return np.random.Generator(np.random.SFC64(seed)).integers(0, 1 << 32, size=n, dtype=np.uint32)


@pytest.mark.parametrize("dtype,std", [("BF16", 0.02), ("F16", 0.02), ("BF16", 1.0), ("F16", 3e-5)])
def test_fast_lookup_is_the_search_it_stands_for(dtype, std):
    """Every draw equals the value whose cumulative-probability interval holds the integer."""
    table = rounded_normal(std, dtype)
    r = np.concatenate([_uniform32(1, 300_000), np.array([0, 1, 2**31, 2**32 - 2, 2**32 - 1], dtype=np.uint32)])
    expected = table.bits[np.searchsorted(table.thresholds, r.astype(np.uint64), side="right")]
    assert np.array_equal(table.sample(r), expected)
    assert np.all(np.diff(table.thresholds.astype(np.int64)) >= 0) and table.thresholds[-1] == 2**32


@pytest.mark.parametrize("dtype,std", [("BF16", 0.02), ("F16", 0.02), ("F16", 3e-5)])
def test_distribution_is_a_rounded_normal(dtype, std):
    """Two-sample chi-square against float64 normals rounded by torch (-0 for tiny negatives included)."""
    n = 4_000_000
    ours = rounded_normal(std, dtype).sample(_uniform32(2, n)).view(np.uint16)
    ref = torch.from_numpy(np.random.default_rng(3).standard_normal(n) * std).to(TORCH[dtype])
    ref = ref.view(torch.int16).numpy().view(np.uint16)
    a = np.bincount(ours, minlength=1 << 16).astype(float)
    b = np.bincount(ref, minlength=1 << 16).astype(float)
    keep = (a + b) > 40
    chi2 = float(((a[keep] - b[keep]) ** 2 / (a[keep] + b[keep])).sum())
    dof = int(keep.sum()) - 1
    assert dof > 100
    assert (chi2 - dof) / np.sqrt(2 * dof) < 5, (chi2, dof)
    values = torch.from_numpy(ours.view(np.int16)).view(TORCH[dtype]).double()
    assert abs(values.std().item() / std - 1) < 0.005 and abs(values.mean().item()) < 0.005 * std
    assert values.abs().max().item() > 4.5 * std  # the tails are there (about 27 draws beyond 4.5 std)


def test_rejects_what_it_cannot_tabulate():
    with pytest.raises(ValueError):
        rounded_normal(0.0, "BF16")
    with pytest.raises(ValueError):
        rounded_normal(0.02, "F32")


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_float_bits_round_like_torch(dtype):
    """fuse converts without torch; the bits must be the ones torch would write (round to nearest even)."""
    from fusionsurgery.io.float_bits import from_float32, to_float32

    rng = np.random.default_rng(0)
    specials = np.array([0.0, -0.0, 1.0, -1.5, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 1e-40, -1e-45, 65504.0,
                         65520.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 6e-8], dtype=np.float32)
    ties = (np.arange(1 << 16, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # exact bf16 half-way points
    values = np.concatenate([specials, rng.standard_normal(100_000).astype(np.float32) * 0.02,
                             ties[np.isfinite(ties)], rng.integers(0, 2**32, 100_000, dtype=np.uint32).view(np.float32)])
    ours = from_float32(values, dtype)
    ref = torch.from_numpy(values).to({"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[dtype])
    ref_bits = ref.view(torch.int16 if dtype != "F32" else torch.int32).numpy()
    nan = np.isnan(values)
    assert np.array_equal(ours.view(ref_bits.dtype)[~nan], ref_bits[~nan])
    back = to_float32(ours.tobytes(), dtype)
    assert np.isnan(back[nan]).all() and np.array_equal(back[~nan], ref.float().numpy()[~nan])  # NaN stays NaN
