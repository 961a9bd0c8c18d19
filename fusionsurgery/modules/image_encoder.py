"""Any torch image encoder as the encoder of a fused model.

A convolutional image encoder returns feature maps ``[b, c, h, w]``; a fused decoder's
cross-attention reads a sequence of tokens ``[b, e, encoder_dim]``. ``ImageTokens`` turns one into the
other: every cell of the map becomes a token (``e = h * w``, row-major), a trainable linear
projection maps its ``c`` channels to ``encoder_dim``, and a learned embedding per cell is added.
Cross-attention has no positional encoding of its own (``GatedCrossAttentionLayer`` in ``layers.py``), so without
that embedding the decoder could tell *what* is in an image but not *where*.

``ImageEncoder`` puts a (usually frozen, pretrained) backbone in front of it. Its output is what
``DeepFusionModel`` feeds the fusion layers (``encoder_input={"images": x}``) and what a
``fusionsurgery.hf`` model takes as ``cross_attention_states``. With a frozen backbone the feature maps
can be computed once and cached: ``encoder(features=cached)`` skips the backbone.

Only the adapter (projection and position embedding) is a fusion parameter: ``get_fusion_params``
finds it and ``DeepFusionModel`` trains it with the fusion layers. ``save_pretrained`` writes the
adapter alone (the backbone comes from wherever it came from), ``ImageEncoder.from_pretrained``
puts it back in front of a backbone.

Torch only: nothing here imports transformers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from ..io.atomic import AtomicDirectory
from .fusion import register_fusion_module

#: File names that ``save_pretrained`` writes: the adapter's settings and its tensors.
CONFIG_FILE = "image_tokens.json"
WEIGHTS_FILE = "image_tokens.safetensors"
FORMAT = "fusionsurgery.image_tokens/1"


class ImageTokens(nn.Module):
    """Feature maps ``[b, c, h, w]`` -> encoder tokens ``[b, h * w, dim]``: projection plus position embedding.

    Token ``i * w + j`` is the map's cell at row ``i``, column ``j``. Registered as a fusion module:
    all its parameters are fusion parameters.

    Args:
        channels (int): ``c``, the channels of the feature maps it reads.
        dim (int): width of the tokens, the ``encoder_dim`` of the decoder's fusion layers.
        grid (int | tuple[int, int]): ``(h, w)`` of the feature maps (an int: square); one learned
            position embedding per cell.
        bias (bool): give the projection a bias. Default True.
        init_std (float): standard deviation of the position embedding's normal initialisation.
            Default 0.02.
        standardize (bool): subtract a per-channel mean and divide by a per-channel standard
            deviation before the projection (buffers ``feature_mean`` / ``feature_std``, saved with the
            adapter; identity until ``fit_standardization`` sets them from training features).
            Channels of very different scales (several stages of a backbone side by side) then
            start on an equal footing. Default False.

    Raises:
        ValueError: if a size is not positive.
    """

    def __init__(self, channels: int, dim: int, grid: int | tuple[int, int], *, bias: bool = True,
                 init_std: float = 0.02, standardize: bool = False) -> None:
        super().__init__()
        h, w = (grid, grid) if isinstance(grid, int) else tuple(grid)
        if min(channels, dim, h, w) < 1:
            raise ValueError(f"channels, dim and grid must be positive, not {channels}, {dim}, {(h, w)}")
        self.channels, self.dim, self.grid = channels, dim, (h, w)
        self.bias = bias
        self.projection = nn.Linear(channels, dim, bias=bias)
        self.position = nn.Parameter(torch.empty(h * w, dim))
        nn.init.normal_(self.position, std=init_std)
        self.init_std = init_std
        self.standardize = standardize
        if standardize:
            self.register_buffer("feature_mean", torch.zeros(channels))
            self.register_buffer("feature_std", torch.ones(channels))
        register_fusion_module(self)

    @torch.no_grad()
    def fit_standardization(self, features: torch.Tensor, eps: float = 1e-6) -> None:
        """Set the per-channel mean and standard deviation from feature maps (over batch and cells).

        Args:
            features (torch.Tensor): ``[b, channels, h, w]``, typically the training set's.
            eps (float): floor of the standard deviation (a constant channel is centred, not scaled up).

        Raises:
            ValueError: if the module was built without ``standardize`` or ``features`` has the wrong shape.
        """
        if not self.standardize:
            raise ValueError("this ImageTokens was built with standardize=False")
        if features.dim() != 4 or features.shape[1] != self.channels:
            raise ValueError(f"expected feature maps [batch, {self.channels}, h, w], got {list(features.shape)}")
        flat = features.transpose(0, 1).flatten(1).double()
        self.feature_mean.copy_(flat.mean(1))
        self.feature_std.copy_(flat.std(1, unbiased=False).clamp_min(eps))

    @property
    def num_tokens(self) -> int:
        """``h * w``: how many tokens an image becomes."""
        return self.grid[0] * self.grid[1]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Tokens of feature maps.

        Args:
            features (torch.Tensor): ``[b, channels, h, w]``, ``(h, w)`` the module's ``grid``.

        Returns:
            torch.Tensor: ``[b, h * w, dim]`` in the projection's dtype.

        Raises:
            ValueError: if ``features`` is not ``[b, channels, h, w]``.
        """
        if features.dim() != 4 or features.shape[1] != self.channels or tuple(features.shape[2:]) != self.grid:
            raise ValueError(f"expected feature maps [batch, {self.channels}, {self.grid[0]}, {self.grid[1]}], "
                             f"got {list(features.shape)}")
        tokens = features.flatten(2).transpose(1, 2).to(self.projection.weight.dtype)  # [b, h*w, c]
        if self.standardize:
            tokens = (tokens - self.feature_mean.to(tokens.dtype)) / self.feature_std.to(tokens.dtype)
        return self.projection(tokens) + self.position

    def settings(self) -> dict[str, Any]:
        """What rebuilds this module (``ImageTokens(**settings)``), as JSON-friendly values."""
        return {"channels": self.channels, "dim": self.dim, "grid": list(self.grid), "bias": self.bias,
                "init_std": self.init_std, "standardize": self.standardize}

    def extra_repr(self) -> str:
        return f"channels={self.channels}, dim={self.dim}, grid={self.grid}"


class ImageEncoder(nn.Module):
    """A backbone returning feature maps, then ``ImageTokens``: images ``[b, 3, H, W]`` -> ``[b, h * w, dim]``.

    Called with keyword arguments, as ``DeepFusionModel`` calls its encoder: ``encoder(images=x)``
    runs the backbone, ``encoder(features=f)`` starts from feature maps computed earlier (a frozen
    backbone's, cached). The backbone is not trained unless ``backbone_trainable``; then it also
    stays in eval mode (batch-norm statistics and dropout as pretrained) whatever mode the model
    around it is put in, and runs without building a graph.

    Args:
        backbone (Callable[[torch.Tensor], torch.Tensor] | None): images -> feature maps
            ``[b, c, h, w]``. An ``nn.Module`` is registered as a submodule (its parameters appear
            under ``backbone.``); any other callable is kept as an attribute, outside the state
            dict (a bound method such as ``model.extract_features``: unless ``backbone_trainable``,
            ``model`` is frozen and put in eval mode once, here). None: the encoder reads
            ``features=`` only.
        tokens (ImageTokens): the adapter.
        backbone_trainable (bool): let gradients reach the backbone and let it follow
            ``train()``/``eval()``. Default False.

    Raises:
        TypeError: if ``backbone`` is neither None nor callable.
    """

    def __init__(self, backbone: Callable[[torch.Tensor], torch.Tensor] | None, tokens: ImageTokens, *,
                 backbone_trainable: bool = False) -> None:
        super().__init__()
        if backbone is not None and not callable(backbone):
            raise TypeError(f"backbone must be callable (images -> feature maps), not {type(backbone).__name__}")
        self.backbone_trainable = backbone_trainable
        if isinstance(backbone, nn.Module):
            self.backbone = backbone
            if not backbone_trainable:
                backbone.requires_grad_(False)
                backbone.eval()
        else:
            self.backbone = None
            self._backbone_fn = backbone
            owner = getattr(backbone, "__self__", None)  # a bound method such as model.extract_features
            if isinstance(owner, nn.Module) and not backbone_trainable:
                owner.requires_grad_(False)
                owner.eval()
        self.tokens = tokens

    @classmethod
    def from_backbone(cls, backbone: Callable[[torch.Tensor], torch.Tensor], dim: int, image_size: int | tuple[int, int],
                      *, backbone_trainable: bool = False, **tokens_kwargs: Any) -> "ImageEncoder":
        """An encoder whose adapter fits what ``backbone`` returns for images of ``image_size``.

        The backbone runs once on one black image to learn ``c``, ``h`` and ``w``.

        Args:
            backbone: images -> feature maps, as in the class.
            dim (int): the width of the tokens (the fusion layers' ``encoder_dim``).
            image_size (int | tuple[int, int]): ``(H, W)`` of the images it will read (an int: square).
            backbone_trainable (bool): as in the class.
            **tokens_kwargs: ``bias`` / ``init_std`` / ``standardize`` of ``ImageTokens``.

        Returns:
            ImageEncoder: with a new ``ImageTokens`` adapter.

        Raises:
            ValueError: if the backbone does not return ``[1, c, h, w]`` for one image.
        """
        H, W = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        probe = torch.zeros(1, 3, H, W, dtype=_dtype_of(backbone))
        was_training = backbone.training if isinstance(backbone, nn.Module) else None
        if isinstance(backbone, nn.Module):
            backbone.eval()
        with torch.no_grad():
            maps = backbone(probe)
        if was_training:
            backbone.train()
        if not isinstance(maps, torch.Tensor) or maps.dim() != 4 or maps.shape[0] != 1:
            shape = list(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
            raise ValueError(f"the backbone must return feature maps [batch, channels, h, w]; for one image it gave {shape}")
        _, c, h, w = maps.shape
        return cls(backbone, ImageTokens(c, dim, (h, w), **tokens_kwargs), backbone_trainable=backbone_trainable)

    def train(self, mode: bool = True) -> "ImageEncoder":
        """Set the training mode; a frozen backbone stays in eval mode."""
        super().train(mode)
        if isinstance(self.backbone, nn.Module) and not self.backbone_trainable:
            self.backbone.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's feature maps ``[b, c, h, w]`` for ``images [b, 3, H, W]`` (no graph when frozen).

        Raises:
            ValueError: if the encoder has no backbone.
        """
        fn = self.backbone if self.backbone is not None else self._backbone_fn
        if fn is None:
            raise ValueError("this ImageEncoder has no backbone: call it with features=, not images=")
        if self.backbone_trainable:
            return fn(images)
        with torch.no_grad():
            return fn(images)

    def forward(self, images: torch.Tensor | None = None, *, features: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder tokens for images, or for their feature maps.

        Args:
            images (torch.Tensor | None): ``[b, 3, H, W]``, scaled as the backbone expects.
            features (torch.Tensor | None): ``[b, c, h, w]`` feature maps (instead of ``images``).

        Returns:
            torch.Tensor: ``[b, h * w, dim]``.

        Raises:
            ValueError: unless exactly one of ``images`` and ``features`` is given, or if the
                feature maps do not have the adapter's shape.
        """
        if (images is None) == (features is None):
            raise ValueError("give the encoder either images= or features= (one of them)")
        return self.tokens(features if features is not None else self.features(images))

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write the adapter (``image_tokens.json`` and ``image_tokens.safetensors``) to ``directory``.

        The backbone is not written: it comes from its own package or checkpoint. The directory is
        written under a temporary name and renamed into place when complete; an existing one is replaced.

        Returns:
            Path: ``directory``.
        """
        out = Path(directory)
        out.parent.mkdir(parents=True, exist_ok=True)
        with AtomicDirectory(out, force=True) as tmp:
            doc = {"format": FORMAT, **self.tokens.settings()}
            (tmp.tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=1) + "\n")
            state = {k: v.detach().contiguous() for k, v in self.tokens.state_dict().items()}
            save_file(state, str(tmp.tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
            tmp.commit()
        return out

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str],
                        backbone: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        *, backbone_trainable: bool = False) -> "ImageEncoder":
        """An encoder with the adapter that ``save_pretrained`` wrote to ``directory``, after ``backbone``.

        Args:
            directory: a directory written by ``save_pretrained``.
            backbone: as in the class (None: ``features=`` only).
            backbone_trainable (bool): as in the class.

        Returns:
            ImageEncoder: the adapter's tensors loaded exactly.

        Raises:
            CheckpointError: if the directory lacks the files, or they do not describe an adapter.
        """
        return cls(backbone, load_image_tokens(directory), backbone_trainable=backbone_trainable)


def load_image_tokens(directory: str | os.PathLike[str]) -> ImageTokens:
    """The ``ImageTokens`` adapter saved in ``directory`` by ``ImageEncoder.save_pretrained``.

    Raises:
        CheckpointError: if a file is missing or unreadable, or the tensors do not fit the settings.
    """
    root = Path(directory)
    config, weights = root / CONFIG_FILE, root / WEIGHTS_FILE
    for path in (config, weights):
        if not path.is_file():
            raise CheckpointError(f"{root} has no {path.name}: not an image encoder adapter (save_pretrained writes one)")
    try:
        doc = json.loads(config.read_text())
        if doc.get("format") != FORMAT:
            raise CheckpointError(f"{config}: format {doc.get('format')!r} is not {FORMAT!r}")
        tokens = ImageTokens(int(doc["channels"]), int(doc["dim"]), tuple(doc["grid"]), bias=bool(doc.get("bias", True)),
                             init_std=float(doc.get("init_std", 0.02)), standardize=bool(doc.get("standardize", False)))
        state = load_file(str(weights))
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{root}: cannot read the image encoder adapter: {exc}") from exc
    try:
        tokens.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"{weights}: the tensors do not fit {config.name}: {first[-1].strip() if first else exc}") from exc
    return tokens


def _dtype_of(backbone: Any) -> torch.dtype:
    if isinstance(backbone, nn.Module):
        for p in backbone.parameters():
            if p.is_floating_point():
                return p.dtype
    owner = getattr(backbone, "__self__", None)  # a bound method such as model.extract_features
    if isinstance(owner, nn.Module):
        return _dtype_of(owner)
    return torch.get_default_dtype()
