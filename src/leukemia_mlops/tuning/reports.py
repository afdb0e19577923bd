"""The sweep stages' reports: the best trial's parameters and the campaign's summary."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from leukemia_mlops.errors import InputError
from leukemia_mlops.files import write_json, write_text
from leukemia_mlops.tracking.run_files import sweep_reports


class SweepReports:
    """The stage's two reports for the model under ``model_key``: the best parameters
    (``best_params.yaml``, ``best_<key>_params.yaml``) and the summary (``sweep[_<key>].json``)."""

    def __init__(self, reports_dir: Path, model_key: str):
        self.best_params, self.summary = sweep_reports(reports_dir, model_key)

    def write(self, results: Mapping[str, Any], budget: Mapping[str, Any]) -> None:
        """Both reports from the sweeper's results and the budget of the campaign."""
        if results.get("best_value") is None:
            raise InputError(f"no trial of study {results['study_name']} completed")
        best = {
            "tuned": True,
            "study_name": results["study_name"],
            "trial": results["best_trial"],
            "value": results["best_value"],
            "overrides": results["best_overrides"],
            "params": results["best_params"],
        }
        trials = results["trials"]
        metrics = {
            "best_value": results["best_value"],
            "best_trial": results["best_trial"],
            "trials": {
                "complete": trials["complete"],
                "pruned": trials["pruned"],
                "failed": trials["fail"],
            },
            "budget": dict(budget),
        }
        self._write(best, metrics)

    def write_untuned(self) -> None:
        """The reports of a stage with ``sweep.enabled=false``: nothing to merge into training."""
        self._write({"tuned": False, "params": {}}, {"tuned": False})

    def _write(self, best: dict[str, Any], metrics: dict[str, Any]) -> None:
        write_text(self.best_params, yaml.safe_dump(best, sort_keys=False))
        write_json(self.summary, metrics, sort_keys=False)
