"""Preemption: on SIGUSR1 or SIGTERM the job saves a resumable checkpoint and exits to be requeued.

SLURM warns a job before its time limit (``#SBATCH --signal=USR1@90``) and sends SIGTERM
when it preempts it; torchrun passes SIGTERM on to its ranks. A signal handler may run in the
middle of a collective, so the handler only notes the signal. At the next training batch's end
every rank learns whether any rank was signalled (one small all-reduce), all save the
checkpoint together (rank 0 writes it, as ``last.ckpt``) and raise :class:`Preempted`: the
command exits with :data:`REQUEUE_EXIT`, and started again with the same config it resumes from
that checkpoint into the same MLflow run (see :mod:`leukemia_mlops.training.run`).
Lightning's own SIGUSR1/SIGTERM handlers (SLURM auto-requeue, which broadcasts from inside the
handler, and its SIGTERM stop, which saves nothing) are replaced while training runs.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import pytorch_lightning as pl

from leukemia_mlops.errors import ProjectError

#: The exit status of a preempted run (EX_TEMPFAIL): the batch script requeues the job on it.
REQUEUE_EXIT = 75
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(ProjectError):
    """The job was asked to stop; its checkpoint is saved and a rerun resumes it."""


@contextmanager
def requeue_on_preemption() -> Iterator[None]:
    """Turn :class:`Preempted` into one ``preempted:`` line and exit status :data:`REQUEUE_EXIT`."""
    try:
        yield
    except Preempted as err:
        print(f"preempted: {err}", file=sys.stderr)
        raise SystemExit(REQUEUE_EXIT) from None


class Preemption(pl.Callback):
    """Saves ``checkpoint`` and stops every rank once any rank received one of :data:`SIGNALS`."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        self.received: int | None = None

    def _note(self, signum: int, _: FrameType | None) -> None:
        self.received = signum

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning registered its handlers (it restores the previous ones at teardown).
        for signum in SIGNALS:
            signal.signal(signum, self._note)

    def on_train_batch_end(self, trainer: pl.Trainer, *_: object) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        trainer.save_checkpoint(self.checkpoint)
        name = signal.Signals(self.received).name if self.received else "another rank's signal"
        raise Preempted(
            f"stopped by {name} at epoch {trainer.current_epoch}, step {trainer.global_step}: "
            f"saved {self.checkpoint}; run the same command again to resume"
        )
