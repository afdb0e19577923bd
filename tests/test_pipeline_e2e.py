"""The whole DVC pipeline on tiny data, as a user drives it: repro, no-op, experiments, new data.

Every stage runs under ``dvc repro`` and so sees only the params keys it declares: a stage
that read an undeclared key would fail here.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import TINY_SPEC
from mlflow import MlflowClient
from test_dvc_pipeline import DVC, REPO, run

from leukemia_mlops.data.synthetic import generate_cnmc
from leukemia_mlops.evaluation.paired import NO_DIFFERENCE
from leukemia_mlops.inference.loading import checkpoint_class
from leukemia_mlops.models.detector import YoloDetector
from leukemia_mlops.tracking.store import tracking_uri

# conf/local/default.yaml of the test project: the user's standing choices (here: tiny runs).
TINY_LOCAL = """# @package _global_
data:
  prepare: {image_size: 32, workers: 1}
datamodule: {batch_size: 32, num_workers: 0}
trainer: {max_epochs: 1, enable_progress_bar: false, enable_model_summary: false}
detector: {img_size: 64, scenes: {train_scenes: 4, val_scenes: 2}}
detector_trainer: {max_epochs: 1}
logger: {mlflow: {log_model: false}}
evaluate: {n_resamples: 20, tta: false}
sweep: {n_trials: 1, max_epochs: 1}
"""


#: Who commits in the test project (a CI machine may have no git identity).
GIT_IDENTITY = (
    "export GIT_AUTHOR_NAME=t GIT_AUTHOR_EMAIL=t@t GIT_COMMITTER_NAME=t GIT_COMMITTER_EMAIL=t@t"
)
PIPELINE_TIMEOUT = 1200  # seconds for one dvc command that trains (2 cores, shared in CI)


def lmo(*args: str, cwd: Path) -> str:
    return run(sys.executable, "-m", *args, cwd=cwd)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A git + DVC repo with the project's pipeline, conf/ (tiny local choices) and tiny data."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root)
    shutil.copy(REPO / ".gitignore", root)  # what the repository does not track
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "src", root / "src", ignore=ignore)
    shutil.copytree(REPO / "hydra_plugins", root / "hydra_plugins", ignore=ignore)
    shutil.copytree(REPO / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf/local").mkdir()
    (root / "conf/local/default.yaml").write_text(TINY_LOCAL)
    generate_cnmc(root / "data/raw", TINY_SPEC)
    run("git", "init", "-q", cwd=root)
    run(DVC, "init", "-q", cwd=root)
    shutil.copy(REPO / ".dvc/config", root / ".dvc/config")
    run(DVC, "add", "-q", "data/raw", cwd=root)
    (root / "data.dvc").write_text(
        (root / "data/raw.dvc").read_text().replace("path: raw", "path: data/raw")
    )
    (root / "data/raw.dvc").unlink()
    lmo("leukemia_mlops.cli.params", "--config-dir", "conf", cwd=root)
    commit(root, "tiny")
    return root


def studies(root: Path) -> dict[str, int]:
    """Study name -> finished trials, in the project's Optuna storage."""
    storage = f"sqlite:///{root / 'mlruns/optuna.db'}"
    return {
        s.study_name: s.n_trials
        for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
    }


@pytest.mark.slow
def test_repro_then_noop_then_an_experiment_then_new_data(project):
    first = run(DVC, "repro", cwd=project, timeout=PIPELINE_TIMEOUT)
    for stage in ("prepare", "sweep", "train", "sweep_detector", "train_detector", "evaluate"):
        assert f"Running stage '{stage}'" in first
    metrics = json.loads((project / "reports/eval/model/metrics.json").read_text())
    assert 0.0 <= metrics["test"]["f1_weighted"] <= 1.0
    identity = json.loads((project / "data/prepared/identity.json").read_text())
    assert (identity["source"], identity["image_size"]) == ("synthetic", 32)
    # Both families tuned alike: one campaign each, of sweep.n_trials trials.
    campaigns = studies(project)
    assert sorted(name.split("-")[0] for name in campaigns) == ["cnn_optuna", "yolo_optuna"]
    assert set(campaigns.values()) == {1}

    assert "Running stage" not in run(DVC, "repro", cwd=project, timeout=PIPELINE_TIMEOUT)

    # An experiment composes conf/ (the local choices included) with its -S overrides.
    experiment = run(
        DVC, "exp", "run", "-S", "model=mobilenet_v3_large", cwd=project, timeout=PIPELINE_TIMEOUT
    )
    assert "Running stage 'sweep'" in experiment and "Running stage 'train'" in experiment
    assert "Running stage 'prepare'" not in experiment
    composed = (project / "params.yaml").read_text()
    lmo(
        "leukemia_mlops.cli.params",
        "--config-dir",
        "conf",
        "--out",
        "made.yaml",
        "model=mobilenet_v3_large",
        cwd=project,
    )
    assert (project / "made.yaml").read_text() == composed
    assert yaml.safe_load(composed)["model"]["backbone"] == "mobilenet_v3_large"
    # The first screen of `dvc exp show` in 80 columns (its pager chops lines): the experiment
    # with `model`'s numbers (the tiny test split has too few subjects for intervals: DVC shows
    # no column for a null).
    screen = [line[:80] for line in run(DVC, "exp", "show", cwd=project).splitlines()]
    first = "\n".join(screen)
    assert screen[1].split()[:5] == ["Experiment", "Created", "f1", "auroc", "det_f1"], first
    headline = json.loads((project / "reports/metrics.json").read_text())
    assert headline["f1_bca_low"] is None
    [experiment] = [row for row in screen if "[" in row]  # └── <rev> [<name>]
    numbers = rf" {headline['f1']} +{headline['auroc']} +{headline['det_f1']} "
    assert re.search(numbers, experiment), first
    # The headline also answers the comparison: `model` minus `detector` and the verdict.
    header, row = run(DVC, "metrics", "show", cwd=project).splitlines()[:2]
    assert {"d_auroc", "verdict"} <= set(header.split())
    assert row.endswith(headline["verdict"]) and headline["verdict"] == NO_DIFFERENCE
    assert len(studies(project)) == 3  # the new model's params started its own campaign

    # `model` holds a YOLO in the pipeline as in a Hydra run: tuned, trained and evaluated.
    tiny_yolo = ["model.img_size=64", "model.width_mult=0.25", "model.scenes.train_scenes=4"]
    overrides = [arg for value in ["model=yolov3_tiny", *tiny_yolo] for arg in ("-S", value)]
    detector = run(DVC, "exp", "run", *overrides, cwd=project, timeout=PIPELINE_TIMEOUT)
    for stage in ("sweep", "train", "evaluate"):
        assert f"Running stage '{stage}'" in detector
    assert "Running stage 'train_detector'" not in detector
    assert checkpoint_class(project / "models/model/checkpoints/best.ckpt") is YoloDetector
    evaluated = json.loads((project / "reports/eval/model/metrics.json").read_text())
    assert "map_50" in evaluated["detection"]
    assert len(studies(project)) == 4

    # New data, as README's real-data steps switch to it, committed with README's own line:
    # a new campaign of sweep.n_trials trials per family, the old studies left as they were,
    # and a commit that holds every git-tracked output the new data changed.
    commit(project, "a clone of the synthetic results")
    synthetic_headline = (project / "reports/metrics.json").read_text()
    # A fresh clone has no mlruns/: README's one command records the committed sweeps again.
    shutil.rmtree(project / "mlruns")
    run(*readme_command("dvc repro --force --single-item"), cwd=project, timeout=PIPELINE_TIMEOUT)
    assert run("git", "status", "--porcelain", cwd=project) == ""  # the same best trials
    before = studies(project)
    assert sorted(before.values()) == [1, 1]  # the two stages' studies (both YOLO spaces now)
    client = MlflowClient(tracking_uri(None, project / "mlruns"))
    parents = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.optuna_study LIKE '%optuna-%'"
    )
    assert len(parents) == 2, [r.data.tags for r in parents]
    shutil.rmtree(project / "data/raw")
    generate_cnmc(project / "data/raw", replace(TINY_SPEC, seed=TINY_SPEC.seed + 1))
    run(DVC, "commit", "-f", "-q", "data.dvc", cwd=project)
    rerun = run(DVC, "repro", cwd=project, timeout=PIPELINE_TIMEOUT)
    assert "Running stage 'prepare'" in rerun and "Running stage 'evaluate'" in rerun
    after = studies(project)
    assert {k: after[k] for k in before} == before
    assert sorted(after[new] for new in set(after) - set(before)) == [1, 1]
    run("bash", "-c", f"{GIT_IDENTITY}; {readme_commit_line()}", cwd=project)
    assert run("git", "status", "--porcelain", cwd=project) == ""
    committed = run("git", "show", "HEAD:reports/metrics.json", cwd=project)
    assert committed == (project / "reports/metrics.json").read_text() != synthetic_headline


def readme_commit_line() -> str:
    """README's command that commits the switch to the real data."""
    readme = (REPO / "README.md").read_text()
    [line] = (line for line in readme.splitlines() if line.startswith("git add conf/local"))
    return line


def readme_command(start: str) -> list[str]:
    """The words of README's one command line that starts with ``start`` (comment dropped)."""
    lines = [line.strip() for line in (REPO / "README.md").read_text().splitlines()]
    [line] = (line for line in lines if line.startswith(start))
    return shlex.split(line, comments=True)


def commit(root: Path, message: str) -> None:
    run("git", "add", "-A", cwd=root)
    run("bash", "-c", f"{GIT_IDENTITY}; git commit -qm '{message}'", cwd=root)
