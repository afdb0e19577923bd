"""LightningModule fine-tuning a torchvision backbone to tell ALL blasts from normal cells."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import nn

from leukemia_mlops.models.backbones import build_classifier
from leukemia_mlops.models.base import FineTunedModule, checked_optimizer
from leukemia_mlops.models.metrics import ClassificationMetrics


class CellClassifier(FineTunedModule):
    """Binary cell classifier; batches are uint8 images, normalised inside the network.

    Hyperparameters are plain values (the optimizer is a ``_target_`` mapping for Hydra's
    ``instantiate``) so that checkpoints load with ``torch.load(weights_only=True)``.
    """

    comparison_name = "CNN"

    def __init__(
        self,
        backbone: str = "resnet18",
        weights: str = "none",
        dropout: float = 0.2,
        optimizer: dict[str, Any] | None = None,
        backbone_lr_ratio: float = 0.1,
        scheduler: str = "cosine",
        warmup_epochs: int = 1,
        channels_last: bool = True,
        pos_weight: float = 1.0,
        compile: bool | str = False,
        compile_mode: str = "default",
        compile_backend: str = "inductor",
    ):
        super().__init__()
        optimizer = checked_optimizer(optimizer, backbone_lr_ratio, scheduler)
        self.save_hyperparameters()
        self.hparams.optimizer = optimizer
        self.net = build_classifier(backbone, weights, dropout)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.loss = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(float(pos_weight)))
        self.init_metrics(["loss"])

    @classmethod
    def datamodule_from_config(cls, config: Mapping[str, Any]) -> pl.LightningDataModule:
        datamodule = instantiate(config["datamodule"])
        datamodule.setup("fit")
        return datamodule

    @classmethod
    def data_arguments(cls, datamodule: pl.LightningDataModule) -> dict[str, Any]:
        return {"pos_weight": datamodule.pos_weight() if datamodule.balance == "loss" else 1.0}

    @property
    def architecture(self) -> str:
        return self.hparams.backbone

    def network_settings(self) -> dict[str, Any]:
        return {"backbone": self.hparams.backbone}

    @classmethod
    def from_network_settings(cls, settings: Mapping[str, Any]) -> CellClassifier:
        return cls(**settings, channels_last=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        images = images.float().div_(255)
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels

    def _step(
        self, batch: tuple[torch.Tensor, torch.Tensor], metrics: ClassificationMetrics
    ) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = self.loss(logits.float(), labels)
        metrics.update(torch.sigmoid(logits.detach().float()), labels)
        return loss

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        loss = self._step(batch, self.train_metrics)
        self.train_losses["loss"].update(loss.detach(), len(batch[1]))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    def _evaluate(
        self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metrics: ClassificationMetrics
    ) -> None:
        loss = self._step(batch, metrics)
        self.eval_losses[stage].update(loss, len(batch[1]))
        self.log(f"{stage}/loss", self.eval_losses[stage], on_epoch=True)
        for collection in metrics.collections():
            self.log_dict(collection, on_epoch=True)
