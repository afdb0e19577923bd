"""Albumentations pipelines for training cells (none at evaluation)."""

from __future__ import annotations

import albumentations as A
import cv2

from leukemia_mlops.errors import ConfigError


def dihedral_flips() -> list[A.BasicTransform]:
    """Flips and 90-degree turns: free for cells, which have no orientation."""
    return [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)]


def jitter(strength: float, rotate: float = 20.0) -> list[A.BasicTransform]:
    """A small affine (scale, shift, rotation up to ``rotate`` degrees) and stain jitter.

    ``strength`` scales every magnitude (0 disables both). Scaling is kept small because
    absolute cell size separates blasts from normal cells.
    """
    if strength < 0:
        raise ConfigError(f"datamodule.augment_strength must be >= 0, got {strength}")
    if strength == 0:
        return []
    return [
        A.Affine(
            scale=(1 - 0.05 * strength, 1 + 0.05 * strength),
            translate_percent=(-0.05 * strength, 0.05 * strength),
            rotate=(-rotate * strength, rotate * strength),
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            p=min(1.0, 0.5 * strength),
        ),
        A.ColorJitter(
            brightness=0.15 * strength,
            contrast=0.15 * strength,
            saturation=0.15 * strength,
            hue=0.03 * strength,
            p=min(1.0, 0.8 * strength),
        ),
    ]


def train_transforms(strength: float = 1.0, flips: bool = True) -> A.Compose:
    """The classifier's training augmentation."""
    return A.Compose([*(dihedral_flips() if flips else []), *jitter(strength)])
