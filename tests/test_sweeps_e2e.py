"""Optuna sweeps through the real command lines: ``train -m hparams_search=...`` and the stage."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from optuna.trial import TrialState

from leukemia_mlops.config import write_params
from leukemia_mlops.data.identity import read_identity
from leukemia_mlops.tracking.store import tracking_uri
from leukemia_mlops.tuning.runs import PARENT_ATTR, PARENT_TAG, STATE_TAG, TRIAL_TAG

pytestmark = pytest.mark.slow

TIMEOUT_S = 600
TESTS = Path(__file__).parent
# The same tiny runs as the training tests (logging models, as by default: a sweep's trials
# must log none).
TINY = [
    "data.prepare.image_size=48",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "datamodule.num_workers=0",
]
# The shipped CNN search space, one epoch a trial, on its quickest model and without pruning.
CNN = [
    "hparams_search=cnn_optuna",
    "trainer.max_epochs=1",
    "model=resnet18",
    "hydra.sweeper.pruner.n_startup_trials=100",
]
# A test search space with a pruner that prunes every trial after its first epoch.
PRUNING_SPACE = """\
# @package _global_
# Not an extension of _optuna: a pruner of another class takes none of the median pruner's keys.
defaults:
  - override /hydra/sweeper: leukemia_optuna
hydra:
  sweeper:
    direction: maximize
    study_name: always_pruned
    storage: sqlite:///${paths.mlruns_dir}/optuna.db
    n_trials: 1
    n_jobs: 1
    max_failure_rate: 0.25
    top_up: false
    heartbeat_interval: 60
    grace_period: 120
    max_retry: 1
    sampler: {_target_: optuna.samplers.RandomSampler, seed: 0}
    pruner: {_target_: optuna.pruners.ThresholdPruner, lower: 1.01}
    params:
      model.optimizer.lr: tag(log, interval(1e-4, 1e-2))
"""


def sweep_command(tmp_path: Path, prepared: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "leukemia_mlops.train",
        "-m",
        f"paths.prepared_dir={prepared}",
        f"paths.mlruns_dir={tmp_path / 'mlruns'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        *overrides,
    ]


def run(
    command: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )


def sweep(
    tmp_path: Path, prepared: Path, *overrides: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    command = sweep_command(tmp_path, prepared, *CNN, *TINY, *overrides)
    result = run(command, tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def load_study(tmp_path: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'mlruns/optuna.db'}")


def mlflow_runs(tmp_path: Path, study: optuna.Study) -> tuple[MlflowClient, object, list]:
    """The study's parent run and its child runs."""
    client = MlflowClient(tracking_uri(None, tmp_path / "mlruns"))
    parent = client.get_run(study.user_attrs[PARENT_ATTR])
    runs = client.search_runs([parent.info.experiment_id])
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id]
    return client, parent, children


def stored_models(mlruns: Path) -> list[Path]:
    """The checkpoints and MLflow models (their ``MLmodel`` files) anywhere in the store."""
    return [p for p in mlruns.rglob("*") if p.name == "MLmodel" or p.suffix == ".ckpt"]


def test_a_sweep_nests_its_trials_in_mlflow_and_a_rerun_continues_it(tiny_prepared, tmp_path):
    audit = tmp_path / "trials.log"  # whether the parent was named as each trial was created
    hooks = os.pathsep.join(filter(None, [str(TESTS / "trial_audit"), os.getenv("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": hooks, "TRIAL_AUDIT_LOG": str(audit)}
    sweep(tmp_path, tiny_prepared, "hydra.sweeper.n_trials=3", env=env)
    study = load_study(tmp_path, "cnn_optuna")
    assert [(t.number, t.state) for t in study.trials] == [
        (n, TrialState.COMPLETE) for n in (0, 1, 2)
    ]
    # No trial, the enqueued baseline first, exists before the parent: a worker that finds
    # trials takes the parent the study names (a second worker would make its own).
    assert audit.read_text().splitlines() == ["parent named: True"] * 3
    # Only the best trial's checkpoint stays in the store; no trial logged a model, and the
    # trials' job directories hold no checkpoint once the campaign is over.
    _, _, children = mlflow_runs(tmp_path, study)
    (best,) = [r for r in children if r.data.tags[TRIAL_TAG] == str(study.best_trial.number)]
    stored = stored_models(tmp_path / "mlruns")
    assert stored and all(best.info.run_id in p.parts for p in stored), stored
    assert not list((tmp_path / "sweep").glob("trial_*/checkpoints"))
    first_parent = study.user_attrs[PARENT_ATTR]
    results = yaml.safe_load((tmp_path / "sweep/optuna_results.yaml").read_text())
    assert results["best_value"] == study.best_value
    assert results["best_overrides"] == study.best_trial.user_attrs["overrides"]
    assert (
        results["best_params"]["model"]["optimizer"]["lr"]
        == study.best_params["model.optimizer.lr"]
    )

    sweep(tmp_path, tiny_prepared, "hydra.sweeper.n_trials=1")  # n_trials adds to the study
    study = load_study(tmp_path, "cnn_optuna")
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert study.trials[3].params != study.trials[0].params  # the seeded sampler moved on
    assert sorted(p.name for p in (tmp_path / "sweep").glob("trial_*")) == [
        f"trial_{n}" for n in range(4)
    ]

    client, parent, children = mlflow_runs(tmp_path, study)
    assert parent.info.run_id == first_parent and parent.info.status == "FINISHED"
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    assert parent.data.tags["best_trial"] == str(study.best_trial.number)
    assert parent.data.tags["best/model.optimizer.lr"] == str(
        study.best_params["model.optimizer.lr"]
    )
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"optimization_history.png", "param_importances.png", "optuna_results.yaml"} <= artifacts
    assert sorted(int(r.data.tags[TRIAL_TAG]) for r in children) == [0, 1, 2, 3]
    for child in children:
        trial = study.trials[int(child.data.tags[TRIAL_TAG])]
        assert child.data.tags[STATE_TAG] == "COMPLETE" and child.info.status == "FINISHED"
        assert child.data.params["trial/model.optimizer.lr"] == str(
            trial.params["model.optimizer.lr"]
        )
        assert child.data.metrics["trial/value"] == pytest.approx(trial.value)
        assert "val/f1_weighted" in child.data.metrics  # the child is the training run itself
    # Every run of the study, its parent included, names the data it read: the UI's Dataset
    # column and `mlflow.search_runs` filters on datasets see the whole sweep.
    contexts = {
        run.info.run_id: sorted(
            (entry.dataset.digest, tag.value)
            for entry in client.get_run(run.info.run_id).inputs.dataset_inputs
            for tag in entry.tags
            if tag.key == MLFLOW_DATASET_CONTEXT
        )
        for run in [parent, *children]
    }
    digest = read_identity(tiny_prepared).digest  # the cache's data identity
    assert all(
        found == [(digest, "training"), (digest, "validation")] for found in contexts.values()
    ), contexts


def test_two_workers_on_one_study_add_distinct_trials(tiny_prepared, tmp_path):
    def worker(seed: int) -> subprocess.Popen:
        command = sweep_command(
            tmp_path,
            tiny_prepared,
            *CNN,
            *TINY,
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.study_name=shared",
            f"hydra.sweeper.sampler.seed={seed}",
        )
        return subprocess.Popen(
            command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )

    workers = [worker(1), worker(2)]  # on a new database: they also race to create it
    for process in workers:
        _, stderr = process.communicate(timeout=TIMEOUT_S)
        assert process.returncode == 0, stderr[-3000:]
    study = load_study(tmp_path, "shared")
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    _, _, children = mlflow_runs(tmp_path, study)
    assert sorted(int(r.data.tags[TRIAL_TAG]) for r in children) == [0, 1, 2, 3]
    client = MlflowClient(tracking_uri(None, tmp_path / "mlruns"))
    parents = client.search_runs(
        [children[0].info.experiment_id], filter_string="tags.optuna_study = 'shared'"
    )
    assert len(parents) == 1


@pytest.mark.parametrize("trainer", ["trainer=cpu", "trainer=ddp_cpu"])
def test_a_pruned_trial_ends_pruned(trainer, tiny_prepared, tmp_path):
    # Under 2-process CPU DDP, rank 0 of the launched trial reaches the trial through the
    # storage, reports and decides, and every rank stops.
    (tmp_path / "conf/hparams_search").mkdir(parents=True)
    (tmp_path / "conf/hparams_search/always_pruned.yaml").write_text(PRUNING_SPACE)
    command = sweep_command(
        tmp_path,
        tiny_prepared,
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "hparams_search=always_pruned",
        *TINY,
        trainer,
        "trainer.max_epochs=3",
    )
    result = run(command, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load_study(tmp_path, "always_pruned")
    (trial,) = study.trials
    assert trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [0]  # stopped after its first epoch
    client, _, (child,) = mlflow_runs(tmp_path, study)
    assert child.data.tags[STATE_TAG] == "PRUNED" and child.info.status == "KILLED"
    assert len(client.get_metric_history(child.info.run_id, "val/f1_weighted")) == 1


def test_failed_trials_stop_the_sweep_past_the_failure_budget(tiny_prepared, tmp_path):
    command = sweep_command(
        tmp_path,
        tiny_prepared,
        *CNN,
        *TINY,
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.max_failure_rate=0.5",  # one failure of three is allowed
        "model.scheduler=choice(bogus)",  # every trial crashes while building its model
    )
    result = run(command, tmp_path)
    assert result.returncode != 0
    assert "2 of 2 trials failed, more than max_failure_rate=0.5" in result.stderr
    study = load_study(tmp_path, "cnn_optuna")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]
    assert "model.scheduler must be one of" in study.trials[0].user_attrs["error"]
    _, parent, children = mlflow_runs(tmp_path, study)
    assert parent.info.status == "FAILED"
    assert sorted(r.data.tags[STATE_TAG] for r in children) == ["FAIL", "FAIL"]
    assert all("model.scheduler" in r.data.tags["optuna_error"] for r in children)


def test_a_bad_search_space_fails_before_any_trial(tiny_prepared, tmp_path):
    command = sweep_command(tmp_path, tiny_prepared, *CNN, *TINY, "model=choice(resnet18, nope)")
    result = run(command, tmp_path)
    assert result.returncode == 1
    assert "config group model has no option 'nope'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlruns/optuna.db").exists()
    assert not (tmp_path / "sweep").exists()


def test_a_sweep_without_a_prepare_cache_fails_before_any_run(tmp_path):
    command = sweep_command(tmp_path, tmp_path / "nothing", *CNN, *TINY)
    result = run(command, tmp_path)
    assert result.returncode == 1
    assert "nothing records no data identity: rebuild it (dvc repro prepare)" in result.stderr
    assert "Traceback" not in result.stderr
    client = MlflowClient(tracking_uri(None, tmp_path / "mlruns"))
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_the_sweep_stage_tunes_the_configured_model_and_writes_the_best_params(
    tiny_prepared, tiny_config, tmp_path
):
    params = tmp_path / "params.yaml"
    write_params(
        tiny_config("model=mobilenet_v3_large", "sweep.n_trials=2", "sweep.max_epochs=1"), params
    )
    command = [sys.executable, "-m", "leukemia_mlops.cli.sweep", "--params", str(params)]
    result = run(command, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    best = yaml.safe_load((tmp_path / "reports/best_params.yaml").read_text())
    study = load_study(tmp_path, best["study_name"])
    assert best["study_name"].startswith("cnn_optuna-") and best["tuned"] is True
    assert (best["trial"], best["value"]) == (study.best_trial.number, study.best_value)
    assert best["overrides"] == study.best_trial.user_attrs["overrides"]
    assert "model" not in study.best_params  # the search space's model choice is dropped
    lr = study.best_params["model.optimizer.lr"]
    assert f"model.optimizer.lr={lr}" in best["overrides"]
    assert best["params"]["model"]["optimizer"]["lr"] == lr
    assert "backbone" not in best["params"]["model"]
    assert best["params"]["datamodule"]["batch_size"] == study.best_params["datamodule.batch_size"]
    metrics = yaml.safe_load((tmp_path / "reports/sweep.json").read_text())
    budget = metrics.pop("budget")
    assert metrics == {
        "best_value": study.best_value,
        "best_trial": study.best_trial.number,
        "trials": {"complete": 2, "pruned": 0, "failed": 0},
    }
    assert (budget["search_space"], budget["n_trials"], budget["trial_epochs"]) == (
        "cnn_optuna",
        2,
        1,
    )
    trial_dir = tmp_path / "multirun/sweep" / best["study_name"] / "trial_0"
    trial_config = yaml.safe_load((trial_dir / "config.yaml").read_text())
    assert trial_config["model"]["backbone"] == "mobilenet_v3_large"  # params.yaml's model
    assert trial_config["trainer"]["max_epochs"] == 2  # the run's, its schedule's length
    assert trial_config["callbacks"]["extra"]["trial_budget"]["epochs"] == 1  # sweep.max_epochs
    assert trial_config["data"]["prepare"]["image_size"] == 48  # params.yaml's value
    baseline = study.trials[0].params  # the first trial runs params.yaml's values
    assert baseline["model.optimizer.lr"] == trial_config["model"]["optimizer"]["lr"] == 1e-3
    # The same inputs name the same study: a rerun finds it full and runs nothing.
    rerun = run(command, tmp_path)
    assert rerun.returncode == 0 and len(load_study(tmp_path, best["study_name"]).trials) == 2


def test_the_detector_sweep_stage_tunes_the_detector_and_train_uses_its_best_params(
    tiny_prepared, tiny_config, tmp_path
):
    tiny_yolo = ["detector.img_size=64", "detector.width_mult=0.25"]
    scenes = ["detector.scenes.train_scenes=4", "detector.scenes.val_scenes=2"]
    # A learning rate outside the search space: no trial, the baseline included, trains with it.
    campaign = ["sweep.n_trials=2", "sweep.max_epochs=1", "detector.optimizer.lr=0.05"]
    cfg = tiny_config(*tiny_yolo, *scenes, *campaign)
    params = tmp_path / "params.yaml"
    write_params(cfg, params)
    sweep_stage = [sys.executable, "-m", "leukemia_mlops.cli.sweep", "--params", str(params)]
    result = run([*sweep_stage, "--model-key", "detector"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    best = yaml.safe_load((tmp_path / "reports/best_detector_params.yaml").read_text())
    assert best["study_name"].startswith("yolo_optuna-")  # the detector family's space
    assert not (tmp_path / "reports/best_params.yaml").exists()  # `model`'s is another stage's
    budget = yaml.safe_load((tmp_path / "reports/sweep_detector.json").read_text())["budget"]
    assert (budget["n_trials"], budget["trial_epochs"]) == (2, 1)
    trial_dir = tmp_path / "multirun/sweep" / best["study_name"] / "trial_0"
    trial_config = yaml.safe_load((trial_dir / "config.yaml").read_text())
    assert trial_config["model"]["family"] == "yolo" and "detector" not in trial_config
    assert trial_config["trainer"]["max_epochs"] == cfg.detector_trainer.max_epochs

    # The best trial's model.* values train the detector (not `model`, the CNN).
    best_lr = best["params"]["model"]["optimizer"]["lr"]
    train = [sys.executable, "-m", "leukemia_mlops.cli.train", "--params", str(params)]
    best_file = str(tmp_path / "reports/best_detector_params.yaml")
    overrides = ["detector_trainer.max_epochs=1"]
    result = run(
        [*train, "--model-key", "detector", "--best-params", best_file, *overrides], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trained = yaml.safe_load((tmp_path / "models/detector/config.yaml").read_text())
    assert trained["model"]["family"] == "yolo"
    assert trained["model"]["optimizer"]["lr"] == best_lr != cfg.detector.optimizer.lr


def test_a_disabled_sweep_stage_tunes_nothing(tiny_config, tmp_path):
    params = tmp_path / "params.yaml"
    write_params(tiny_config("sweep.enabled=false"), params)
    command = [sys.executable, "-m", "leukemia_mlops.cli.sweep", "--params", str(params)]
    assert run(command, tmp_path).returncode == 0
    best = yaml.safe_load((tmp_path / "reports/best_params.yaml").read_text())
    assert best == {"tuned": False, "params": {}}
    assert not (tmp_path / "mlruns/optuna.db").exists()


def reported_an_epoch(storage: optuna.storages.RDBStorage, study_id: int, number: int) -> bool:
    """Whether trial ``number`` has reported a validation score (its first epoch ended)."""
    trials = storage.get_all_trials(study_id, deepcopy=False)
    return len(trials) > number and bool(trials[number].intermediate_values)


def test_a_sweep_stage_killed_mid_trial_is_finished_by_its_rerun(
    tiny_prepared, tiny_config, tmp_path
):
    # 4 epochs a trial: trial 1 is killed once its first epoch is reported, with 3 to go.
    cfg = tiny_config("sweep.n_trials=3", "sweep.max_epochs=4")
    cfg.sweep.sweeper = {"heartbeat_interval": 1, "grace_period": 3}
    params = tmp_path / "params.yaml"
    write_params(cfg, params)
    command = [sys.executable, "-m", "leukemia_mlops.cli.sweep", "--params", str(params)]
    stage = subprocess.Popen(
        command,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the stage and its Hydra multirun die together
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not list(tmp_path.glob("multirun/sweep/*/trial_1")):  # the study exists by now
        assert stage.poll() is None, "the sweep ended before it could be killed"
        assert time.monotonic() < deadline, "trial 1 never started"
        time.sleep(0.2)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'mlruns/optuna.db'}")
    (study_name,) = optuna.get_all_study_names(storage)
    study_id = storage.get_study_id_from_name(study_name)
    # Kill on an observed event: trial 1 reported its first epoch and has 3 epochs left.
    while not reported_an_epoch(storage, study_id, 1):
        assert stage.poll() is None, "the sweep ended before it could be killed"
        assert time.monotonic() < deadline, "trial 1 never finished an epoch"
        time.sleep(0.05)
    os.killpg(stage.pid, signal.SIGKILL)
    stage.wait()
    storage.engine.dispose()
    killed = load_study(tmp_path, study_name).trials[1]
    assert killed.state == TrialState.RUNNING and len(killed.intermediate_values) < 4

    rerun = run(command, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    study = load_study(tmp_path, study_name)
    killed, *_ = study.trials[1:]
    assert killed.state == TrialState.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retries) == 1 and retries[0].params == killed.params
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"]  # exactly n_trials finished
    _, parent, children = mlflow_runs(tmp_path, study)
    assert parent.info.status == "FINISHED"
    assert sorted(int(r.data.tags[TRIAL_TAG]) for r in children) == [0, 1, 2, 3]
    killed_run = next(r for r in children if r.data.tags[TRIAL_TAG] == "1")
    assert killed_run.info.status == "FAILED" and killed_run.data.tags[STATE_TAG] == "FAIL"
    report = yaml.safe_load((tmp_path / "reports/sweep.json").read_text())
    assert report["trials"] == {"complete": 3, "pruned": 0, "failed": 1}
