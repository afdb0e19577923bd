"""A small fit or validation of the real classifier for ``tests/test_ddp.py``, run as a script.

Lightning's DDP starts ranks 1..N by running the same command line again, so this cannot run
inside pytest. ``fit`` records, at the start and at every epoch end, digests of the parameters and
buffers of every rank (``digests.json``) and saves the final weights (``weights.pt``);
``validate`` writes the validation metrics of a checkpoint (``metrics.json``). Only rank 0
writes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from leukemia_mlops.data.datamodule import CellDataModule
from leukemia_mlops.models.classifier import CellClassifier
from leukemia_mlops.training.callbacks import BackboneWarmup, EpochSeed

SEED = 5


def digests(module: torch.nn.Module) -> dict[str, dict[str, str]]:
    """Name -> sha256 of the exact bytes, of every parameter and of every buffer."""

    def sha(tensor: torch.Tensor) -> str:
        return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()

    return {
        "params": {name: sha(t) for name, t in module.named_parameters()},
        "buffers": {name: sha(t) for name, t in module.named_buffers()},
    }


class ReplicaDigests(pl.Callback):
    """Gathers every rank's :func:`digests` of the network; rank 0 writes them per epoch."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict] = []

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        mine = digests(pl_module.net)
        ranks = [mine]
        if dist.is_initialized():
            ranks = [{} for _ in range(dist.get_world_size())]
            dist.all_gather_object(ranks, mine)
        self.records.append({"when": when, "ranks": ranks})
        if trainer.is_global_zero:
            self.path.write_text(json.dumps(self.records))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, pl_module, "start")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, pl_module, f"epoch {trainer.current_epoch}")


class EvalBatchNorm(pl.Callback):
    """Batch norm from running statistics, so that the per-device batch size does not matter."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_) -> None:
        for module in pl_module.modules():
            if isinstance(module, _BatchNorm):
                module.eval()


def trainer(
    devices: int, epochs: int, callbacks: list[pl.Callback], accelerator: str = "cpu"
) -> pl.Trainer:
    return pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        precision="32-true",
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=("fit", "validate"))
    parser.add_argument("--prepared", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--eval-bn", action="store_true")
    parser.add_argument("--checkpoint")
    parser.add_argument("--accelerator", default="cpu", help="gpu: one rank per GPU (NCCL)")
    args = parser.parse_args()
    datamodule = CellDataModule(args.prepared, args.batch_size, num_workers=0, seed=SEED)
    if args.mode == "validate":
        module = CellClassifier.load_from_checkpoint(
            args.checkpoint, map_location="cpu", weights_only=True
        )
        run = trainer(args.devices, 1, [])
        run.validate(module, datamodule=datamodule, verbose=False)
        if run.is_global_zero:
            metrics = {k: float(v) for k, v in run.callback_metrics.items()}
            (args.out / "metrics.json").write_text(json.dumps(metrics))
        return
    pl.seed_everything(SEED)
    module = CellClassifier(backbone="resnet18", dropout=0.0, channels_last=False)
    callbacks = [
        BackboneWarmup(args.warmup),
        EpochSeed(SEED),
        ReplicaDigests(args.out / "digests.json"),
    ]
    if args.eval_bn:
        callbacks.append(EvalBatchNorm())
    run = trainer(args.devices, args.epochs, callbacks, args.accelerator)
    run.fit(module, datamodule=datamodule)
    if run.is_global_zero:
        torch.save(module.net.state_dict(), args.out / "weights.pt")


if __name__ == "__main__":
    main()
