"""LightningDataModule over the ``prepare`` cache (memory-mapped uint8 images)."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from leukemia_mlops.data.augment import train_transforms
from leukemia_mlops.data.batch_augment import BatchAugment
from leukemia_mlops.data.prepare import IMAGES_FILE, MANIFEST_FILE
from leukemia_mlops.data.sampling import SeededIndex, SeededSampler, unpadded_shard
from leukemia_mlops.errors import ConfigError, InputError, MissingInputError

BALANCE_MODES = ("none", "sampler", "loss")
AUGMENT_PLACES = ("cpu", "device")
#: A batch of :class:`CellBatchDataset`: uint8 images, float labels, the items' augmentation seeds.
SeededBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def seed_transform(transform: A.Compose, seed: int) -> None:
    """Seed ``transform`` for one item with one stream that all its steps draw from.

    ``Compose.set_random_seed`` gives each step its own generator seeded alike, so that every
    step draws the same numbers: the flips, the turn and the affine would always coincide.
    """
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


class CachedSplit:
    """The cached images of one split and their manifest rows.

    The cache is memory-mapped lazily, so that each DataLoader worker maps the file itself.
    """

    def __init__(self, prepared_dir: str | Path, split: str):
        self.prepared_dir = Path(prepared_dir)
        manifest = pd.read_parquet(self.prepared_dir / MANIFEST_FILE)
        self.manifest = manifest[manifest["split"] == split]
        self.split = split
        self.rows = self.manifest.index.to_numpy()
        self.labels = self.manifest["label"].to_numpy(np.int64)
        self.subjects = self.manifest["subject"].astype(str).to_numpy()
        self.paths = self.manifest["path"].astype(str).to_numpy()
        self._images: np.ndarray | None = None
        self._check_cache(len(manifest))

    def _check_cache(self, rows: int) -> None:
        """Fail early, in one line, on a cache that does not match its manifest."""
        path = self.prepared_dir / IMAGES_FILE
        try:
            count = len(np.load(path, mmap_mode="r"))
        except (OSError, EOFError, ValueError) as err:
            raise InputError(
                f"{path} is not a readable image cache ({err}): rerun prepare"
            ) from None
        if count != rows:
            raise InputError(f"{path} holds {count} images for {rows} manifest rows: rerun prepare")

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.prepared_dir / IMAGES_FILE, mmap_mode="r")
        return self._images

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, index: int) -> np.ndarray:
        return np.asarray(self.images[self.rows[index]])


class CellDataset(CachedSplit, Dataset):
    """Cells of one split as ``(uint8 CHW tensor, float label)``; normalisation is the model's.

    Items are indices, or ``(index, seed)`` pairs from a :class:`SeededSampler` that seed the
    augmentation of that one item (the same image in the same epoch always looks the same).
    """

    def __init__(self, prepared_dir: str | Path, split: str, transform: A.Compose | None = None):
        super().__init__(prepared_dir, split)
        self.transform = transform

    def __getitem__(self, item: int | SeededIndex) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        image = self.image(index)
        if self.transform is not None:
            if seed is not None:
                seed_transform(self.transform, seed)
            image = self.transform(image=image)["image"]
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return tensor, torch.tensor(self.labels[index], dtype=torch.float32)


class CellBatchDataset(CachedSplit, Dataset):
    """Cells of one split fetched a whole batch at a time, unaugmented (for ``augment_on:
    device``): one gather from the memory-mapped cache, no per-item work.

    Images come as ``[N, 3, H, W]`` uint8 views of the cache's NHWC rows (channels-last
    strides, which the models use anyway); seeds are 0 for items without one.
    """

    def __getitem__(self, item: int | SeededIndex) -> SeededBatch:
        return self.__getitems__([item])

    def __getitems__(self, items: list[int | SeededIndex]) -> SeededBatch:
        pairs = [item if isinstance(item, tuple) else (item, 0) for item in items]
        indices = np.fromiter((index for index, _ in pairs), np.int64, len(pairs))
        images = torch.from_numpy(self.images[self.rows[indices]]).permute(0, 3, 1, 2)
        labels = torch.from_numpy(self.labels[indices].astype(np.float32))
        return images, labels, torch.tensor([seed for _, seed in pairs], dtype=torch.int64)


def whole_batch(batch: SeededBatch) -> SeededBatch:
    """The collate function of :class:`CellBatchDataset`, which collate their batches themselves."""
    return batch


class SeededLoaders:
    """The DataLoaders of a datamodule, whatever its datasets.

    The training order and augmentation seeds come from ``seed`` and the epoch alone (see
    :class:`SeededSampler`), so they do not depend on the number of workers or on a resume;
    evaluation splits are scored once per cell, under DDP too.
    """

    def __init__(
        self,
        batch_size: int,
        num_workers: int | str,
        pin_memory: bool,
        seed: int,
        collate_fn: Callable[[Any], Any] | None = None,
    ):
        if batch_size < 1:
            raise ConfigError(f"datamodule.batch_size must be >= 1, got {batch_size}")
        if num_workers != "auto" and not (isinstance(num_workers, int) and num_workers >= 0):
            raise ConfigError(f"datamodule.num_workers must be >= 0 or auto, got {num_workers!r}")
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.seed, self.collate_fn = seed, collate_fn
        self.first_epoch = 0  # of the first training loader: past 0 when resumed

    def train(
        self, dataset: Dataset, trainer: pl.Trainer | None, weights: np.ndarray | None = None
    ) -> DataLoader:
        """Seeded ``(index, seed)`` items: shuffled, or drawn in proportion to ``weights``."""
        sampler = SeededSampler(len(dataset), self.seed, weights)
        # Lightning calls set_epoch only after a resumed run's first loader has started.
        sampler.set_epoch(self.first_epoch)
        # A last batch of one breaks batch-norm; drop the remainder when there is a full batch.
        drop_last = len(sampler) > self.batch_size
        return self.loader(dataset, trainer, sampler=sampler, drop_last=drop_last)

    def evaluation(self, dataset: Dataset, trainer: pl.Trainer | None) -> DataLoader:
        """Every item exactly once, in order: under DDP the ranks share the split unpadded."""
        return self.loader(dataset, trainer, sampler=unpadded_shard(len(dataset)))

    def state_dict(self, trainer: pl.Trainer) -> dict[str, int]:
        """Saved in checkpoints: the epoch a run resumed from this one starts with."""
        finished = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        return {"next_epoch": trainer.current_epoch + int(finished)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.first_epoch = int(state_dict.get("next_epoch", 0))

    def workers(self, trainer: pl.Trainer | None) -> int:
        """Loader processes per rank; ``auto``: this node's CPUs shared among its ranks, one
        CPU of each share left to the rank itself."""
        if self.num_workers != "auto":
            return self.num_workers
        ranks = trainer.num_devices if trainer is not None else 1
        return max(len(os.sched_getaffinity(0)) // ranks - 1, 0)

    def loader(self, dataset: Dataset, trainer: pl.Trainer | None, **kwargs: Any) -> DataLoader:
        workers = self.workers(trainer)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=workers > 0,
            collate_fn=self.collate_fn,
            **kwargs,
        )


class SeededDataModule(pl.LightningDataModule):
    """A datamodule whose loaders are :class:`SeededLoaders` (``self.loaders``) over its splits
    (``self.datasets``): the resume state of the training order and the validation loader."""

    loaders: SeededLoaders
    datasets: dict[str, Dataset]

    def state_dict(self) -> dict[str, int]:
        return self.loaders.state_dict(self.trainer)

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.loaders.load_state_dict(state_dict)

    def val_dataloader(self) -> DataLoader:
        return self.loaders.evaluation(self.datasets["val"], self.trainer)


class CellDataModule(SeededDataModule):
    """Train/val loaders (:class:`SeededLoaders`); class imbalance handled by a weighted
    sampler or the loss.

    ``augment_on``: ``cpu`` augments each item in the loader workers (albumentations);
    ``device`` ships unaugmented uint8 batches and augments them on the training device
    (:class:`BatchAugment`, the same distribution), which frees the CPUs to feed a GPU.
    """

    def __init__(
        self,
        prepared_dir: str,
        batch_size: int = 32,
        num_workers: int | str = 2,
        pin_memory: bool = False,
        balance: str = "loss",
        augment_strength: float = 1.0,
        flips: bool = True,
        seed: int = 0,
        augment_on: str = "cpu",
    ):
        super().__init__()
        if balance not in BALANCE_MODES:
            raise ConfigError(f"datamodule.balance must be one of {BALANCE_MODES}, got {balance!r}")
        if augment_on not in AUGMENT_PLACES:
            raise ConfigError(
                f"datamodule.augment_on must be one of {AUGMENT_PLACES}, got {augment_on!r}"
            )
        collate = whole_batch if augment_on == "device" else None
        self.loaders = SeededLoaders(batch_size, num_workers, pin_memory, seed, collate)
        self.prepared_dir = Path(prepared_dir)
        self.balance, self.augment_on = balance, augment_on
        self.transform = train_transforms(augment_strength, flips)
        self.batch_augment = BatchAugment(augment_strength, flips)
        self.datasets: dict[str, CellDataset | CellBatchDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if not (self.prepared_dir / MANIFEST_FILE).is_file():
            raise MissingInputError(f"no prepared data in {self.prepared_dir}: run `lmo-prepare`")
        for split in ("train", "val"):
            if split not in self.datasets:
                self.datasets[split] = self._dataset(split)
        for split in ("train", "val"):
            if len(self.datasets[split]) == 0:
                raise InputError(f"the {split} split is empty: check data.split")

    def _dataset(self, split: str) -> CellDataset | CellBatchDataset:
        if self.augment_on == "device":
            return CellBatchDataset(self.prepared_dir, split)
        return CellDataset(self.prepared_dir, split, self.transform if split == "train" else None)

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        """With ``augment_on: device``: move a batch without its seeds, then augment it there
        when training (evaluation batches stay as they are)."""
        if self.augment_on == "cpu":
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        images, labels, seeds = batch
        images, labels = super().transfer_batch_to_device((images, labels), device, dataloader_idx)
        if self.trainer is not None and self.trainer.training:
            images = self.batch_augment(images, seeds)
        return images, labels

    def pos_weight(self) -> float:
        """HEM/ALL count ratio of the training split, for a class-weighted loss."""
        labels = self.datasets["train"].labels
        positives = max(int(labels.sum()), 1)
        return float((len(labels) - positives) / positives)

    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        weights = None
        if self.balance == "sampler":
            counts = np.bincount(dataset.labels, minlength=2).astype(np.float64)
            weights = 1.0 / counts[dataset.labels]
        return self.loaders.train(dataset, self.trainer, weights)
