"""LightningModule fine-tuning a torchvision backbone to tell ALL blasts from normal cells."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import nn

from leukemia_mlops.models.backbones import build_classifier
from leukemia_mlops.training.metrics import ClassificationMetrics

SCHEDULERS = ("cosine", "onecycle", "none")


class CellClassifier(pl.LightningModule):
    """Binary cell classifier; batches are uint8 images, normalised inside the network.

    Hyperparameters are plain values (the optimizer is a ``_target_`` mapping for Hydra's
    ``instantiate``) so that checkpoints load with ``torch.load(weights_only=True)``.
    """

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
    ):
        super().__init__()
        if scheduler not in SCHEDULERS:
            raise ValueError(f"model.scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        if not 0 < backbone_lr_ratio <= 1:
            raise ValueError(f"model.backbone_lr_ratio must be in (0, 1], got {backbone_lr_ratio}")
        optimizer = dict(optimizer or {"_target_": "torch.optim.AdamW", "lr": 1e-3})
        if float(optimizer.get("lr", 0)) <= 0:
            raise ValueError(f"model.optimizer.lr must be > 0, got {optimizer.get('lr')}")
        self.save_hyperparameters()
        self.hparams.optimizer = optimizer
        self.net = build_classifier(backbone, weights, dropout)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.loss = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(float(pos_weight)))
        self.train_metrics = ClassificationMetrics("train")
        self.val_metrics = ClassificationMetrics("val")
        self.test_metrics = ClassificationMetrics("test")
        self.train_loss_sum = torch.zeros(())
        self.train_loss_count = 0

    @property
    def backbone(self) -> nn.Module:
        """The pretrained part, frozen during warm-up (see :class:`BackboneWarmup`)."""
        return self.net.backbone

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
        self.train_loss_sum = self.train_loss_sum.to(loss.device) + loss.detach() * len(batch[1])
        self.train_loss_count += len(batch[1])
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss = self._step(batch, self.val_metrics)
        self.log("val/loss", loss, on_epoch=True, batch_size=len(batch[1]), sync_dist=True)
        for collection in self.val_metrics.collections():
            self.log_dict(collection, on_epoch=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss = self._step(batch, self.test_metrics)
        self.log("test/loss", loss, on_epoch=True, batch_size=len(batch[1]), sync_dist=True)
        for collection in self.test_metrics.collections():
            self.log_dict(collection, on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        """Log the finished training epoch's metrics together with validation's.

        Both are then logged before the epoch's checkpoint is written, so a run killed at any
        point and resumed from ``last.ckpt`` neither loses nor repeats an epoch in MLflow.
        """
        if self.trainer.sanity_checking or self.train_loss_count == 0:
            return
        count = torch.tensor(float(self.train_loss_count), device=self.train_loss_sum.device)
        total = self.trainer.strategy.reduce(self.train_loss_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(count, reduce_op="sum")
        self.log("train/loss", total / count)
        for collection in self.train_metrics.collections():
            self.log_dict(collection.compute())
            collection.reset()
        self.train_loss_sum = torch.zeros((), device=self.train_loss_sum.device)
        self.train_loss_count = 0

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        return torch.sigmoid(self(images).float())

    def configure_optimizers(self) -> dict[str, Any]:
        settings = dict(self.hparams.optimizer)
        lr = float(settings["lr"])
        groups = [
            {
                "params": list(self.net.backbone.parameters()),
                "lr": lr * self.hparams.backbone_lr_ratio,
                "name": "backbone",
            },
            {"params": list(self.net.head.parameters()), "lr": lr, "name": "head"},
        ]
        optimizer = instantiate(settings, _partial_=True)(groups)
        if self.hparams.scheduler == "none":
            return {"optimizer": optimizer}
        if self.hparams.scheduler == "cosine":
            epochs = max(int(self.trainer.max_epochs or 1), 1)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler}}
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in groups],
            total_steps=int(self.trainer.estimated_stepping_batches),
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
