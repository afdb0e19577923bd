"""One factory for the CNN backbones (torchvision's, and any timm model), with a new binary head.

``name``: a key of :data:`HEADS` (torchvision) or ``timm/<timm model name>``.
``weights``: ``none`` (random init), ``imagenet`` (torchvision's weights through its cache,
timm's through the Hugging Face hub cache; offline and not cached is a clear error naming the
file to place), or a path to a ``.pth``/``.safetensors`` state dict or a ``.ckpt`` Lightning
checkpoint. Files are read with ``torch.load(weights_only=True)``, which reads
``.safetensors`` files through safetensors.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

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
#: ``model.backbone`` prefix of the timm models (``model=timm`` writes it from ``model.name``).
TIMM_PREFIX = "timm/"
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
    """A torchvision or timm backbone with its classifier layer replaced by a binary head."""
    imagenet = weights == "imagenet"
    if name.startswith(TIMM_PREFIX):
        backbone = _timm_backbone(name.removeprefix(TIMM_PREFIX), imagenet)
        # What forward returns once the classifier is gone (a pre-logits layer may widen it).
        features = backbone.head_hidden_size
        normalisation = {k: backbone.pretrained_cfg[k] for k in ("mean", "std")}
    else:
        backbone, features = _torchvision_backbone(name, imagenet)
        normalisation = {}
    if weights not in ("none", "imagenet"):
        load_backbone_weights(backbone, weights)
    return CellClassifierNet(backbone, features, dropout, **normalisation)


def _torchvision_backbone(name: str, imagenet: bool) -> tuple[nn.Module, int]:
    """A torchvision model without its classifier layer, and its feature width."""
    if name not in HEADS:
        raise ConfigError(
            f"model.backbone must be one of {sorted(HEADS)} or {TIMM_PREFIX}<timm model name>, "
            f"got {name!r}"
        )
    backbone = models.get_model(name, weights=None)
    if imagenet:
        backbone.load_state_dict(_imagenet_state_dict(name))
    parent_path, _, attr = HEADS[name].rpartition(".")
    parent = backbone.get_submodule(parent_path) if parent_path else backbone
    features = getattr(parent, attr).in_features
    setattr(parent, attr, nn.Identity())
    return backbone, features


def _imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights from its cache (or a download where there is internet)."""
    weights = models.get_model_weights(name).DEFAULT
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as err:
        raise WeightsError(_missing_url_weights(name, weights.url, err)) from None


def _missing_url_weights(name: str, url: str, err: Exception) -> str:
    """The error for weights downloaded from ``url`` into torch's hub cache."""
    file = Path(urlparse(url).path).name
    cache = Path(torch.hub.get_dir()) / "checkpoints" / file
    return (
        f"ImageNet weights for {name} are not cached and cannot be downloaded ({err}); "
        f"place {file} at {cache} or set model.weights=/path/to/file.pth"
    )


def _timm_backbone(name: str, imagenet: bool) -> Any:
    """A timm model with no classifier (``forward`` returns pooled features)."""
    import timm  # a second or more to import: only when a timm model is asked for

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"model.name: timm has no model {name!r}{hint}")
    try:
        return timm.create_model(name, pretrained=imagenet, num_classes=0)
    except (OSError, RuntimeError) as err:
        if not imagenet:
            raise
        raise WeightsError(_missing_timm_weights(name, err)) from None


def _missing_timm_weights(name: str, err: Exception) -> str:
    """The error for timm weights that are neither cached nor downloadable, naming where to put
    them: the Hugging Face hub cache for the hub's weights, torch's hub cache for URL ones."""
    from huggingface_hub import constants
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        return f"timm has no ImageNet weights for {name}: set model.weights=none or a file"
    if not cfg.hf_hub_id:
        return _missing_url_weights(name, cfg.url, err)
    repo = cfg.hf_hub_id
    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return (
        f"ImageNet weights for timm model {name} are not cached and cannot be downloaded "
        f"({reason}); place the hub's copy of {repo} (`hf download {repo} model.safetensors` "
        f"on a machine with internet) at {folder}, or set "
        f"model.weights=/path/to/model.safetensors"
    )


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a state dict or Lightning checkpoint into ``backbone``; every backbone key must fit."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"model.weights: no such file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # .safetensors too
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
