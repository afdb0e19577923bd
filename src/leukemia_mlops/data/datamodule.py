"""LightningDataModule over the ``prepare`` cache (memory-mapped uint8 images)."""

from __future__ import annotations

import os
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from leukemia_mlops.data.augment import train_transforms
from leukemia_mlops.data.prepare import IMAGES_FILE, MANIFEST_FILE
from leukemia_mlops.data.sampling import SeededIndex, SeededSampler, unpadded_shard
from leukemia_mlops.errors import ConfigError, InputError, MissingInputError

BALANCE_MODES = ("none", "sampler", "loss")


class SplitImages:
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


class CellDataset(SplitImages, Dataset):
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
                self.transform.set_random_seed(seed)
            image = self.transform(image=image)["image"]
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return tensor, torch.tensor(self.labels[index], dtype=torch.float32)


class CellDataModule(pl.LightningDataModule):
    """Train/val/test loaders; class imbalance handled by a weighted sampler or the loss.

    The training order and augmentations come from ``seed`` and the epoch alone (see
    :class:`SeededSampler`), so they do not depend on the number of workers or on a resume.
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
    ):
        super().__init__()
        if balance not in BALANCE_MODES:
            raise ConfigError(f"datamodule.balance must be one of {BALANCE_MODES}, got {balance!r}")
        if batch_size < 1:
            raise ConfigError(f"datamodule.batch_size must be >= 1, got {batch_size}")
        if num_workers != "auto" and not (isinstance(num_workers, int) and num_workers >= 0):
            raise ConfigError(f"datamodule.num_workers must be >= 0 or auto, got {num_workers!r}")
        self.prepared_dir = Path(prepared_dir)
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.balance, self.seed = balance, seed
        self.first_epoch = 0  # of the first training loader: past 0 when resumed
        self.transform = train_transforms(augment_strength, flips)
        self.datasets: dict[str, CellDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if not (self.prepared_dir / MANIFEST_FILE).is_file():
            raise MissingInputError(f"no prepared data in {self.prepared_dir}: run `lmo-prepare`")
        for split in ("train", "val", "test"):
            if split not in self.datasets:
                transform = self.transform if split == "train" else None
                self.datasets[split] = CellDataset(self.prepared_dir, split, transform)
        for split in ("train", "val"):
            if len(self.datasets[split]) == 0:
                raise InputError(f"the {split} split is empty: check data.split")

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
        sampler = SeededSampler(len(dataset), self.seed, weights)
        # Lightning calls set_epoch only after a resumed run's first loader has started.
        sampler.set_epoch(self.first_epoch)
        # A last batch of one breaks batch-norm; drop the remainder when there is a full batch.
        drop_last = len(sampler) > self.batch_size
        return self._loader(dataset, sampler=sampler, drop_last=drop_last)

    def state_dict(self) -> dict[str, int]:
        """Saved in checkpoints: the epoch a run resumed from this one starts with."""
        finished = self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        return {"next_epoch": self.trainer.current_epoch + int(finished)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.first_epoch = int(state_dict.get("next_epoch", 0))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.datasets["val"])

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.datasets["test"])

    def _eval_loader(self, dataset: CellDataset) -> DataLoader:
        """Every cell scored exactly once: under DDP the ranks share the split unpadded."""
        return self._loader(dataset, sampler=unpadded_shard(len(dataset)))

    def workers(self) -> int:
        """Loader processes per rank; ``auto``: this node's CPUs shared among its ranks, one
        CPU of each share left to the rank itself."""
        if self.num_workers != "auto":
            return self.num_workers
        ranks = self.trainer.num_devices if self.trainer is not None else 1
        return max(len(os.sched_getaffinity(0)) // ranks - 1, 0)

    def _loader(self, dataset: Dataset, **kwargs) -> DataLoader:
        workers = self.workers()
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=workers > 0,
            **kwargs,
        )
