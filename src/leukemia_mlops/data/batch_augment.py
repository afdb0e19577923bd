"""The classifier's training augmentation applied to whole uint8 batches on the training device.

The same distribution as the per-item albumentations pipeline of :mod:`.augment` (dihedral
flips and turns, a small affine, colour jitter), drawn per item from the sampler's item seeds:
a batch looks the same for the same ``(seed, epoch)`` on any device, number of workers or rank,
and each DDP rank, holding its own items, draws its own stream. Parameters are drawn on the CPU
(a few numbers per item); pixels are only touched on the device: one ``grid_sample`` for all
geometry and a few elementwise passes for the colours. Normalisation stays the network's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from leukemia_mlops.errors import ConfigError

#: ITU-R BT.601 luma weights, as OpenCV's RGB2GRAY (which albumentations' jitter uses).
LUMA = (0.299, 0.587, 0.114)


def _rotation(angle: np.ndarray) -> np.ndarray:
    """``[N, 2, 2]`` rotation matrices for angles in radians."""
    cos, sin = np.cos(angle), np.sin(angle)
    return np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)


def _homogeneous(maps: np.ndarray) -> np.ndarray:
    """``[N, 2, 3]`` affine maps as ``[N, 3, 3]`` matrices, to compose them."""
    bottom = np.broadcast_to([[[0.0, 0.0, 1.0]]], (len(maps), 1, 3))
    return np.concatenate([maps, bottom], 1)


def _luma(images: torch.Tensor) -> torch.Tensor:
    """``[N, 1, H, W]`` grey levels of RGB images."""
    weights = images.new_tensor(LUMA).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``factor * images + (1 - factor) * other`` per item, clipped to the pixel range."""
    return (other + factor * (images - other)).clamp_(0, 1)


def _shift_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of RGB images in ``[0, 1]`` by ``shift`` turns per item."""
    value, _ = images.max(1, keepdim=True)
    delta = value - images.min(1, keepdim=True).values
    red, green, blue = images.unbind(1)
    safe = delta.squeeze(1).clamp_min(1e-8)
    hue = torch.where(
        value.squeeze(1) == red,
        (green - blue) / safe,
        torch.where(value.squeeze(1) == green, 2 + (blue - red) / safe, 4 + (red - green) / safe),
    )
    hue = ((hue / 6 + shift.view(-1, 1, 1)) % 1).unsqueeze(1)
    saturation = delta / value.clamp_min(1e-8)
    # HSV -> RGB: channel n is V - V*S*clip(min(k, 4 - k), 0, 1), k = (n + 6H) mod 6.
    offsets = images.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
    k = (offsets + 6 * hue) % 6
    return value - value * saturation * torch.minimum(k, 4 - k).clamp(0, 1)


@dataclass(frozen=True)
class BatchAugment:
    """Batched twin of :func:`~leukemia_mlops.data.augment.train_transforms` (same arguments).

    The four colour operations run in an order drawn per batch (albumentations draws it per
    item); each item's own factors are drawn as there.
    """

    strength: float = 1.0
    flips: bool = True

    def __post_init__(self) -> None:
        if self.strength < 0:
            raise ConfigError(f"datamodule.augment_strength must be >= 0, got {self.strength}")

    def __call__(self, images: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Augment ``[N, 3, H, W]`` uint8 images (any device, any memory format) into the
        same; ``seeds``: the items' augmentation seeds from the sampler."""
        rng = np.random.default_rng(seeds.tolist())
        params = self.draw(rng, len(images))
        out = images.float().div_(255)
        if params["geometry"] is not None:
            out = self._warp(out, params["geometry"])
        if params["colour"] is not None:
            out = self._jitter(out, params["colour"], params["order"])
        return out.mul_(255).round_().to(torch.uint8)

    def draw(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray | None]:
        """Per-item parameters: ``geometry`` maps output to input coordinates ([N, 2, 3],
        normalised), ``colour`` holds brightness, contrast, saturation, hue shift ([N, 4])."""
        flips = self._dihedral(rng, n) if self.flips else np.tile(np.eye(2), (n, 1, 1))
        geometry = np.concatenate([flips, np.zeros((n, 2, 1))], -1)
        if self.strength > 0:  # output -> after the flips (the affine's inverse) -> input
            geometry = geometry @ _homogeneous(self._affine(rng, n))
        identity = np.allclose(geometry, np.eye(2, 3))
        colour, order = self._colour(rng, n) if self.strength > 0 else (None, None)
        return {"geometry": None if identity else geometry, "colour": colour, "order": order}

    @staticmethod
    def _dihedral(rng: np.random.Generator, n: int) -> np.ndarray:
        """Inverse maps of a horizontal flip, a vertical flip, then 0-3 quarter turns
        (each flip with p=0.5; the turn with p=0.5, its count uniform), as ``[N, 2, 2]``."""
        hflip = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        vflip = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        turns = np.where(rng.random(n) < 0.5, rng.integers(0, 4, n), 0)
        flip = np.zeros((n, 2, 2))
        flip[:, 0, 0], flip[:, 1, 1] = hflip, vflip
        # Forward: turn after flips; inverse: flips (their own inverses) after the turn back.
        turn_back = np.rint(_rotation(-turns * math.pi / 2))
        return flip @ turn_back

    def _affine(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Inverse maps of albumentations' ``Affine`` as configured in :func:`jitter`:
        ``[N, 2, 3]``; identity for the items it skips."""
        s = self.strength
        applied = rng.random(n) < min(1.0, 0.5 * s)
        scale = rng.uniform(1 - 0.05 * s, 1 + 0.05 * s, (n, 2))
        shift = rng.uniform(-0.05 * s, 0.05 * s, (n, 2)) * 2  # fractions of the side -> [-1, 1]
        angle = np.deg2rad(rng.uniform(-20 * s, 20 * s, n))
        # Forward p' = R S p + t; inverse p = S^-1 R^-1 (p' - t).
        linear = (1 / scale)[:, :, None] * _rotation(-angle)
        linear = np.where(applied[:, None, None], linear, np.eye(2))
        offset = np.where(applied[:, None], -(linear @ shift[:, :, None])[..., 0], 0.0)
        return np.concatenate([linear, offset[:, :, None]], -1)

    def _colour(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``[N, 4]`` factors (brightness, contrast, saturation, hue shift; neutral for the
        items skipped) and the order of the four operations."""
        s = self.strength
        applied = rng.random(n) < min(1.0, 0.8 * s)
        factors = rng.uniform(1 - 0.15 * s, 1 + 0.15 * s, (n, 3))
        hue = rng.uniform(-0.03 * s, 0.03 * s, (n, 1))
        colour = np.where(applied[:, None], np.concatenate([factors, hue], 1), [1, 1, 1, 0])
        return colour, rng.permutation(4)

    @staticmethod
    def _warp(images: torch.Tensor, geometry: np.ndarray) -> torch.Tensor:
        """Bilinear resampling through each item's map, zeros outside (a black background)."""
        theta = torch.as_tensor(geometry, dtype=images.dtype, device=images.device)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, "bilinear", "zeros", align_corners=False)

    @staticmethod
    def _jitter(images: torch.Tensor, colour: np.ndarray, order: np.ndarray) -> torch.Tensor:
        """Brightness, contrast, saturation and hue, as torchvision's (and albumentations')."""
        factors = torch.as_tensor(colour, dtype=images.dtype, device=images.device)
        for op in order.tolist():
            factor = factors[:, op].view(-1, 1, 1, 1)
            if op == 0:
                images = images.mul(factor).clamp_(0, 1)
            elif op == 1:
                mean = _luma(images).mean((1, 2, 3), keepdim=True)
                images = _blend(images, mean, factor)
            elif op == 2:
                images = _blend(images, _luma(images), factor)
            else:
                images = _shift_hue(images, factors[:, 3])
        return images
