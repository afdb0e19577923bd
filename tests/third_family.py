"""A third model family, defined only in the test tree: a tiny conv net scoring single cells.

Nothing in ``src/`` names it; ``model._target_=third_family.TinyFamily`` picks it for
training, and its checkpoint names it for everything after (see ARCHITECTURE.md, "Where a new
family goes").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import nn

from leukemia_mlops.models.base import FineTunedModule, checked_optimizer


class TinyNet(nn.Module):
    """Float images ``[B, 3, S, S]`` in [0, 1] -> the logit of ALL ``[B]``."""

    def __init__(self, width: int):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, stride=2)
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images)).squeeze(1)


class TinyFamily(FineTunedModule):
    """The third family: a cell classifier (the default ``served_output``), no overrides of
    scoring, serving, export or reports."""

    def __init__(
        self,
        width: int = 4,
        optimizer: dict[str, Any] | None = None,
        backbone_lr_ratio: float = 1.0,
        scheduler: str = "none",
        warmup_epochs: int = 0,
    ):
        super().__init__()
        optimizer = checked_optimizer(optimizer, backbone_lr_ratio, scheduler)
        self.save_hyperparameters()
        self.hparams.optimizer = optimizer
        self.net = TinyNet(width)
        self.loss = nn.BCEWithLogitsLoss()
        self.init_metrics(["loss"])

    @classmethod
    def datamodule_from_config(cls, config: Mapping[str, Any]) -> pl.LightningDataModule:
        datamodule = instantiate(config["datamodule"])
        datamodule.setup("fit")
        return datamodule

    @property
    def architecture(self) -> str:
        return f"tiny{self.hparams.width}"

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        return images.float().div_(255), labels

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        images, labels = batch
        logits = self.net(images)
        loss = self.loss(logits, labels)
        self.train_metrics.update(torch.sigmoid(logits.detach()), labels)
        self.train_losses["loss"].update(loss.detach(), len(labels))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self.net(images)
        self.eval_losses["val"].update(self.loss(logits, labels), len(labels))
        self.log("val/loss", self.eval_losses["val"], on_epoch=True)
        self.val_metrics.update(torch.sigmoid(logits), labels)
        for collection in self.val_metrics.collections():
            self.log_dict(collection, on_epoch=True)
