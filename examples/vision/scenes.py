"""Rendered scenes whose true description is known: shapes of one colour, size and shape, counted and placed.

Real photo collections do not ship in packages, so the example renders its images: every scene holds
one, two or three copies of a shape (circle, square, triangle, star) of one colour and one size,
all inside one quadrant of the picture, on a lightly tinted, slightly noisy background. Its caption
says all five attributes in a fixed order::

    two large red circles, top left.

Some colour-shape pairs never occur in training (``UNSEEN``): a model that reads the image, rather
than recalling captions, still names them. Pillow draws; numpy adds the noise.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import asdict, dataclass

import numpy as np

COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 220), "yellow": (240, 200, 20),
           "purple": (148, 72, 190)}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.06, "large": 0.09}  # radius as a share of the image side
COUNTS = ("one", "two", "three")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
#: colour-shape pairs held out of training altogether (each colour and each shape is still seen otherwise)
UNSEEN = (("red", "triangle"), ("green", "star"), ("blue", "square"), ("yellow", "circle"))
ATTRIBUTES = ("count", "size", "colour", "shape", "position")


@dataclass(frozen=True)
class Scene:
    """What a picture shows; ``caption`` says it in words."""

    count: str
    size: str
    colour: str
    shape: str
    position: str
    seed: int

    @property
    def caption(self) -> str:
        plural = "s" if self.count != "one" else ""
        return f"{self.count} {self.size} {self.colour} {self.shape}{plural}, {self.position}."

    @property
    def unseen(self) -> bool:
        return (self.colour, self.shape) in UNSEEN

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "caption": self.caption}


def sample_scenes(n: int, seed: int, *, unseen: bool) -> list[Scene]:
    """``n`` random scenes; with ``unseen`` only the held-out colour-shape pairs, else only the others."""
    rng = random.Random(seed)
    pairs = [(c, s) for c in COLOURS for s in SHAPES if ((c, s) in UNSEEN) == unseen]
    out = []
    for _ in range(n):
        colour, shape = rng.choice(pairs)
        out.append(Scene(rng.choice(COUNTS), rng.choice(list(SIZES)), colour, shape, rng.choice(POSITIONS),
                         rng.randrange(2**31)))
    return out


def render(scene: Scene, size: int = 128):
    """The picture of ``scene``: an RGB ``PIL.Image`` of ``size`` x ``size`` pixels (deterministic per seed)."""
    from PIL import Image, ImageDraw

    rng = random.Random(scene.seed)
    tint = [rng.randint(215, 250) for _ in range(3)]
    img = Image.new("RGB", (size, size), tuple(tint))
    draw = ImageDraw.Draw(img)
    radius = SIZES[scene.size] * size * rng.uniform(0.9, 1.1)
    half = size / 2
    x0 = half if scene.position.endswith("right") else 0.0
    y0 = half if scene.position.startswith("bottom") else 0.0
    centres = _place(rng, COUNTS.index(scene.count) + 1, radius, x0, y0, half)
    fill = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in COLOURS[scene.colour])
    for cx, cy in centres:
        _draw(draw, scene.shape, cx, cy, radius, rng.uniform(-0.3, 0.3), fill)
    pixels = np.asarray(img, dtype=np.int16)
    noise = np.random.default_rng(scene.seed).integers(-8, 9, size=pixels.shape)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def _place(rng: random.Random, k: int, r: float, x0: float, y0: float, side: float) -> list[tuple[float, float]]:
    """``k`` centres inside the quadrant at ``(x0, y0)`` whose shapes of radius ``r`` do not overlap."""
    margin = r + 1
    for _ in range(2000):
        pts = [(rng.uniform(x0 + margin, x0 + side - margin), rng.uniform(y0 + margin, y0 + side - margin))
               for _ in range(k)]
        if all(math.dist(a, b) > 2.05 * r for i, a in enumerate(pts) for b in pts[i + 1:]):
            return pts
    raise RuntimeError(f"cannot place {k} shapes of radius {r:.1f} in a quadrant of {side:.0f} px")


def _draw(draw, shape: str, cx: float, cy: float, r: float, turn: float, fill: tuple[int, ...]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        return
    if shape == "square":
        corners, start, radii = 4, math.pi / 4 + turn, [r * 0.95]
    elif shape == "triangle":
        corners, start, radii = 3, -math.pi / 2 + turn, [r * 1.1]
    else:  # star: five points, inner radius 0.45 of the outer
        corners, start, radii = 10, -math.pi / 2 + turn, [r * 1.1, r * 0.45]
    pts = [(cx + radii[i % len(radii)] * math.cos(start + 2 * math.pi * i / corners),
            cy + radii[i % len(radii)] * math.sin(start + 2 * math.pi * i / corners)) for i in range(corners)]
    draw.polygon(pts, fill=fill)


def corrupted(scene: Scene, p: float, rng: random.Random) -> Scene:
    """``scene`` with each attribute, with chance ``p``, replaced by another value of it (a caption to show
    as context in training while the labels keep the true one: no attribute can then be guessed from
    the words written before it)."""
    values = {**_WORDS, "position": POSITIONS}
    changed = {a: rng.choice([v for v in vs if v != getattr(scene, a)]) for a, vs in values.items() if rng.random() < p}
    return Scene(**{**asdict(scene), **changed})


# -- reading a caption back ---------------------------------------------------------------------

_WORDS = {"count": COUNTS, "size": tuple(SIZES), "colour": tuple(COLOURS), "shape": SHAPES}


def parse_caption(text: str) -> dict[str, str | None]:
    """The attribute each slot of a written caption names (None where it names none).

    Each attribute is the first word of its vocabulary in the text (plurals count: ``circles`` is a
    circle); the position is the first of the four quadrant phrases.
    """
    words = re.findall(r"[a-z]+", text.lower())
    found: dict[str, str | None] = {}
    for attr, vocab in _WORDS.items():
        found[attr] = next((w.rstrip("s") if attr == "shape" else w for w in words
                            if w in vocab or (attr == "shape" and w.endswith("s") and w[:-1] in vocab)), None)
    low = " ".join(words)
    hits = [(low.find(p), p) for p in POSITIONS if p in low]
    found["position"] = min(hits)[1] if hits else None
    return found
