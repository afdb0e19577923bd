"""Detection data for YOLO: single cells with their segmentation box, and composed scenes.

Every sample is ``(uint8 CHW image, {"boxes": [N, 4] float xyxy pixels, "labels": [N] int64,
"image_label": int64})``; ``image_label`` is the cell's class for single-cell images and -1 for
scenes, so the detector can score single cells with the same classification metrics as the
CNNs. Images are letterboxed to the model's input size, then (for training) augmented.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from leukemia_mlops.data.augment import dihedral_flips, jitter
from leukemia_mlops.data.datamodule import (
    BALANCE_MODES,
    CachedSplit,
    SeededDataModule,
    SeededLoaders,
    seed_transform,
)
from leukemia_mlops.data.identity import read_identity
from leukemia_mlops.data.prepare import IMAGES_FILE, MANIFEST_FILE
from leukemia_mlops.data.sampling import SeededIndex
from leukemia_mlops.data.scenes import SceneSpec, choose_cells, compose_scene, crop_cell
from leukemia_mlops.errors import ConfigError, InputError, MissingInputError

Target = dict[str, torch.Tensor]
Sample = tuple[torch.Tensor, Target]
SCENE = -1  # image_label of a scene: it holds cells of both classes
BOX_COLUMNS = ["box_x0", "box_y0", "box_x1", "box_y1"]

log = logging.getLogger(__name__)


def cache_boxes(manifest: pd.DataFrame, size: int, window: int) -> np.ndarray:
    """Manifest cell boxes (original pixels) in the frame of the ``size`` px cache images.

    Mirrors ``to_training_image`` with ``fit="window"``: ``center_window`` shifts each axis by
    half the difference to ``window`` (cropping or padding), then one resize scales by
    ``size / window``.
    """
    boxes = manifest[BOX_COLUMNS].to_numpy(np.float64)
    extent = manifest[["width", "height"]].to_numpy(np.int64)
    crop = (extent - window) // 2  # start of the crop along x, y where the image is larger
    pad = (window - extent) // 2  # start of the pasted image where it is smaller
    offset = np.where(extent >= window, -crop, pad)
    shifted = boxes + np.tile(offset, 2)
    return (np.clip(shifted, 0, window) * (size / window)).astype(np.float32)


def letterbox(img_size: int) -> list[A.BasicTransform]:
    """Scale the longest side to ``img_size`` and pad the other centred with black."""
    return [
        A.LongestMaxSize(max_size=img_size, area_for_downscale="image"),
        A.PadIfNeeded(img_size, img_size, position="center", border_mode=cv2.BORDER_CONSTANT),
    ]


def detection_transforms(img_size: int, strength: float = 0.0, flips: bool = False) -> A.Compose:
    """Letterbox, then (for training) flips, 90-degree turns, a small scale/shift and stain jitter.

    Unlike the CNN pipeline there is no free rotation: the box of a rotated cell is the box of
    its rotated box, visibly larger than the cell.
    """
    steps = letterbox(img_size)
    if flips:
        steps += dihedral_flips()
    steps += jitter(strength, rotate=0.0)
    bbox_params = A.BboxParams(
        format="pascal_voc", label_fields=["labels"], min_visibility=0.3, clip=True
    )
    return A.Compose(steps, bbox_params=bbox_params)


def make_sample(
    transform: A.Compose,
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    image_label: int,
    seed: int | None = None,
) -> Sample:
    """Apply ``transform`` (seeded with ``seed`` if given) to an image and its boxes; boxes
    pushed out of view are dropped."""
    if seed is not None:
        seed_transform(transform, seed)
    out = transform(
        image=image,
        bboxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        labels=np.asarray(labels, np.int64),
    )
    tensor = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1)))
    target = {
        "boxes": torch.as_tensor(np.asarray(out["bboxes"], np.float32).reshape(-1, 4)),
        "labels": torch.as_tensor(np.asarray(out["labels"], np.int64).reshape(-1)),
        "image_label": torch.tensor(image_label, dtype=torch.int64),
    }
    return tensor, target


def collate(batch: list[Sample]) -> tuple[torch.Tensor, list[Target]]:
    """``(uint8 images [B, 3, H, W], targets)``: boxes vary in number, so targets stay a list."""
    images, targets = zip(*batch, strict=True)
    return torch.stack(images), list(targets)


class CachedBoxedSplit(CachedSplit):
    """The cached cells of one split, with their manifest boxes in the cache frame."""

    def __init__(self, prepared_dir: Path, split: str, window: int):
        super().__init__(prepared_dir, split)
        size = np.load(self.prepared_dir / IMAGES_FILE, mmap_mode="r").shape[1]
        self.boxes = cache_boxes(self.manifest, size, window)


class CellBoxDataset(Dataset):
    """Single cells: the image, its one box and its label (also the image label)."""

    def __init__(self, source: CachedBoxedSplit, transform: A.Compose):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: int | SeededIndex) -> Sample:
        index, seed = item if isinstance(item, tuple) else (item, None)
        label = int(self.source.labels[index])
        image, box = self.source.image(index), self.source.boxes[index]
        return make_sample(self.transform, image, box, [label], label, seed)


class SceneDataset(Dataset):
    """``length`` scenes composed from the cells of one source (hence one split).

    With a ``seed`` scene ``i`` is always the same (validation); training items come with
    their own seed (see :class:`SeededSampler`), a new scene every epoch.
    """

    def __init__(
        self,
        source: CachedBoxedSplit,
        length: int,
        spec: SceneSpec,
        transform: A.Compose,
        seed: int | None = None,
    ):
        self.source, self.length, self.spec = source, length, spec
        self.transform, self.seed = transform, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item: int | SeededIndex) -> Sample:
        if isinstance(item, tuple):
            seed = item[1]
            rng = np.random.default_rng(seed)
        elif self.seed is not None:
            seed = None
            rng = np.random.default_rng([self.seed, item])
        else:
            raise ValueError("a scene without its own seed needs one from a SeededSampler")
        cells = [
            crop_cell(self.source.image(i), self.source.labels[i], self.source.split)
            for i in choose_cells(len(self.source), rng, self.spec)
        ]
        scene = compose_scene(cells, rng, self.spec)
        return make_sample(self.transform, scene.image, scene.boxes, scene.labels, SCENE, seed)


class ConcatItems(ConcatDataset):
    """A ``ConcatDataset`` that also takes ``(index, seed)`` items, passing the seed on."""

    def __getitem__(self, item: int | SeededIndex) -> Any:
        if not isinstance(item, tuple):
            return super().__getitem__(item)
        index, seed = item
        which = bisect.bisect_right(self.cumulative_sizes, index)
        start = self.cumulative_sizes[which - 1] if which else 0
        return self.datasets[which][(index - start, seed)]


class DetectionDataModule(SeededDataModule):
    """Train: composed scenes plus every single cell; val: single cells plus fixed scenes
    (for mAP). The loaders are the CNN's (:class:`SeededLoaders`).

    ``seed`` gives the training order, each epoch's scenes and their augmentation, and the
    fixed validation scenes. ``balance``: ``none`` shuffles; ``sampler`` draws single cells
    class-balanced (scenes mix both classes and keep their share); ``loss`` trains unweighted,
    with a warning, as the YOLO loss has no class weights. Boxes are augmented with their
    image, on the CPU: ``augment_on`` must be ``cpu``.
    """

    def __init__(
        self,
        prepared_dir: str,
        img_size: int = 128,
        window: int = 450,
        batch_size: int = 32,
        num_workers: int | str = 2,
        pin_memory: bool = False,
        augment_strength: float = 1.0,
        flips: bool = True,
        train_scenes: int = 256,
        val_scenes: int = 32,
        min_cells: int = 4,
        max_cells: int = 9,
        spacing: float = 0.25,
        noise: int = 4,
        seed: int = 0,
        balance: str = "loss",
        augment_on: str = "cpu",
    ):
        super().__init__()
        if train_scenes < 0 or val_scenes < 0:
            raise ConfigError(
                f"model.scenes train_scenes and val_scenes must be >= 0, "
                f"got {train_scenes}, {val_scenes}"
            )
        if balance not in BALANCE_MODES:
            raise ConfigError(f"datamodule.balance must be one of {BALANCE_MODES}, got {balance!r}")
        if augment_on != "cpu":
            raise ConfigError(
                f"datamodule.augment_on must be cpu for the YOLO detector (its boxes are "
                f"augmented with the image in the loader workers), got {augment_on!r}"
            )
        if balance == "loss":
            log.warning(
                "datamodule.balance=loss: the YOLO loss has no class weights, "
                "the detector trains unweighted"
            )
        self.loaders = SeededLoaders(batch_size, num_workers, pin_memory, seed, collate)
        self.prepared_dir = Path(prepared_dir)
        self.window, self.seed, self.balance = window, seed, balance
        self.transform = detection_transforms(img_size, augment_strength, flips)
        self.eval_transform = detection_transforms(img_size)
        self.spec = SceneSpec(min_cells, max_cells, spacing, noise)
        self.scene_counts = {"train": train_scenes, "val": val_scenes}
        self.datasets: dict[str, Dataset] = {}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DetectionDataModule:
        """From a resolved run config (``datamodule`` loader settings, ``model.img_size``,
        ``model.scenes``) and the cache's window (only ``fit=window`` caches map boxes)."""
        loader = config["datamodule"]
        identity = read_identity(loader["prepared_dir"])
        if identity.fit != "window":
            raise ConfigError("YOLO training needs data.prepare.fit=window (cells at true scale)")
        keys = (
            "batch_size",
            "num_workers",
            "pin_memory",
            "augment_strength",
            "flips",
            "seed",
            "balance",
            "augment_on",
        )
        return cls(
            loader["prepared_dir"],
            img_size=config["model"]["img_size"],
            window=identity.window,
            **{key: loader[key] for key in keys},
            **config["model"]["scenes"],
        )

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if not (self.prepared_dir / MANIFEST_FILE).is_file():
            raise MissingInputError(f"no prepared data in {self.prepared_dir}: run `lmo-prepare`")
        sources = {s: CachedBoxedSplit(self.prepared_dir, s, self.window) for s in ("train", "val")}
        for split in ("train", "val"):
            if len(sources[split]) == 0:
                raise InputError(f"the {split} split is empty: check data.split")
        self.val_scenes = SceneDataset(
            sources["val"], self.scene_counts["val"], self.spec, self.eval_transform, self.seed
        )
        train_scenes = SceneDataset(
            sources["train"], self.scene_counts["train"], self.spec, self.transform
        )
        self.datasets = {
            "train": ConcatItems([train_scenes, CellBoxDataset(sources["train"], self.transform)]),
            "val": ConcatDataset(
                [CellBoxDataset(sources["val"], self.eval_transform), self.val_scenes]
            ),
        }

    def overlay_batch(self, count: int) -> tuple[torch.Tensor, list[Target]]:
        """The first ``count`` validation scenes (cells without scenes), to draw predictions on."""
        self.setup()
        dataset = self.val_scenes if len(self.val_scenes) else self.datasets["val"]
        return collate([dataset[i] for i in range(min(count, len(dataset)))])

    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        weights = None
        if self.balance == "sampler":
            scenes, cells = dataset.datasets
            labels = cells.source.labels
            counts = np.bincount(labels, minlength=2).astype(np.float64)
            # Each class's cells weigh half the cells' share; every scene weighs one.
            cell_weights = len(labels) / (2 * counts[labels])
            weights = np.concatenate([np.ones(len(scenes)), cell_weights])
        return self.loaders.train(dataset, self.trainer, weights)
