"""Grad-CAM (Selvaraju et al., 2017): which part of a cell drove the classifier's ALL call.

A reviewer should see the network looking at the nucleus, not at the black background or the
image border; the gallery of right and wrong test cells makes that checkable at a glance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from torch import nn

from leukemia_mlops.errors import ConfigError
from leukemia_mlops.evaluation.plots import image_grid
from leukemia_mlops.inference.scorers import TorchScorer


def last_conv_block(backbone: nn.Module) -> nn.Module:
    """The backbone's last top-level block holding a convolution.

    That is ``layer4`` of the ResNets and ``features`` of DenseNet, EfficientNet, MobileNet
    and VGG: the last spatial feature maps before global pooling.
    """
    blocks = [m for m in backbone.children() if any(isinstance(x, nn.Conv2d) for x in m.modules())]
    if not blocks:
        raise ConfigError(f"{type(backbone).__name__} has no convolutional block for Grad-CAM")
    return blocks[-1]


def gradcam(
    net: nn.Module, images: torch.Tensor, classes: torch.Tensor | None = None
) -> torch.Tensor:
    """Heat maps ``[B, H, W]`` in [0, 1] of the evidence for each image's class.

    ``net`` is a ``CellClassifierNet`` (one ALL logit per image) in eval mode and ``images``
    its float input ``[B, 3, H, W]``. ``classes`` (1 ALL, 0 HEM; default all ALL) picks the
    class per image: the HEM score is the negated ALL logit.
    """
    signs = 1.0 if classes is None else 2.0 * classes.to(images.device, torch.float32) - 1
    captured: list[torch.Tensor] = []
    hook = last_conv_block(net.backbone).register_forward_hook(
        lambda _module, _inputs, output: captured.append(output)
    )
    try:
        with torch.enable_grad():
            logits = net(images.detach().requires_grad_(True))
            (grads,) = torch.autograd.grad((logits * signs).sum(), captured[0])
    finally:
        hook.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * captured[0].detach()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """A uint8 RGB image blended with its heat map (jet colours), as floats in [0, 1]."""
    heat = colormaps["jet"](cam)[..., :3]
    return np.clip((1 - alpha) * image / 255.0 + alpha * heat, 0, 1)


def gradcam_gallery(
    scorer: TorchScorer,
    images: np.ndarray,
    classes: np.ndarray,
    titles: list[str],
    path: str | Path,
) -> Path:
    """Draw each uint8 image ``[B, S, S, 3]`` under its Grad-CAM for its class in ``classes``."""
    targets = torch.from_numpy(np.asarray(classes))
    cams = gradcam(scorer.net, scorer.tensor(images), targets).cpu().numpy()
    return image_grid([overlay(i, c) for i, c in zip(images, cams, strict=True)], titles, path)
