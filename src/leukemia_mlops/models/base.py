"""What the CNN classifier and the YOLO detector share as Lightning modules."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import nn
from torchmetrics import MeanMetric, MetricCollection

from leukemia_mlops.errors import ConfigError
from leukemia_mlops.models.metrics import ClassificationMetrics

SCHEDULERS = ("cosine", "onecycle", "none")
COMPILE_SETTINGS = (False, True, "auto")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEFAULT_OPTIMIZER = {"_target_": "torch.optim.AdamW", "lr": 1e-3}
#: What a family's served network outputs; inference, export, serving and evaluation keep their
#: family-dependent code in registries keyed by it: the logit of ALL per single-cell image
#: ``[B]`` (a cell classifier), or decoded boxes ``[B, N, 5 + C]`` (a detector, whose boxes
#: ``predict`` and the served model write, and whose report adds box mAP on test scenes).
CELL_LOGIT, DETECTIONS = "cell_logit", "detections"
#: The hyperparameter of a checkpoint that names its module class (as Hydra's ``_target_``).
CLASS_KEY = "_target_"


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


def class_path(cls: type) -> str:
    """The importable name of a class, as a ``_target_``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def compiles_on(setting: bool | str, mode: str, device: torch.device) -> bool:
    """Whether ``model.compile`` compiles the network on ``device``; ``auto``: on CUDA only
    (measured in ``bench``: on a 2-core CPU compilation costs minutes and gains nothing)."""
    if setting not in COMPILE_SETTINGS:
        raise ConfigError(f"model.compile must be one of {COMPILE_SETTINGS}, got {setting!r}")
    if mode not in COMPILE_MODES:
        raise ConfigError(f"model.compile_mode must be one of {COMPILE_MODES}, got {mode!r}")
    return setting is True or (setting == "auto" and device.type == "cuda")


class FineTunedModule(pl.LightningModule):
    """A pretrained ``backbone`` and a new head, with their own learning rates.

    Subclasses set ``self.net`` (with a ``backbone``; the rest is the head) and call
    :meth:`init_metrics`. Hyperparameters hold ``optimizer`` (a ``_target_`` mapping for
    Hydra's ``instantiate``), ``backbone_lr_ratio`` and ``scheduler``, and may hold
    ``compile`` (false | true | auto), ``compile_mode`` and ``compile_backend`` (see
    :meth:`configure_model`).
    """

    net: nn.Module
    #: What :meth:`serving_network` outputs: :data:`CELL_LOGIT` or :data:`DETECTIONS`.
    served_output: ClassVar[str] = CELL_LOGIT
    #: How the paired comparison names the pipeline's ``model`` of this family (None: ``model``).
    comparison_name: ClassVar[str | None] = None

    # What a training run needs of a model family, so that ``model._target_`` alone picks it.
    @classmethod
    def datamodule_from_config(cls, config: Mapping[str, Any]) -> pl.LightningDataModule:
        """The data this family trains on, from a resolved run config."""
        raise NotImplementedError

    @classmethod
    def data_arguments(cls, datamodule: pl.LightningDataModule) -> dict[str, Any]:
        """Constructor arguments that come from the data (for example the loss's class weight)."""
        return {}

    @classmethod
    def load_trained(cls, checkpoint: str) -> FineTunedModule:
        """The trained module of a checkpoint, read safely (``weights_only``)."""
        return cls.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)

    @property
    def architecture(self) -> str:
        """The network's name, as the run's ``backbone`` tag."""
        raise NotImplementedError

    def input_size(self, prepared_size: int) -> int:
        """The image side the network takes, given the prepare cache's (the same by default)."""
        return prepared_size

    def serving_network(self) -> nn.Module:
        """The network the MLflow model serves: float images in [0, 1] -> its outputs."""
        return self.net

    def cell_logit_network(self) -> nn.Module:
        """The network evaluation scores single cells with: float images ``[B, 3, S, S]`` in
        [0, 1] -> the logit of ALL ``[B]`` (the served network by default)."""
        return self.serving_network()

    def network_settings(self) -> dict[str, Any]:
        """Plain values that rebuild :attr:`net` (see :meth:`from_network_settings`), as the
        served model's JSON config holds them (every hyperparameter by default)."""
        return dict(self.hparams)

    @classmethod
    def from_network_settings(cls, settings: Mapping[str, Any]) -> FineTunedModule:
        """An untrained module whose ``net`` takes the weights of the one with ``settings``."""
        return cls(**settings)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Name the class in the checkpoint's hyperparameters (``_target_``), so that loading,
        evaluation, serving and export ask it without reading the weights."""
        checkpoint.setdefault("hyper_parameters", {})[CLASS_KEY] = class_path(type(self))

    def validation_overlays(self, datamodule: pl.LightningDataModule) -> list[np.ndarray]:
        """Pictures of the model's predictions on validation data (none by default)."""
        return []

    def init_metrics(self, train_losses: Iterable[str]) -> None:
        self.train_metrics = ClassificationMetrics("train")
        self.val_metrics = ClassificationMetrics("val")
        self.train_losses = MetricCollection(
            {name: MeanMetric() for name in train_losses}, prefix="train/", compute_groups=False
        )
        # Lightning's ``sync_dist`` mean truncates the batch sizes summed over unequal DDP
        # shards, so the evaluation losses are metrics too: the mean over every cell once.
        self.eval_losses = nn.ModuleDict({"val": MeanMetric()})

    def configure_model(self) -> None:
        """Compile ``net`` (inductor unless ``compile_backend`` says otherwise) when ``compile``
        says so, once per module.

        ``nn.Module.compile`` compiles in place: the state-dict keys stay the eager ones (no
        ``_orig_mod.``), so checkpoints load into an uncompiled network, and DDP wraps this
        module as before. Lightning calls this hook on every fit, validate and test; compiled
        code is then reused (dynamo recompiles only when a guard changes, such as train/eval
        mode or the end of the backbone warm-up), never once per epoch.
        """
        if self._trainer is None:  # loaded from a checkpoint for inference: stays eager
            return
        setting = self.hparams.get("compile", False)
        mode = self.hparams.get("compile_mode", "default")
        backend = self.hparams.get("compile_backend", "inductor")  # aot_eager: tests, no codegen
        device = self.trainer.strategy.root_device
        if compiles_on(setting, mode, device) and self.net._compiled_call_impl is None:
            self.net.compile(backend=backend, mode=None if backend != "inductor" else mode)

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
