"""``compare --register`` leaves a model card on the champion, every number its run's own."""

from __future__ import annotations

import json
import re
from importlib.resources import files
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from omegaconf import OmegaConf

from leukemia_mlops.cli import compare as compare_cli
from leukemia_mlops.data.identity import read_identity
from leukemia_mlops.data.prepare import MANIFEST_FILE
from leukemia_mlops.evaluation.evaluate import log_evaluation
from leukemia_mlops.tracking.datasets import log_data_inputs, split_profile
from leukemia_mlops.tracking.model_card import (
    CARD_ARTIFACT,
    NOT_MEASURED,
    TEMPLATE,
    render_card,
)
from leukemia_mlops.tracking.model_logging import log_classifier
from leukemia_mlops.tracking.registry import REGISTERED_NAME, champion_alias
from leukemia_mlops.tracking.store import ensure_experiment, local_store_uri

EXPERIMENT = "leukemia-card-test"
#: Each card row's label -> where its value, low and high bounds sit in metrics.json.
INTERVAL_ROWS = {
    "Test AUROC": ("test", "auroc", "_bca"),
    "Test weighted F1": ("test", "f1_weighted", "_bca"),
    "Test sensitivity": ("test", "sensitivity", "_bca"),
    "Test specificity": ("test", "specificity", "_bca"),
    "Test balanced accuracy": ("test", "balanced_accuracy", "_bca"),
    "Top-label ECE before calibration": ("calibration.before", "top_label_ece", "_bca"),
    "Top-label ECE after calibration": ("calibration.after", "top_label_ece", "_bca"),
    "Brier score before calibration": ("calibration.before", "brier", "_bca"),
    "Brier score after calibration": ("calibration.after", "brier", "_bca"),
    "Conformal coverage of ALL cells": ("conformal", "coverage_ALL", "_bca"),
    "Conformal coverage of HEM cells": ("conformal", "coverage_HEM", "_bca"),
    "Abstention rate (both classes in the set)": ("conformal", "abstention_rate", "_bca"),
    "Patient sensitivity": ("patient", "sensitivity", ""),
    "Patient specificity": ("patient", "specificity", ""),
}
#: Rows of one number: label -> its dotted key in metrics.json.
VALUE_ROWS = {
    "Threshold on P(ALL), chosen on validation": "threshold",
    "Test cells": "counts.test_cells",
    "Test subjects": "counts.test_subjects",
    "Temperature": "calibration.temperature",
    "Conformal error level (alpha)": "conformal.alpha",
    "Empty-set rate": "conformal.empty_rate",
    "Patient threshold": "patient.threshold",
    "ALL patients": "patient.n_all_subjects",
    "HEM patients": "patient.n_hem_subjects",
    "OOD check: test cells": "ood.test_cells",
    "OOD check: test cells flagged": "ood.flagged",
    "OOD check: false-alarm rate on held-out cells": "ood.false_alarm_rate",
}
#: MLflow's column for a description is 5000 characters wide (PostgreSQL enforces it).
DESCRIPTION_LIMIT = 5000


def metrics_record() -> dict:
    """An evaluate report of the shape ``metrics.json`` has, every number distinct (so that a
    number read from the wrong key or section shows)."""
    rng = np.random.default_rng(7)
    values = iter(rng.permutation(np.linspace(0.05, 0.95, 200)).tolist())

    def interval(names: tuple[str, ...], bounds: str = "_bca") -> dict[str, float]:
        out = {}
        for name in names:
            point = next(values)
            out |= {
                name: point,
                f"{name}{bounds}_low": point - 0.03,
                f"{name}{bounds}_high": point + 0.02,
            }
        return out

    return {
        "threshold": next(values),
        "counts": {"test_cells": 391, "test_subjects": 28, "val_cells": 153, "val_subjects": 10},
        "bootstrap": {"method": "subject bootstrap", "n_resamples": 1000, "confidence": 0.95},
        "test": interval(
            ("auroc", "f1_weighted", "sensitivity", "specificity", "balanced_accuracy")
        ),
        "calibration": {
            "method": "temperature scaling",
            "fitted_on": "validation",
            "temperature": 1.0 + next(values),
            "before": interval(("top_label_ece", "brier")),
            "after": interval(("top_label_ece", "brier")),
        },
        "conformal": {
            "alpha": next(values),
            "mondrian": True,
            "fitted_on": "validation",
            "quantile": {"ALL": next(values), "HEM": next(values)},
            **interval(("coverage_ALL", "coverage_HEM", "abstention_rate")),
            "empty_rate": next(values),
            "guarantee": "per cell, under exchangeability",
        },
        "patient": {
            "rule": "mean log-odds",
            "threshold": next(values),
            "threshold_chosen_on": "validation",
            **interval(("sensitivity", "specificity"), bounds=""),
            "n_all_subjects": 17,
            "n_hem_subjects": 11,
            "interval": "Clopper-Pearson",
        },
        "ood": {
            "rule": "feature distance",
            "test_cells": 391,
            "flagged": 9,
            "false_alarm_rate": next(values),
        },
    }


def dotted(record: dict, key: str) -> float:
    node = record
    for part in key.split("."):
        node = node[part]
    return node


def card_rows(card: str) -> dict[str, list[str]]:
    """Each table row of the card: its first cell -> the other cells."""
    rows = {}
    for line in card.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def card_of(record: dict) -> str:
    """The card of a version ``m`` 1 whose run holds ``record`` and no tags, splits or data."""
    context = {"name": "m", "version": "1", "run_id": "r", "tags": {}, "data_identity": "d"}
    return render_card({**context, "splits": [], "m": record})


def assert_shows(cell: str, expected: float) -> None:
    """A card cell shows ``expected``: exactly if whole, else to its rendered decimals."""
    if isinstance(expected, int):
        assert cell == str(expected)
    else:
        assert abs(float(cell) - expected) <= 0.5e-4 + 1e-12, (cell, expected)


def write_params(root: Path, prepared: Path) -> Path:
    params = {
        "paths": {"prepared_dir": str(prepared), "mlruns_dir": str(root / "mlruns")},
        "logger": {"mlflow": {"tracking_uri": None, "experiment_name": EXPERIMENT}},
    }
    path = root / "params.yaml"
    OmegaConf.save(OmegaConf.create(params), path)
    return path


@pytest.fixture
def champion_run(tiny_prepared, tmp_path) -> tuple[str, str, dict]:
    """An evaluated run in a fresh sqlite store, as train and evaluate leave it: tags, the
    three splits as dataset inputs, ``evaluation/metrics.json`` and a logged model."""
    uri = local_store_uri(tmp_path / "mlruns")
    experiment_id = ensure_experiment(uri, EXPERIMENT, tmp_path / "mlruns")
    identity = read_identity(tiny_prepared)
    tags = {
        "family": "cnn",
        "backbone": "resnet18",
        "data_identity": identity.digest,
        "data_source": "synthetic",
        "git_commit": "abc",
    }
    run_id = MlflowClient(uri).create_run(experiment_id, tags=tags).info.run_id
    manifest = tiny_prepared / MANIFEST_FILE
    log_data_inputs(uri, run_id, manifest, identity, {"train": "training", "val": "validation"})
    log_data_inputs(uri, run_id, manifest, identity, {"test": "test"})
    metrics = metrics_record()
    report = tmp_path / "eval"
    (report).mkdir()
    (report / "metrics.json").write_text(json.dumps(metrics))
    log_evaluation(uri, run_id, metrics, report)
    net = torch.nn.Sequential(
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 1)
    )
    log_classifier(uri, run_id, net, 8)
    return uri, run_id, metrics


def test_the_registered_champion_carries_a_card_of_its_own_numbers(
    champion_run, tiny_prepared, tmp_path
):
    uri, run_id, metrics = champion_run
    out = tmp_path / "reports" / "comparison.md"
    compare_cli.main(
        ["--params", str(write_params(tmp_path, tiny_prepared)), "--out", str(out), "--register"]
    )

    client = MlflowClient(uri, registry_uri=uri)
    digest = read_identity(tiny_prepared).digest
    version = client.get_model_version_by_alias(REGISTERED_NAME, champion_alias(digest))
    card = version.description
    assert version.run_id == run_id
    assert (out.parent / "model_card.md").read_text() == card
    artifact = client.download_artifacts(run_id, CARD_ARTIFACT, str(tmp_path))
    assert Path(artifact).read_text() == card
    assert "**Not for clinical use.**" in card
    assert len(card) < DESCRIPTION_LIMIT
    assert digest in card

    rows = card_rows(card)
    for label, (section, key, bounds) in INTERVAL_ROWS.items():
        node = dotted(metrics, section)
        expected = (node[key], node[f"{key}{bounds}_low"], node[f"{key}{bounds}_high"])
        for cell, number in zip(rows[label], expected, strict=True):
            assert_shows(cell, number)
    for label, key in VALUE_ROWS.items():
        assert_shows(rows[label][0], dotted(metrics, key))
    manifest = pd.read_parquet(tiny_prepared / MANIFEST_FILE)
    for split, context in (("train", "training"), ("val", "validation"), ("test", "test")):
        profile = split_profile(manifest, split)
        shown = [
            profile["images"]["ALL"],
            profile["images"]["HEM"],
            profile["subjects"]["ALL"],
            profile["subjects"]["HEM"],
        ]
        assert rows[context] == [str(n) for n in shown]


def test_the_template_types_no_number():
    """No digit but in a name (F1, f1_weighted): every number comes from the run."""
    template = files("leukemia_mlops.tracking").joinpath(TEMPLATE).read_text()
    assert re.findall(r"(?<![A-Za-z_])\d[\d.]*", template) == []


def test_a_section_not_measured_says_so():
    partial = {
        key: value
        for key, value in metrics_record().items()
        if key in ("threshold", "counts", "test", "bootstrap")
    }
    card = card_of(partial)
    rows = card_rows(card)
    for label in (
        "Temperature",
        "Brier score after calibration",
        "Patient sensitivity",
        "Conformal coverage of ALL cells",
        "OOD check: false-alarm rate on held-out cells",
    ):
        assert rows[label][0] == NOT_MEASURED
    assert_shows(rows["Test AUROC"][0], partial["test"]["auroc"])
    assert "Not for clinical use" in card


def test_a_bias_corrected_only_interval_shows_its_bounds():
    """``interval_columns`` names BC-only bounds ``_bc_low``/``_bc_high``: the card shows them."""
    record = metrics_record()
    after = record["calibration"]["after"]
    after["brier_bc_low"] = after.pop("brier_bca_low")
    after["brier_bc_high"] = after.pop("brier_bca_high")
    card = card_of(record)
    shown = card_rows(card)["Brier score after calibration"]
    for cell, key in zip(shown, ("brier", "brier_bc_low", "brier_bc_high"), strict=True):
        assert_shows(cell, after[key])
