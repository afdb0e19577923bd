"""A sweep whose trials train with DDP: only the sweep's process talks to Optuna."""

import subprocess

import pytest
from cluster_jobs import srun_env
from optuna.trial import TrialState
from test_sweeps_e2e import CNN, TIMEOUT_S, TINY, load_study, sweep_command

from bench.serving import free_port
from leukemia_mlops.training.launch import OUTCOME_FILE, launches_processes


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
