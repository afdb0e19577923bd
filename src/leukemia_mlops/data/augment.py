"""Albumentations pipelines for training cells (none at evaluation)."""

from __future__ import annotations

import albumentations as A


def train_transforms(strength: float = 1.0, flips: bool = True) -> A.Compose:
    """Geometric and stain augmentation; ``strength`` scales the affine and colour jitter.

    Cells have no orientation, so flips and 90-degree rotations are free. Scaling is kept
    small because absolute cell size separates blasts from normal cells.
    """
    if strength < 0:
        raise ValueError(f"datamodule.augment.strength must be >= 0, got {strength}")
    steps: list[A.BasicTransform] = []
    if flips:
        steps += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)]
    if strength > 0:
        steps += [
            A.Affine(
                scale=(1 - 0.05 * strength, 1 + 0.05 * strength),
                translate_percent=(-0.05 * strength, 0.05 * strength),
                rotate=(-20 * strength, 20 * strength),
                border_mode=0,
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
    return A.Compose(steps)
