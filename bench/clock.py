"""A Lightning callback that feeds a :class:`~bench.timing.BatchClock` (needs no Hydra or MLflow,
so the GPU check can time a fit on a machine that has neither)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl

from bench.timing import BatchClock


class ClockCallback(pl.Callback):
    """Feeds a :class:`BatchClock` from Lightning's hooks and stops the fit when it has enough.

    Forward is timed by hooks on ``module.net`` while it trains (a validation's forward counts
    as *other*); the optimizer phase runs from ``on_before_optimizer_step`` to the end of the
    batch (the step and Lightning's bookkeeping).
    """

    def __init__(self, clock: BatchClock, sync: Callable[[], None] = lambda: None):
        self.clock, self.sync = clock, sync  # sync: waits for a GPU before a batch is counted

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.net.register_forward_pre_hook(self._forward_starts)
        pl_module.net.register_forward_hook(self._forward_ends)
        self.clock.start()

    def _forward_starts(self, net: Any, *_: Any) -> None:
        if net.training:
            self.clock.enter("forward")

    def _forward_ends(self, net: Any, *_: Any) -> None:
        if net.training:
            self.clock.exit("forward")

    def on_before_backward(self, *_: Any) -> None:
        self.clock.enter("backward")

    def on_after_backward(self, *_: Any) -> None:
        self.clock.exit("backward")

    def on_before_optimizer_step(self, *_: Any) -> None:
        self.clock.enter("optimizer")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, _: int
    ) -> None:
        self.sync()
        self.clock.exit("optimizer")
        if self.clock.tick(len(batch[0])):
            trainer.should_stop = True
