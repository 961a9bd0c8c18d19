"""``generate``: decoding through the KV caches equals recomputing full forward passes; sampling, EOS, batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fusionsurgery import DeepFusionModel, fuse, generate, load_fused
from fusionsurgery.native.generation import pick
from helpers import open_gates

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-llama"
VOCAB, WIDTH = 2048, 128


@pytest.fixture(scope="module")
def fused_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "fused"
    fuse(EXAMPLE, out, every=4, dtype="fp32")
    return out


@pytest.fixture()
def model(fused_dir: Path) -> nn.Module:
    m = load_fused(fused_dir, dtype=torch.float32)
    open_gates(m, 0.5)  # the encoder input matters
    return m


def _inputs(batch: int = 3, seq: int = 5, enc: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, seq), generator=g)
    states = torch.randn(batch, enc, WIDTH, generator=g)
    mask = torch.ones(batch, enc, dtype=torch.bool)
    mask[0, 4:] = False  # a padded encoder row
    return tokens, states, mask


def _greedy_without_cache(model: nn.Module, tokens: torch.Tensor, n: int, **enc) -> torch.Tensor:
    """Greedy decoding the slow way: a full forward pass over the whole sequence for every token."""
    seq = tokens
    with torch.no_grad():
        for _ in range(n):
            kwargs = dict(enc)
            if "encoder_mask" in kwargs:
                kwargs["encoder_mask"] = kwargs["encoder_mask"][:, None].expand(-1, seq.shape[1], -1)
            nxt = model(seq, **kwargs)[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
    return seq


def test_greedy_equals_argmax_of_full_forwards(model: nn.Module) -> None:
    tokens, states, mask = _inputs()
    out = generate(model, tokens, encoder_input=states, encoder_mask=mask, max_new_tokens=10)
    assert out.shape == (3, 15) and torch.equal(out[:, :5], tokens)
    assert torch.equal(out, _greedy_without_cache(model, tokens, 10, encoder_input=states, encoder_mask=mask))
    text_only = generate(model, tokens, max_new_tokens=10)
    assert torch.equal(text_only, _greedy_without_cache(model, tokens, 10))
    assert not torch.equal(out, text_only)  # the encoder input changes what is written


def test_whole_sequence_encoder_mask_is_sliced_by_position(model: nn.Module) -> None:
    tokens, states, mask = _inputs()
    full = mask[:, None].expand(-1, 5 + 6, -1).clone()
    full[1, 7:, 2:] = False  # row 1 sees less of the encoder from position 7 on
    out = generate(model, tokens, encoder_input=states, encoder_mask=full, max_new_tokens=6)
    seq = tokens
    with torch.no_grad():
        for _ in range(6):
            nxt = model(seq, encoder_input=states, encoder_mask=full[:, :seq.shape[1]])[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
    assert torch.equal(out, seq)
    with pytest.raises(ValueError, match="encoder_mask"):
        generate(model, tokens, encoder_input=states, encoder_mask=full[:, :8], max_new_tokens=6)


def test_deep_fusion_model_and_bare_decoder(fused_dir: Path) -> None:
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(16, WIDTH)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.proj(features)

    torch.manual_seed(0)
    decoder = load_fused(fused_dir, dtype=torch.float32)
    open_gates(decoder, 0.5)
    dfm = DeepFusionModel(decoder, Encoder()).eval()
    tokens, _, _ = _inputs(batch=2)
    features = torch.randn(2, 6, 16)
    out = generate(dfm, tokens, encoder_input={"features": features}, max_new_tokens=8)
    assert torch.equal(out, _greedy_without_cache(dfm, tokens, 8, encoder_input={"features": features}))
    bare = load_fused(EXAMPLE, dtype=torch.float32)  # the base: no fusion layers at all
    assert torch.equal(generate(bare, tokens, max_new_tokens=8), _greedy_without_cache(bare, tokens, 8))


def test_batch_equals_one_row_at_a_time(model: nn.Module) -> None:
    tokens, states, mask = _inputs(batch=4)
    out = generate(model, tokens, encoder_input=states, encoder_mask=mask, max_new_tokens=7)
    for i in range(4):
        row = generate(model, tokens[i:i + 1], encoder_input=states[i:i + 1], encoder_mask=mask[i:i + 1],
                       max_new_tokens=7)
        assert torch.equal(out[i:i + 1], row)


def test_stops_at_eos_and_pads_finished_rows(model: nn.Module) -> None:
    tokens, states, mask = _inputs()
    free = generate(model, tokens, encoder_input=states, encoder_mask=mask, max_new_tokens=10)
    eos = int(free[0, 5 + 3])  # the 4th token row 0 writes (it may write it earlier too)
    out = generate(model, tokens, encoder_input=states, encoder_mask=mask, max_new_tokens=10, eos_id=eos,
                   pad_id=-1)
    for i in range(3):
        new = free[i, 5:].tolist()
        stop = new.index(eos) + 1 if eos in new else len(new)
        got = out[i, 5:].tolist()
        assert got[:stop] == new[:stop]  # the same tokens up to and including the first eos
        assert all(t == -1 for t in got[stop:])  # then padding
    first_stops = [(free[i, 5:].tolist() + [eos]).index(eos) + 1 for i in range(3)]
    assert out.shape[1] == 5 + min(10, max(first_stops))  # ends as soon as every row is done
    all_done = generate(model, tokens[:1], encoder_input=states[:1], encoder_mask=mask[:1], max_new_tokens=10,
                        eos_id=[12345, eos])
    first = free[0, 5:].tolist().index(eos) + 1  # row 0 writes eos 4th, or earlier
    assert all_done.shape[1] == 5 + first and int(all_done[0, -1]) == eos


def test_sampling_is_reproducible_with_a_generator(model: nn.Module) -> None:
    tokens, states, mask = _inputs()

    def sample(seed: int, **kw) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return generate(model, tokens, encoder_input=states, encoder_mask=mask, max_new_tokens=12,
                        generator=g, **kw)

    a, b, c = sample(1, temperature=1.0), sample(1, temperature=1.0), sample(2, temperature=1.0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = generate(model, tokens, encoder_input=states, encoder_mask=mask, max_new_tokens=12)
    assert torch.equal(sample(3, temperature=1.0, top_k=1), greedy)
    assert torch.equal(sample(4, temperature=0.7, top_p=1e-6), greedy)
    assert torch.equal(sample(5, temperature=1.3, top_k=50, top_p=0.9), sample(5, temperature=1.3, top_k=50, top_p=0.9))


def test_pick_filters() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(pick(logits, temperature=1.0, top_p=0.75, generator=g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.75: the nucleus is the two most likely
    draws = {int(pick(logits, temperature=1.0, top_k=3, generator=g)) for _ in range(300)}
    assert draws == {0, 1, 2}
    assert int(pick(logits)) == 0
    with pytest.raises(ValueError):
        pick(logits, temperature=1.0, top_p=0.0)


def test_caches_are_removed_afterwards_or_kept_when_set_up_before(model: nn.Module) -> None:
    tokens, states, mask = _inputs()
    generate(model, tokens, encoder_input=states, max_new_tokens=3)
    assert not model.caches_are_setup()
    with torch.no_grad():
        assert model(tokens[:1, :2], encoder_input=states[:1]).shape == (1, 2, VOCAB)  # plain forward again
    model.setup_caches(3, torch.float32, encoder_max_seq_len=7, decoder_max_seq_len=20)
    kept = generate(model, tokens, encoder_input=states, encoder_mask=mask, max_new_tokens=4)
    assert model.caches_are_setup()
    assert torch.equal(kept, generate(model, tokens, encoder_input=states, encoder_mask=mask, max_new_tokens=4))


def test_bad_arguments() -> None:
    m = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="tokens"):
        generate(m, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="negative"):
        generate(m, torch.zeros(1, 2, dtype=torch.long), max_new_tokens=-1)
