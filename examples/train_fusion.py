"""A fused model must actually learn: train only the fusion parameters on a task only the encoder can solve.

The encoder input shows one token (a fixed random vector per token, plus a distractor vector of
noise); the decoder reads random prompt tokens and must emit the shown token at the last position.
The text-only path cannot know the token, so its best possible loss is ln(K) for K candidate
tokens (chance); the fused model, with the base frozen, must get far below it.

    python examples/train_fusion.py [--steps 300] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fusionsurgery import fuse, get_fusion_params, load_fused

EXAMPLE = Path(__file__).parent / "tiny-llama"


@dataclass
class Task:
    """K candidate tokens and the encoder's fixed vector for each."""

    ids: torch.Tensor  # [K] token ids
    vectors: torch.Tensor  # [K, encoder_dim]
    vocab: int
    prompt_len: int = 8

    @property
    def chance(self) -> float:
        return math.log(len(self.ids))

    def batch(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens [n, prompt_len], encoder input [n, 2, encoder_dim], targets [n])."""
        pick = torch.randint(0, len(self.ids), (n,), generator=gen)
        tokens = torch.randint(0, self.vocab, (n, self.prompt_len), generator=gen)
        noise = torch.randn(n, 1, self.vectors.shape[1], generator=gen)
        enc = torch.cat([self.vectors[pick][:, None], noise], 1)
        return tokens, enc, self.ids[pick]


def make_task(vocab: int, encoder_dim: int, k: int = 32, seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(vocab, generator=g)[:k]
    return Task(ids, torch.randn(k, encoder_dim, generator=g), vocab)


def last_loss(model: torch.nn.Module, tokens: torch.Tensor, enc: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
    logits = model(tokens, encoder_input=enc)[:, -1]
    return F.cross_entropy(logits.float(), targets)


def train(fused_dir: Path, steps: int = 300, batch_size: int = 32, lr: float = 1e-2, seed: int = 0,
          log_every: int = 50, log=print) -> dict[str, float]:
    """Train the fusion parameters of ``fused_dir`` on the task; returns the losses."""
    torch.manual_seed(seed)
    model = load_fused(fused_dir, dtype=torch.float32)
    model.requires_grad_(False)  # freeze the base ...
    params = get_fusion_params(model)
    for p in params.values():  # ... and train only what fusion added
        p.requires_grad_(True)
    model.train()
    encoder_dim = json.loads((Path(fused_dir) / "config.json").read_text())["fusion"]["encoder_dim"]
    task = make_task(model.tok_embeddings.weight.shape[0], encoder_dim, seed=seed)
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(1, steps + 1):
        tokens, enc, targets = task.batch(batch_size, gen)
        loss = last_loss(model, tokens, enc, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step % log_every == 0 or step == 1):
            log(f"step {step:4d}  loss {loss.item():.3f}  (chance {task.chance:.3f})")
    model.eval()
    eval_gen = torch.Generator().manual_seed(seed + 2)
    tokens, enc, targets = task.batch(512, eval_gen)
    with torch.no_grad():
        fused = last_loss(model, tokens, enc, targets).item()
        text_only = last_loss(model, tokens, None, targets).item()
        accuracy = (model(tokens, encoder_input=enc)[:, -1].argmax(-1) == targets).float().mean().item()
    return {"loss": fused, "text_only_loss": text_only, "chance": task.chance, "accuracy": accuracy,
            "vocab_chance": math.log(task.vocab), "candidates": len(task.ids),
            "trainable_params": sum(p.numel() for p in params.values()),
            "total_params": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--every", type=int, default=4, help="fuse every N-th layer")
    ap.add_argument("--out", type=Path, help="where to write the fused checkpoint [default: a temporary directory]")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "tiny-llama-fused"
        fuse(EXAMPLE, out, every=args.every, dtype="fp32", force=args.out is not None)
        r = train(out, steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    print(f"trained {r['trainable_params']:,} of {r['total_params']:,} parameters (base frozen)")
    print(f"held-out loss {r['loss']:.3f}, accuracy {r['accuracy']:.0%}")
    print(f"chance {r['chance']:.3f} (ln of {r['candidates']} candidate tokens; "
          f"{r['vocab_chance']:.3f} over the vocab); text-only path {r['text_only_loss']:.3f}")
    return 0 if r["loss"] < 0.5 * r["chance"] else 1


if __name__ == "__main__":
    sys.exit(main())
