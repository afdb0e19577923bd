"""``make compare-seeds`` on tiny data: both families trained per seed with their sweeps' params."""

from __future__ import annotations

import json

import optuna
import pandas as pd
import pytest
import yaml

from leukemia_mlops.cli import compare_seeds
from leukemia_mlops.config import write_params
from leukemia_mlops.evaluation.paired import NO_DIFFERENCE
from leukemia_mlops.evaluation.seeds import expected_max
from leukemia_mlops.tuning.reports import SweepReports

pytestmark = pytest.mark.slow

TINY_YOLO = [
    "detector.img_size=64",
    "detector.width_mult=0.25",
    "detector.scenes.train_scenes=4",
    "detector.scenes.val_scenes=2",
    "detector_trainer.max_epochs=1",
    "trainer.max_epochs=1",
    "evaluate.n_resamples=20",
    "evaluate.tta=false",
]


def test_each_seed_trains_both_tuned_models_and_the_report_pairs_them(tiny_config, tmp_path):
    cfg = tiny_config(*TINY_YOLO)
    params = tmp_path / "params.yaml"
    write_params(cfg, params)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="yolo_optuna-x", storage=storage, direction="maximize")
    for value in (0.6, 0.8):
        study.add_trial(optuna.trial.create_trial(value=value))
    reports = SweepReports(tmp_path / "reports", "detector")
    SweepReports(tmp_path / "reports", "model").write_untuned()
    tuned = {"model": {"optimizer": {"lr": 0.0031}}}
    best = {"tuned": True, "study_name": "yolo_optuna-x", "params": tuned}
    reports.best_params.write_text(yaml.safe_dump(best))

    out = tmp_path / "seeds"
    arguments = ["--params", str(params), "--seeds", "2", "--storage", storage, "--out", str(out)]
    compare_seeds.main(arguments)

    runs = pd.read_csv(out / "runs.csv")
    assert sorted(zip(runs["model"], runs["seed"], strict=True)) == [
        ("detector", 0),
        ("detector", 1),
        ("model", 0),
        ("model", 1),
    ]
    for key in ("model", "detector"):  # the seed changed the training
        losses = {
            float(
                pd.read_csv(tmp_path / f"models/seeds/{key}/seed_{seed}/history.csv")[
                    "train/loss"
                ].iloc[-1]
            )
            for seed in (0, 1)
        }
        assert len(losses) == 2, key
    trained = yaml.safe_load((tmp_path / "models/seeds/detector/seed_1/config.yaml").read_text())
    assert trained["model"]["family"] == "yolo"
    assert trained["model"]["optimizer"]["lr"] == 0.0031  # the detector sweep's best
    assert trained["seed"] == trained["datamodule"]["seed"] == 1
    summary = json.loads((out / "seeds.json").read_text())
    assert [pair["seed"] for pair in summary["pairs"]] == [0, 1]
    assert {pair["verdict"] for pair in summary["pairs"]} == {NO_DIFFERENCE}  # too few subjects
    assert 0.0 <= summary["p_model_better"] <= 1.0
    curves = summary["expected_best_val_auroc"]
    assert curves["model"] == {"study": None, "by_trials": {}}  # sweep.enabled=false
    expected = {str(n): pytest.approx(expected_max([0.6, 0.8], n)) for n in (1, 2)}
    assert curves["detector"]["by_trials"] == expected  # Dodge et al.: 0.7, then 0.75
    assert "Expected best validation AUROC" in (out / "seeds.md").read_text()
