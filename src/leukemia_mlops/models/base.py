"""What the CNN classifier and the YOLO detector share as Lightning modules."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import nn
from torchmetrics import MeanMetric, MetricCollection

from leukemia_mlops.errors import ConfigError
from leukemia_mlops.models.metrics import ClassificationMetrics

SCHEDULERS = ("cosine", "onecycle", "none")
DEFAULT_OPTIMIZER = {"_target_": "torch.optim.AdamW", "lr": 1e-3}


def checked_optimizer(
    optimizer: dict[str, Any] | None, backbone_lr_ratio: float, scheduler: str
) -> dict[str, Any]:
    """Validate the fine-tuning settings; returns the optimizer mapping to instantiate."""
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"model.scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    if not 0 < backbone_lr_ratio <= 1:
        raise ConfigError(f"model.backbone_lr_ratio must be in (0, 1], got {backbone_lr_ratio}")
    optimizer = dict(optimizer or DEFAULT_OPTIMIZER)
    if float(optimizer.get("lr", 0)) <= 0:
        raise ConfigError(f"model.optimizer.lr must be > 0, got {optimizer.get('lr')}")
    return optimizer


class FineTunedModule(pl.LightningModule):
    """A pretrained ``backbone`` and a new head, with their own learning rates.

    Subclasses set ``self.net`` (with a ``backbone``; the rest is the head) and call
    :meth:`init_metrics`. Hyperparameters hold ``optimizer`` (a ``_target_`` mapping for
    Hydra's ``instantiate``), ``backbone_lr_ratio`` and ``scheduler``.
    """

    net: nn.Module

    def init_metrics(self, train_losses: Iterable[str]) -> None:
        self.train_metrics = ClassificationMetrics("train")
        self.val_metrics = ClassificationMetrics("val")
        self.test_metrics = ClassificationMetrics("test")
        self.train_losses = MetricCollection(
            {name: MeanMetric() for name in train_losses}, prefix="train/", compute_groups=False
        )
        # Lightning's ``sync_dist`` mean truncates the batch sizes summed over unequal DDP
        # shards, so the evaluation losses are metrics too: the mean over every cell once.
        self.eval_losses = nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})

    @property
    def backbone(self) -> nn.Module:
        """The pretrained part, frozen during warm-up (see :class:`BackboneWarmup`)."""
        return self.net.backbone

    def head_parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter of ``net`` outside the backbone."""
        in_backbone = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.net.parameters() if id(p) not in in_backbone]

    def on_validation_epoch_end(self) -> None:
        """Log the finished training epoch's metrics together with validation's.

        Both are then logged before the epoch's checkpoint is written, so a run killed at any
        point and resumed from ``last.ckpt`` neither loses nor repeats an epoch in MLflow.
        """
        if self.trainer.sanity_checking or self.train_losses["loss"].update_count == 0:
            return
        self.log_dict(self.train_losses.compute())
        self.train_losses.reset()
        for collection in self.train_metrics.collections():
            self.log_dict(collection.compute())
            collection.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        settings = dict(self.hparams.optimizer)
        lr = float(settings["lr"])
        groups = [
            {
                "params": list(self.backbone.parameters()),
                "lr": lr * self.hparams.backbone_lr_ratio,
                "name": "backbone",
            },
            {"params": self.head_parameters(), "lr": lr, "name": "head"},
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
