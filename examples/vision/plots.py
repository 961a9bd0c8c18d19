"""The example's pictures: held-out images with the captions the model wrote, and the training curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import scenes

GREEN, RED, GREY = (20, 130, 40), (200, 30, 30), (90, 90, 90)


def caption_grid(examples: dict[str, list[dict[str, Any]]], size: int, path: Path, per_set: int = 8,
                 columns: int = 4, scale: int = 2) -> None:
    """A PNG of held-out images (``per_set`` of each set), each with the caption written for it.

    Every word naming an attribute is green when it is the true value and red when not; under it, in
    grey, the true caption where the written one differs.
    """
    from PIL import Image, ImageDraw, ImageFont

    cell_w, img_h, text_h, head_h = size * scale, size * scale, 58, 30
    font = ImageFont.load_default(size=15)
    small = ImageFont.load_default(size=12)
    bold = ImageFont.load_default(size=17)
    rows_per_set = -(-per_set // columns)
    titles = {"held_out": "held-out images", "unseen": "unseen colour-shape pairs (never in training)"}
    height = sum(head_h + rows_per_set * (img_h + text_h) for _ in examples)
    sheet = Image.new("RGB", (columns * (cell_w + 8) + 8, height + 8), "white")
    draw = ImageDraw.Draw(sheet)
    y = 4
    for name, items in examples.items():
        draw.text((8, y + 6), titles.get(name, name), fill=(0, 0, 0), font=bold)
        y += head_h
        for k, ex in enumerate(items[:per_set]):
            col, row = k % columns, k // columns
            x0, y0 = 8 + col * (cell_w + 8), y + row * (img_h + text_h)
            scene = scenes.Scene(**{f: ex[f] for f in ("count", "size", "colour", "shape", "position", "seed")})
            sheet.paste(scenes.render(scene, size).resize((cell_w, img_h), Image.Resampling.NEAREST), (x0, y0))
            _coloured_caption(draw, (x0 + 2, y0 + img_h + 4), ex["image"], scene, font)
            if ex["image"] != scene.caption:
                draw.text((x0 + 2, y0 + img_h + 24), "true: " + scene.caption, fill=GREY, font=small)
        y += rows_per_set * (img_h + text_h)
    sheet.save(path)


def _coloured_caption(draw: Any, xy: tuple[int, int], text: str, scene: scenes.Scene, font: Any) -> None:
    """``text`` word by word: attribute words green (right) or red (wrong), the rest black."""
    truth = {a: getattr(scene, a) for a in scenes.ATTRIBUTES}
    parsed = scenes.parse_caption(text)
    right_words = set()
    for attr in ("count", "size", "colour", "shape"):
        if parsed[attr] is not None and parsed[attr] == truth[attr]:
            right_words.add(parsed[attr])
    position_right = parsed["position"] == truth["position"]
    x, y = xy
    for word in text.split() or ["(nothing)"]:
        bare = word.strip(".,").lower()
        stem = bare[:-1] if bare.endswith("s") and bare[:-1] in scenes.SHAPES else bare
        if bare in ("top", "bottom", "left", "right"):
            colour = GREEN if position_right else RED
        elif any(stem in vocab for vocab in (scenes.COUNTS, scenes.SIZES, scenes.COLOURS, scenes.SHAPES)):
            colour = GREEN if stem in right_words else RED
        else:
            colour = (0, 0, 0)
        draw.text((x, y), word, fill=colour, font=font)
        x += int(draw.textlength(word + " ", font=font))


def curves(losses: list[float], gates: list[dict[str, float]], path: Path) -> None:
    """A PNG with the training loss (each step and a moving mean) and every gate's ``tanh`` over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = 10
    smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6), dpi=100)
    steps = range(1, len(losses) + 1)
    a.plot(steps, losses, color="0.75", lw=0.8, label="each step")
    a.plot(steps, smooth, color="C0", lw=1.8, label=f"mean of {k}")
    a.set_xlabel("step")
    a.set_ylabel("cross-entropy (caption tokens)")
    a.set_title("training loss", fontsize=10)
    a.set_yscale("log")
    a.grid(alpha=0.3)
    a.legend()
    names = [n for n in gates[0] if n != "step"]
    xs = [g["step"] for g in gates]
    for i, name in enumerate(names):
        b.plot(xs, [g[name] for g in gates], color=f"C{i // 2}", ls="-" if name.endswith("attn") else "--", lw=1.3,
               label=name.replace("layer ", "L"))
    b.set_xlabel("step")
    b.set_ylabel("tanh(gate)")
    b.set_title("gates of the fusion layers (solid: cross-attention, dashed: MLP)", fontsize=10)
    b.grid(alpha=0.3)
    b.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
