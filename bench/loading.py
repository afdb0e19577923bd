"""The training data path (prepare cache + albumentations) vs torchvision ImageFolder over BMPs.

The loader must outrun training by a wide margin: on a small CPU its workers take cores from
the training step, so a loader only just faster than training would still slow it down.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from hydra.utils import instantiate
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from bench.feed import loader_rate
from bench.loops import project_rate
from bench.report import Section, verdict
from bench.timing import BatchClock
from bench.workspace import Workspace
from leukemia_mlops.data.naming import LABEL_NAMES
from leukemia_mlops.data.prepare import MANIFEST_FILE

TITLE = "Data loading: prepare cache vs ImageFolder, and vs training"
TRAINING_TARGET = 3.0


def image_folder(prepared: Path, raw: Path, root: Path) -> Path:
    """ImageFolder's layout (``root/<class>/<file>``) as links to the training split's BMPs."""
    manifest = pd.read_parquet(prepared / MANIFEST_FILE)
    for row in manifest[manifest["split"] == "train"].itertuples():
        link = root / LABEL_NAMES[row.label] / Path(row.path).name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(raw / row.path)
    return root


def torchvision_transforms(window: int, size: int) -> v2.Compose:
    """The cache path's steps in torchvision: crop, resize, flips, affine, colour jitter."""
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.CenterCrop(window),
            v2.Resize((size, size), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomApply(
                [v2.RandomAffine(degrees=20, translate=(0.05, 0.05), scale=(0.95, 1.05))], p=0.5
            ),
            v2.RandomApply([v2.ColorJitter(0.15, 0.15, 0.15, 0.03)], p=0.8),
        ]
    )


def clock(ws: Workspace) -> BatchClock:
    return BatchClock(ws.sizes.warmup, ws.sizes.budget_s)


def run(ws: Workspace) -> Section:
    size = ws.image_size
    prepared = ws.prepared(ws.train_spec, size)
    cfg = ws.config(prepared, size)
    datamodule = instantiate(cfg.datamodule)
    datamodule.setup("fit")
    cache = loader_rate(datamodule.train_dataloader(), clock(ws))
    folder = datasets.ImageFolder(
        image_folder(prepared, ws.raw(ws.train_spec), ws.root / "imagefolder"),
        torchvision_transforms(int(cfg.data.prepare.window), size),
    )
    workers, batch = int(cfg.datamodule.num_workers), int(cfg.datamodule.batch_size)
    loader = DataLoader(
        folder, batch, shuffle=True, num_workers=workers, persistent_workers=workers > 0
    )
    bmp = loader_rate(loader, clock(ws))
    training = project_rate(ws, "resnet18", size).per_s
    rows = [
        [
            "CellDataModule (cache + albumentations)",
            cache.per_s,
            cache.per_s / bmp.per_s,
            cache.per_s / training,
        ],
        ["ImageFolder over BMPs (decode every epoch)", bmp.per_s, 1.0, bmp.per_s / training],
        ["resnet18 training (project path)", training, "", 1.0],
    ]
    return Section(
        TITLE,
        f"Images/s delivered by each loader alone ({workers} workers, batch {batch}, "
        f"{size} px, shuffled, augmentation on), timed after warm-up over as many epochs as "
        "the clock needs, against resnet18's training images/s (the project's Lightning path, "
        "from the training benchmark). ImageFolder reads the same training images as BMP "
        "links and applies the torchvision equivalents (no 90-degree turns).",
        ["data path", "img/s", "vs ImageFolder", "vs resnet18 training"],
        rows,
        [
            verdict("cache loader vs resnet18 training", cache.per_s / training, TRAINING_TARGET),
            f"cache loader vs ImageFolder: {cache.per_s / bmp.per_s:.1f}x (no target).",
        ],
        {"cache": cache.as_dict(), "imagefolder": bmp.as_dict(), "training_per_s": training},
    )
