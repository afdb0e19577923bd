"""A sweep whose trials train with DDP: only the sweep's process talks to Optuna."""

import pytest
from optuna.trial import TrialState
from test_sweeps_e2e import CNN, TINY, load_study, run, sweep_command

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
def test_a_two_trial_sweep_under_ddp_runs_exactly_two_trials(tiny_prepared, tmp_path):
    command = sweep_command(
        tmp_path, tiny_prepared, *CNN, *TINY, "trainer=ddp_cpu", "hydra.sweeper.n_trials=2"
    )
    result = run(command, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load_study(tmp_path, "cnn_optuna")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert [t.number for t in study.trials] == [0, 1]
    # Each trial trained in a launched child whose rank 0 recorded the outcome.
    assert all((tmp_path / f"sweep/trial_{n}" / OUTCOME_FILE).is_file() for n in (0, 1))
