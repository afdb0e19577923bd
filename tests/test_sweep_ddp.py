"""A sweep whose trials train with DDP: only the sweep's process talks to Optuna."""

import json
import os
import subprocess
import sys

import pytest
from cluster_jobs import TESTS, srun_env
from omegaconf import OmegaConf
from optuna.trial import TrialState
from test_cluster_e2e import validation_cells
from test_sweeps_e2e import CNN, TIMEOUT_S, TINY, load_study, mlflow_runs, sweep_command

from bench.serving import free_port
from leukemia_mlops.errors import ConfigError
from leukemia_mlops.training.launch import OUTCOME_FILE, launches_processes, trial_launcher


@pytest.mark.parametrize(
    ("trainer", "launches"),
    [
        ({"devices": 1, "num_nodes": 1, "strategy": "auto"}, False),
        ({"devices": 2, "num_nodes": 1, "strategy": "ddp"}, True),
        ({"devices": 1, "num_nodes": 2, "strategy": "ddp"}, True),
        ({"devices": 2, "num_nodes": 1, "strategy": "ddp_spawn"}, False),
    ],
)
def test_which_trainers_launch_processes(trainer, launches):
    assert launches_processes(trainer) is launches


@pytest.mark.parametrize(
    ("value", "words"),
    [(None, []), (["srun", "--kill-on-bad-exit=1"], ["srun", "--kill-on-bad-exit=1"])],
)
def test_the_trial_launcher_is_a_list_of_words(value, words):
    assert trial_launcher(OmegaConf.create({"trial_launcher": value})) == words


@pytest.mark.parametrize("value", ["srun --nodes=2", ["srun", 2], {"srun": 1}])
def test_a_trial_launcher_that_is_no_list_of_words_is_refused_in_one_line(value):
    with pytest.raises(ConfigError, match=r"^trainer.trial_launcher must be a list of words"):
        trial_launcher(OmegaConf.create({"trial_launcher": value}))


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["cpu", "ddp_cpu"])
def test_a_sweep_worker_that_srun_started_runs_exactly_its_trials(trainer, tiny_prepared, tmp_path):
    # Worker 1 of a two-node SLURM job, one task per node: each trial is a job of its node
    # alone, in process (cpu) or with two ranks that Lightning's launcher starts (ddp_cpu),
    # never a rank waiting for the other worker.
    command = sweep_command(
        tmp_path,
        tiny_prepared,
        *CNN,
        *TINY,
        f"trainer={trainer}",
        "++trainer.process_group_timeout_s=30",  # bounds a trial that would wait for worker 0
        "hydra.sweeper.n_trials=2",
    )
    env = srun_env(rank=1, port=free_port(), tasks=2, nodes=2, SLURM_JOB_NAME="sweep")
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )

    assert result.returncode == 0, result.stderr[-3000:]
    study = load_study(tmp_path, "cnn_optuna")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert [t.number for t in study.trials] == [0, 1]
    # A DDP trial trained in a launched child whose rank 0 recorded the outcome.
    launched = [(tmp_path / f"sweep/trial_{n}" / OUTCOME_FILE).is_file() for n in (0, 1)]
    assert launched == [trainer == "ddp_cpu"] * 2


@pytest.mark.slow
def test_a_sweep_trial_on_two_nodes_is_one_job_whose_ranks_its_launcher_starts(
    tiny_prepared, tmp_path
):
    # trainer.trial_launcher starts each trial's ranks together, as srun does inside the
    # sweep's allocation (tests/fake_srun.py): one task per node, two nodes.
    launcher = [sys.executable, str(TESTS / "fake_srun.py"), "--nodes=2", "--ntasks-per-node=1"]
    probe = tmp_path / "probe"
    command = sweep_command(
        tmp_path,
        tiny_prepared,
        *CNN,
        *TINY,
        "trainer=ddp_cpu",
        "trainer.num_nodes=2",
        "trainer.devices=1",
        "trainer.trial_launcher=[" + ",".join(f"'{word}'" for word in launcher) + "]",
        "trainer.process_group_timeout_s=60",
        "hydra.sweeper.n_trials=2",
        "+callbacks.extra.probe._target_=cluster_probe.RankProbe",
        f"+callbacks.extra.probe.out={probe}",
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )

    assert result.returncode == 0, result.stderr[-3000:]
    study = load_study(tmp_path, "cnn_optuna")
    assert [(t.number, t.state) for t in study.trials] == [
        (0, TrialState.COMPLETE),
        (1, TrialState.COMPLETE),
    ]
    _, _, children = mlflow_runs(tmp_path, study)
    assert len(children) == 2  # one MLflow run a trial, not one a rank
    for trial in (0, 1):  # rank 0's run directory, the trial's own
        assert (
            json.loads((tmp_path / f"sweep/trial_{trial}/run.json").read_text())["status"]
            == "finished"
        )
    # The last trial's two ranks: bit-identical replicas, each validation cell scored once.
    first, second = (json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1))
    assert first["params"] == second["params"]
    shard_0, shard_1 = first["validation"][-1], second["validation"][-1]
    assert sorted(shard_0 + shard_1) == list(range(validation_cells(tiny_prepared)))
