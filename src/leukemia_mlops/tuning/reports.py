"""The sweep stages' reports: the best trial's parameters and the campaign's summary."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from leukemia_mlops.errors import InputError


class SweepReports:
    """The stage's two reports for the model under ``model_key``: the best parameters
    (``best_params.yaml``, ``best_<key>_params.yaml``) and the summary (``sweep[_<key>].json``)."""

    def __init__(self, reports_dir: Path, model_key: str):
        infix = "" if model_key == "model" else f"_{model_key}"
        self.best_params = reports_dir / f"best{infix}_params.yaml"
        self.summary = reports_dir / f"sweep{infix}.json"

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
        self.best_params.parent.mkdir(parents=True, exist_ok=True)
        self.best_params.write_text(yaml.safe_dump(best, sort_keys=False))
        self.summary.write_text(json.dumps(metrics, indent=2))
