"""The new weights' values: distributions, reproducibility, and the rounded-normal tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fusionsurgery.surgery.rounded_normal import rounded_normal

TORCH = {"BF16": torch.bfloat16, "F16": torch.float16}


class _Recording:
    """A generator stand-in that hands out a real SFC64's words and keeps every draw."""

    def __init__(self, seed: int) -> None:
        self._real = np.random.Generator(np.random.SFC64(seed)).bit_generator
        self.draws: list[np.ndarray] = []
        self.bit_generator = self

    def random_raw(self, n: int) -> np.ndarray:
        words = self._real.random_raw(n)
        self.draws.append(words.copy())
        return words


def _gen(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.SFC64(seed))


@pytest.mark.parametrize("dtype,std", [("BF16", 0.02), ("F16", 0.02), ("BF16", 1.0), ("F16", 3e-5)])
def test_fast_lookup_is_the_search_it_stands_for(dtype, std, monkeypatch):
    """Every draw is the value whose cumulative-probability interval holds its random number
    (cell bits, then 32 more bits where the cell straddles a boundary)."""
    from fusionsurgery.surgery import rounded_normal as rn

    monkeypatch.setattr(rn, "BLOCK", 1 << 12)  # several blocks, a partial last one
    table = rounded_normal(std, dtype)
    n = 3 * (1 << 12) + 7
    rec = _Recording(1)
    out = table.sample(n, rec)
    per_word, bits = 64 // table.cell_bits, table.cell_bits
    checked, draws = 0, iter(rec.draws)
    for s in range(0, n, 1 << 12):
        m = min(1 << 12, n - s)
        words = next(draws)
        if per_word == 4:  # the words seen as 16-bit integers
            cells = words.view(np.uint16)[:m].astype(np.uint64)
        else:  # lane k of every word, then lane k + 1 of every word
            cells = np.concatenate([(words >> np.uint64(bits * k)) & np.uint64((1 << bits) - 1)
                                    for k in range(per_word)])[:m]
        block = out[s:s + m]
        mixed = table.cells[cells.astype(np.intp)] == rn.MIXED
        number = cells << np.uint64(32)
        if mixed.any():  # those draws took 32 more bits each, in order
            number[mixed] |= next(draws) >> np.uint64(32)
        expected = table.bits[np.searchsorted(table.thresholds, number, side="right")]
        assert np.array_equal(block[mixed], expected[mixed])
        # a pure cell: every number in it gives the value (its first and its last)
        last = table.bits[np.searchsorted(table.thresholds, number | np.uint64(0xFFFFFFFF), side="right")]
        assert np.array_equal(block[~mixed], expected[~mixed]) and np.array_equal(block[~mixed], last[~mixed])
        checked += int(mixed.sum())
    assert checked > 50
    assert np.all(np.diff(table.thresholds.astype(np.int64)) >= 0)
    assert table.thresholds[-1] == 1 << (table.cell_bits + 32)


def _chi2_against(ours: np.ndarray, ref: np.ndarray) -> tuple[float, int]:
    a = np.bincount(ours, minlength=1 << 16).astype(float)
    b = np.bincount(ref, minlength=1 << 16).astype(float)
    keep = (a + b) > 40
    return float(((a[keep] - b[keep]) ** 2 / (a[keep] + b[keep])).sum()), int(keep.sum()) - 1


def _torch_rounded(values: np.ndarray, dtype: str) -> np.ndarray:
    return torch.from_numpy(values).to(TORCH[dtype]).view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("dtype,std", [("BF16", 0.02), ("F16", 0.02), ("F16", 3e-5)])
def test_distribution_is_a_rounded_normal(dtype, std):
    """Two-sample chi-square against float64 normals rounded by torch (-0 for tiny negatives
    included), moments, and the tails: frequencies beyond 3, 4 and 4.5 standard deviations."""
    n = 4_000_000
    ours = rounded_normal(std, dtype).sample(n, _gen(2)).view(np.uint16)
    ref = _torch_rounded(np.random.default_rng(3).standard_normal(n) * std, dtype)
    chi2, dof = _chi2_against(ours, ref)
    assert dof > 100
    assert (chi2 - dof) / np.sqrt(2 * dof) < 5, (chi2, dof)
    values = torch.from_numpy(ours.view(np.int16)).view(TORCH[dtype]).double().numpy() / std
    assert abs(values.std() - 1) < 0.003 and abs(values.mean()) < 0.003
    assert abs(np.mean(values ** 4) - 3) < 0.03  # kurtosis of a normal
    for k, p in ((3, 2.6998e-3), (4, 6.3342e-5), (4.5, 6.7953e-6)):
        count, expected = int(np.sum(np.abs(values) > k)), n * p
        assert abs(count - expected) < 5 * np.sqrt(expected) + 1, (k, count, expected)


def test_far_tails_are_drawn_as_often_as_a_normal_puts_them():
    """bf16 draws beyond 5 std: as often as a true normal's (5.3e-7), at 40 million draws."""
    table = rounded_normal(1.0, "BF16")
    beyond = 0
    for seed in range(10):
        values = table.sample(4_000_000, _gen(100 + seed))
        bits = values.view(np.uint16) & np.uint16(0x7FFF)
        beyond += int(np.sum(bits > np.uint16(0x40A0)))  # |x| > 5.0 (bf16 of 5.0 is 0x40A0)
    expected = 40_000_000 * math.erfc((5.0 + 2**-6) / math.sqrt(2))  # above 5.0 once rounded: above 5 + half a step
    assert abs(beyond - expected) < 5 * np.sqrt(expected) + 3, (beyond, expected)


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_xavier_16bit_is_a_rounded_uniform(dtype):
    """Uniform on [-b, b], rounded: against torch-rounded float64 uniforms; within the bound."""
    from fusionsurgery.surgery.rounded_normal import rounded_uniform

    bound, n = 0.0312, 2_000_000
    ours = rounded_uniform(bound, dtype).sample(n, _gen(4)).view(np.uint16)
    ref = _torch_rounded(np.random.default_rng(5).uniform(-bound, bound, n), dtype)
    chi2, dof = _chi2_against(ours, ref)
    assert dof > 100 and (chi2 - dof) / np.sqrt(2 * dof) < 5, (chi2, dof)
    values = torch.from_numpy(ours.view(np.int16)).view(TORCH[dtype]).double().numpy()
    assert np.abs(values).max() <= float(torch.tensor(bound).to(TORCH[dtype])) and abs(values.mean()) < 1e-4
    assert abs(values.var() - bound ** 2 / 3) < 0.005 * bound ** 2 / 3


def test_float32_normal_moments_and_tails():
    """fp32 normals against numpy's float64 ones: KS distance, moments and tail frequencies."""
    from fusionsurgery.surgery import float32_normal

    n, std = 4_000_000, 0.02
    out = np.empty(n, dtype=np.float32)
    float32_normal.sample_into(out, std, _gen(6))
    z = out.astype(np.float64) / std
    ref = np.random.default_rng(7).standard_normal(n)
    assert abs(z.mean()) < 0.002 and abs(z.std() - 1) < 0.002 and abs(np.mean(z ** 4) - 3) < 0.02
    grid = np.linspace(-4, 4, 801)
    ks = np.abs(np.searchsorted(np.sort(z), grid) - np.searchsorted(np.sort(ref), grid)).max() / n
    assert ks < 1.5 * 1.36 * np.sqrt(2 / n), ks  # well within a two-sample KS test at 5%
    for k, p in ((3, 2.6998e-3), (4, 6.3342e-5), (5, 5.733e-7)):
        count, expected = int(np.sum(np.abs(z) > k)), n * p
        assert abs(count - expected) < 5 * np.sqrt(expected) + 2, (k, count, expected)
    assert np.abs(z).max() < 6.3 and np.sum(z > 0) - n / 2 < 5 * np.sqrt(n / 4)


def test_float32_normal_interpolation_is_close_to_the_inverse_cdf():
    """The table's piecewise-linear x(q) against the exact inverse CDF at random q."""
    from statistics import NormalDist

    from fusionsurgery.surgery import float32_normal

    rec = _Recording(8)
    out = np.empty(100_000, dtype=np.float32)
    float32_normal.sample_into(out, 1.0, rec)
    r = np.concatenate(rec.draws).view(np.uint32)[:out.size]
    q = ((r >> 1) | 1).astype(np.float64) / 2**31
    exact = np.array([-NormalDist().inv_cdf(p / 2) for p in q.tolist()])
    assert np.allclose(np.abs(out), exact, rtol=2e-6, atol=1e-6)
    assert np.array_equal(np.signbit(out), (r & 1).astype(bool))


def test_samplers_reject_what_they_cannot_tabulate():
    from fusionsurgery.surgery.rounded_normal import rounded_uniform

    with pytest.raises(ValueError):
        rounded_normal(0.0, "BF16")
    with pytest.raises(ValueError):
        rounded_normal(0.02, "F32")
    with pytest.raises(ValueError):
        rounded_uniform(-1.0, "F16")


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


_DIGEST_ALL_INITS = """
import hashlib, sys
from fusionsurgery.surgery.init import make_chunk
from fusionsurgery.surgery.plan import NewTensor
for init in ("normal", "xavier"):
    for dtype in ("BF16", "F16", "F32"):
        spec = NewTensor("w", "layers.0.w", (300, 5000), dtype, init, 0.02)
        print(init, dtype, hashlib.sha256(bytes(make_chunk(spec, 7, 0))).hexdigest())
"""


def test_same_bytes_whatever_numpy_simd_kernels_run():
    """The new weights do not depend on which SIMD kernels numpy dispatches to on this CPU:
    the same seed under numpy's baseline (SSE4.2) kernels and under its best ones."""
    import os
    import subprocess
    import sys

    outputs = []
    for disabled in ("", "X86_V3,X86_V4,AVX512_ICL,AVX512_SPR"):
        env = dict(os.environ, NPY_DISABLE_CPU_FEATURES=disabled)
        run = subprocess.run([sys.executable, "-c", _DIGEST_ALL_INITS], env=env, capture_output=True, text=True,
                             check=True)
        outputs.append(run.stdout)
    assert outputs[0].count("\n") == 6 and outputs[0] == outputs[1]


def test_same_bytes_whatever_the_thread_count(monkeypatch):
    """Chunks made ahead on 1 or 3 threads (several tensors, several chunks each) are the same bytes."""
    from concurrent.futures import ThreadPoolExecutor

    from fusionsurgery.surgery import init
    from fusionsurgery.surgery.plan import NewTensor

    monkeypatch.setattr(init, "CHUNK_ELEMS", 1 << 14)
    specs = [NewTensor(f"t{i}", f"layers.{i}.w", (100, 700), dt, kind, 0.02)
             for i, (dt, kind) in enumerate([("BF16", "normal"), ("F16", "xavier"), ("F32", "normal")])]
    serial = [bytes(c) for _, c in init.chunk_stream(specs, 3)]
    for threads in (1, 3):
        with ThreadPoolExecutor(threads) as pool:
            assert [bytes(c) for _, c in init.chunk_stream(specs, 3, None, pool)] == serial
    assert len(serial) == sum(init.num_chunks(s) for s in specs) > 3
