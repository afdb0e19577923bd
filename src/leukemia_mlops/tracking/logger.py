"""Lightning's MLflow logger, made safe to resume into the same run."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities import rank_zero_only

#: Where Lightning's rank-zero notices go (the second name: Lightning Fabric's, when it wins).
LIGHTNING_NOTICES = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
)


def _not_a_tip(record: logging.LogRecord) -> bool:
    """Drop Lightning's "💡 Tip" advertisements (litlogger, litmodels): runs log to MLflow."""
    return not str(record.msg).startswith("💡 Tip")


for _name in LIGHTNING_NOTICES:
    logging.getLogger(_name).addFilter(_not_a_tip)


class ResumableMLFlowLogger(MLFlowLogger):
    """An :class:`MLFlowLogger` that skips metric points the run already holds.

    A run resumed from ``last.ckpt`` may replay the steps logged after that checkpoint was
    written; with a fixed seed they carry the same values, so skipping them keeps every
    metric's history free of duplicates.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._logged_until: dict[str, int] | None = None

    def _last_logged_steps(self) -> dict[str, int]:
        if self._logged_until is None:
            run = self.experiment.get_run(self.run_id)
            self._logged_until = {
                key: max(m.step for m in self.experiment.get_metric_history(self.run_id, key))
                for key in run.data.metrics
            }
        return self._logged_until

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if step is not None:
            logged = self._last_logged_steps()
            metrics = {k: v for k, v in metrics.items() if step > logged.get(k, -1)}
        if metrics:
            super().log_metrics(metrics, step)
