"""Augmentation on the training device (``datamodule.augment_on=device``) against the CPU path."""

from collections import Counter

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from quiet_trainer import quiet_trainer

from leukemia_mlops.data.augment import train_transforms
from leukemia_mlops.data.batch_augment import BatchAugment
from leukemia_mlops.data.datamodule import CellBatchDataset, CellDataModule, seed_transform
from leukemia_mlops.data.sampling import SeededSampler
from leukemia_mlops.errors import ConfigError
from leukemia_mlops.models.classifier import CellClassifier

ITEMS = 2400  # copies of one cell: shares below vary by ~0.01 between seed ranges


def cell_image(size: int = 32) -> np.ndarray:
    """A textured disc off the centre with one bright corner mark: every turn looks different."""
    rng = np.random.default_rng(0)
    image = np.zeros((size, size, 3), np.uint8)
    y, x = np.mgrid[:size, :size]
    disc = (y - 0.4 * size) ** 2 + (x - 0.55 * size) ** 2 < (0.3 * size) ** 2
    image[disc] = rng.integers(60, 160, (disc.sum(), 3))  # below the mark's red after jitter
    image[2:6, size - 6 : size - 2] = (250, 60, 30)
    return image


def cpu_path(image: np.ndarray, strength: float) -> torch.Tensor:
    """``ITEMS`` draws of the loader workers' augmentation, seeded 0, 1, ... as one epoch's."""
    transform, out = train_transforms(strength), []
    for seed in range(ITEMS):
        seed_transform(transform, seed)
        out.append(transform(image=image)["image"])
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def device_path(image: np.ndarray, strength: float) -> torch.Tensor:
    batch = torch.from_numpy(np.repeat(image[None], ITEMS, 0)).permute(0, 3, 1, 2)
    return BatchAugment(strength)(batch, torch.arange(ITEMS))


def orientation_frequencies(images: torch.Tensor, image: np.ndarray) -> list[float]:
    """Share of each of the 8 flips/turns of ``image`` among ``images`` (all must be one)."""
    base = torch.from_numpy(image).permute(2, 0, 1)
    variants = [torch.rot90(base, k, (1, 2)).flip(-1) if f else torch.rot90(base, k, (1, 2))
                for k in range(4) for f in (False, True)]  # fmt: skip
    counts = Counter(next(i for i, v in enumerate(variants) if torch.equal(x, v)) for x in images)
    return [counts[i] / len(images) for i in range(8)]


def test_flips_and_turns_follow_the_cpu_distribution():
    image = cell_image()
    cpu = orientation_frequencies(cpu_path(image, 0.0), image)
    device = orientation_frequencies(device_path(image, 0.0), image)
    # Flips p=0.5 each, a turn p=0.5: four orientations at 11/64 each, four at 5/64.
    assert sorted(cpu) == pytest.approx([5 / 64] * 4 + [11 / 64] * 4, abs=0.035)
    assert device == pytest.approx(cpu, abs=0.035)


def summary(images: torch.Tensor) -> tuple[dict[str, float], dict[str, float]]:
    """Levels that the jitter and the affine move (the disc's area), and shares of items
    by where the corner mark lands, as two mappings."""
    x = images.float()
    mark = (x[:, 0] > 200) & (x[:, 2] < 90)  # the red corner mark, where it survives
    half = x.shape[2] // 2
    levels = {
        "mean": x.mean().item(),
        "std": x.std().item(),
        "image_mean_spread": x.mean((1, 2, 3)).std().item(),
        "red_over_blue": (x[:, 0].mean() / x[:, 2].mean()).item(),
    }
    area = (x.amax(1) > 10).float().mean((1, 2))
    levels |= {"area": area.mean().item(), "area_spread": area.std().item()}
    shares = {
        "mark_top": mark[:, :half].flatten(1).any(1).float().mean().item(),
        "mark_left": mark[..., :half].flatten(1).any(1).float().mean().item(),
        "mark_on_edge": mark[..., 0].any(1).float().mean().item(),
    }
    return levels, shares


def test_the_full_augmentation_matches_the_cpu_statistics():
    image = cell_image()
    (cpu_levels, cpu_shares), (levels, shares) = (
        summary(cpu_path(image, 1.0)),
        summary(device_path(image, 1.0)),
    )
    assert levels == pytest.approx(cpu_levels, rel=0.05)
    assert shares == pytest.approx(cpu_shares, abs=0.05)


def test_same_seeds_same_batch_and_other_epochs_or_ranks_differ(tiny_prepared):
    dataset = CellBatchDataset(tiny_prepared, "train")
    augment = BatchAugment()

    def batch(epoch: int, rank: int = 0) -> torch.Tensor:
        sampler = SeededSampler(len(dataset), seed=7, num_replicas=2, rank=rank)
        sampler.set_epoch(epoch)
        images, _, seeds = dataset.__getitems__(list(sampler)[:8])
        return augment(images, seeds)

    assert torch.equal(batch(0), batch(0))
    assert not torch.equal(batch(0), batch(1))
    assert not torch.equal(batch(0, rank=0), batch(0, rank=1))


def test_batches_ship_the_cached_uint8_images(tiny_prepared):
    datamodule = CellDataModule(str(tiny_prepared), 8, num_workers=0, augment_on="device")
    datamodule.setup("fit")
    images, labels, seeds = next(iter(datamodule.val_dataloader()))
    plain = CellDataModule(str(tiny_prepared), 8, num_workers=0)
    plain.setup("fit")
    expected_images, expected_labels = next(iter(plain.val_dataloader()))
    assert images.dtype == torch.uint8 and torch.equal(images, expected_images)
    assert torch.equal(labels, expected_labels) and seeds.tolist() == [0] * 8
    with pytest.raises(ConfigError, match="augment_on"):
        CellDataModule(str(tiny_prepared), augment_on="gpu")


class Batches(pl.Callback):
    """Keeps the first batch each stage's step receives (after the transfer hooks)."""

    def __init__(self):
        self.seen: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.setdefault("train", batch[0].clone())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.seen.setdefault("val", batch[0].clone())


def test_training_augments_train_batches_on_the_device_and_not_val(tiny_prepared):
    datamodule = CellDataModule(str(tiny_prepared), 8, num_workers=0, seed=5, augment_on="device")
    batches = Batches()
    trainer = quiet_trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[batches],
    )
    trainer.fit(CellClassifier(warmup_epochs=0), datamodule=datamodule)

    dataset = datamodule.datasets["train"]
    sampler = SeededSampler(len(dataset), seed=5)
    sampler.set_epoch(0)
    raw, _, seeds = dataset.__getitems__(list(sampler)[:8])
    expected = BatchAugment()(raw, seeds).float().div(255)
    torch.testing.assert_close(batches.seen["train"], expected, rtol=0, atol=0)
    val_raw = datamodule.datasets["val"].__getitems__(list(range(8)))[0]
    torch.testing.assert_close(batches.seen["val"], val_raw.float().div(255), rtol=0, atol=0)
