"""A callback that a job's ranks load through ``callbacks.extra`` to show what each rank did.

Every rank writes ``rank<R>.json`` under ``out``: the digests of its final parameters (replicas
must be bit-identical) and the validation cells its loader gave it in each epoch (every cell
once over all ranks). After each training epoch it writes ``epoch<E>.rank<R>`` (holding its
process id), the event tests wait for; rank ``hold_rank`` then waits there from epoch
``hold_epoch`` on until the test writes ``release`` (or ends it), and rank ``fail_rank`` raises
a planted error there, as a rank with a bug would. The checkpoint callback runs after it: a held
epoch's checkpoint is not saved yet.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytorch_lightning as pl

#: The error a ``fail_rank`` raises: a RuntimeError, like gloo's when a peer is gone.
PLANTED = "planted failure"


class RankProbe(pl.Callback):
    def __init__(
        self,
        out: str,
        hold_rank: int | None = None,
        hold_epoch: int = 0,
        fail_rank: int | None = None,
    ) -> None:
        self.out = Path(out)
        self.hold_rank, self.hold_epoch, self.fail_rank = hold_rank, hold_epoch, fail_rank
        self.validation: list[list[int]] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validation.append([int(i) for i in trainer.val_dataloaders.sampler])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        event = self.out / f"epoch{trainer.current_epoch}.rank{trainer.global_rank}"
        event.write_text(str(os.getpid()))
        if trainer.global_rank == self.fail_rank and trainer.current_epoch >= self.hold_epoch:
            raise RuntimeError(PLANTED)
        release = self.out / "release"
        held = trainer.global_rank == self.hold_rank and trainer.current_epoch >= self.hold_epoch
        while held and not release.exists():
            time.sleep(0.2)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = {
            name: hashlib.sha256(p.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
            for name, p in pl_module.named_parameters()
        }
        record = {"params": params, "validation": self.validation}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
