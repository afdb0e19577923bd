"""How fast the training data can be fed: the loader alone, and the batched augmentation.

Kept free of Hydra and MLflow so that the GPU check can import it on a bare machine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from bench.timing import BatchClock, Rate, endless, rate_of
from leukemia_mlops.data.batch_augment import BatchAugment
from leukemia_mlops.data.datamodule import CellDataModule


def loader_rate(loader: DataLoader, clock: BatchClock) -> Rate:
    """Images/s that ``loader`` delivers, over as many epochs as the clock needs."""
    batches = endless(loader)
    return rate_of(lambda: len(next(batches)[0]), clock)


def loader_capacity(
    prepared: Path, batch: int, augment_on: str, workers: int, clock: BatchClock
) -> Rate:
    """The training loader of ``prepared`` alone (shuffled, seeded; augmented per item on
    ``cpu``, or shipping uint8 batches for the ``device``), pinned when a GPU takes them."""
    datamodule = CellDataModule(
        str(prepared),
        batch,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        augment_on=augment_on,
    )
    datamodule.setup("fit")
    return loader_rate(datamodule.train_dataloader(), clock)


def augment_rate(
    size: int, batch: int, device: str, clock: BatchClock, sync: Callable[[], None]
) -> Rate:
    """Images/s of :class:`BatchAugment` on ``device`` over one resident uint8 batch."""
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    images = images.contiguous(memory_format=torch.channels_last)  # as the loader ships them
    seeds, augment = torch.arange(batch), BatchAugment()

    def step() -> int:
        augment(images, seeds)
        sync()
        return batch

    return rate_of(step, clock)
