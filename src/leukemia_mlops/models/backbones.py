"""One factory for the torchvision CNN backbones, with a new binary head.

``weights``: ``none`` (random init), ``imagenet`` (torchvision's weights through its cache;
offline and not cached is a clear error naming the file to place), or a path to a ``.pth``
state dict or a ``.ckpt`` Lightning checkpoint. Files are read with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models

from leukemia_mlops.errors import ConfigError, InputError

#: Backbone name -> the attribute path of torchvision's final classification layer.
HEADS = {
    "resnet18": "fc",
    "resnet50": "fc",
    "densenet121": "classifier",
    "efficientnet_b0": "classifier.1",
    "mobilenet_v3_large": "classifier.3",
    "vgg16": "classifier.6",
}
_PREFIXES = ("net.backbone.", "backbone.", "module.", "model.")


class WeightsError(InputError):
    """Weights that cannot be found or do not fit the backbone."""


class CellClassifierNet(nn.Module):
    """Normalisation, backbone and binary head: ``[B,3,H,W]`` in [0,1] -> ALL logits ``[B]``."""

    def __init__(
        self,
        backbone: nn.Module,
        features: int,
        dropout: float = 0.2,
        mean: tuple[float, ...] = (0.485, 0.456, 0.406),
        std: tuple[float, ...] = (0.229, 0.224, 0.225),
    ):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone((images - self.mean) / self.std)
        return self.head(features).squeeze(1)


def build_classifier(name: str, weights: str = "none", dropout: float = 0.2) -> CellClassifierNet:
    """A torchvision backbone with its classifier layer replaced by a binary head."""
    if name not in HEADS:
        raise ConfigError(f"model.backbone must be one of {sorted(HEADS)}, got {name!r}")
    backbone = models.get_model(name, weights=None)
    if weights == "imagenet":
        backbone.load_state_dict(_imagenet_state_dict(name))
    parent_path, _, attr = HEADS[name].rpartition(".")
    parent = backbone.get_submodule(parent_path) if parent_path else backbone
    features = getattr(parent, attr).in_features
    setattr(parent, attr, nn.Identity())
    if weights not in ("none", "imagenet"):
        load_backbone_weights(backbone, weights)
    return CellClassifierNet(backbone, features, dropout)


def _imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights from its cache (or a download where there is internet)."""
    weights = models.get_model_weights(name).DEFAULT
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as err:
        raise WeightsError(
            f"ImageNet weights for {name} are not cached and cannot be downloaded ({err}); "
            f"place {Path(weights.url).name} at {cache} or set model.weights=/path/to/file.pth"
        ) from None


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a state dict or Lightning checkpoint into ``backbone``; every backbone key must fit."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"model.weights: no such file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and format errors alike
        raise WeightsError(f"model.weights: cannot load {path} safely: {err}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"model.weights: {path} holds no state dict")
    own = backbone.state_dict()
    matched = {}
    for key, value in state.items():
        stripped = next((key[len(p) :] for p in _PREFIXES if key.startswith(p)), key)
        if stripped in own and own[stripped].shape == value.shape:
            matched[stripped] = value
    missing = sorted(set(own) - set(matched))
    if missing:
        raise WeightsError(
            f"model.weights: {path} does not fit this backbone: {len(missing)} of {len(own)} "
            f"tensors missing or of another shape (first: {missing[0]})"
        )
    backbone.load_state_dict(matched)
