"""Launch settings of ranks that SLURM or torchrun start: checked before anything is touched."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cluster_jobs import JOB_ID, srun_env

from leukemia_mlops.errors import ConfigError
from leukemia_mlops.training.cluster import (
    FOLLOWER_HYDRA_OVERRIDES,
    SLURM_TASK_VARIABLES,
    check_launch,
    external_environment,
    hydra_overrides,
    leave_slurm_job,
)

SLURM_VARIABLES = ("SLURM_NTASKS", "SLURM_JOB_NAME", "SLURM_PROCID", "RANK")


@pytest.fixture
def slurm(monkeypatch: pytest.MonkeyPatch):
    """Set this process's variables to those of an srun task (``srun_env``)."""

    def enter(rank: int = 0, tasks: int = 2, nodes: int = 2, **extra: str) -> None:
        for name, value in srun_env(rank, 29500, tasks, nodes, **extra).items():
            monkeypatch.setenv(name, value)

    for name in SLURM_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return enter


@pytest.mark.parametrize(
    ("trainer", "tasks", "nodes"),
    [
        ({"num_nodes": 2, "devices": 1}, 2, 2),
        ({"num_nodes": 1, "devices": 2}, 2, 1),
        ({"num_nodes": 2, "devices": [0, 1]}, 4, 2),
        ({"num_nodes": 2, "devices": -1}, 4, 2),  # Lightning counts the node's devices
    ],
)
def test_tasks_that_match_the_trainer_pass(slurm, trainer, tasks, nodes):
    slurm(tasks=tasks, nodes=nodes)
    check_launch(trainer)


@pytest.mark.parametrize(
    ("trainer", "tasks", "extra", "message"),
    [
        (
            {"num_nodes": 1, "devices": 1},
            2,
            {},
            r"^SLURM started 2 tasks \(SLURM_NTASKS\) but trainer.num_nodes x trainer.devices "
            r"is 1 x 1 = 1: set trainer.num_nodes to the job's --nodes and trainer.devices to "
            r"its --ntasks-per-node$",
        ),
        (
            {"num_nodes": 2, "devices": 2},
            2,
            {},
            r"^SLURM started 2 tasks .* is 2 x 2 = 4: set",
        ),
        (
            {"num_nodes": 2, "devices": 1},
            2,
            {"SLURM_JOB_NAME": "bash"},
            r"^SLURM job name 'bash' makes Lightning ignore SLURM's 2 tasks: name the job "
            r"otherwise \(#SBATCH --job-name=train, or srun --job-name=train\)$",
        ),
        (
            {"num_nodes": 2, "devices": 1},
            2,
            {"SLURM_JOB_NAME": "interactive"},
            r"^SLURM job name 'interactive' makes Lightning ignore",
        ),
    ],
)
def test_settings_that_disagree_are_one_line_naming_what_to_set(
    slurm, trainer, tasks, extra, message
):
    slurm(tasks=tasks, **extra)
    with pytest.raises(ConfigError, match=message) as raised:
        check_launch(trainer)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("node_rank", [None, "0", "1"])
def test_nodes_that_no_torchrun_or_srun_started_are_refused(slurm, monkeypatch, node_rank):
    # Lightning's own launcher on each node: every node would decide the run on its own.
    if node_rank is not None:
        monkeypatch.setenv("NODE_RANK", node_rank)
    with pytest.raises(ConfigError, match=r"^trainer.num_nodes=2 needs every node's ranks st") as e:
        check_launch({"num_nodes": 2, "devices": 2})
    assert "a sweep's trials: trainer.trial_launcher" in str(e.value)  # what a sweep sets
    check_launch({"num_nodes": 1, "devices": 2})  # one node: Lightning starts its ranks


def test_one_task_is_no_multi_process_job(slurm):
    slurm(tasks=1, nodes=1, SLURM_JOB_NAME="bash")  # an interactive shell's single task
    check_launch({"num_nodes": 1, "devices": 2})


def test_the_training_command_stops_with_the_line_and_status_2(tiny_prepared, tmp_path):
    command = [
        sys.executable,
        "-m",
        "leukemia_mlops.train",
        "trainer=ddp_cpu",
        f"paths.prepared_dir={tiny_prepared}",
        f"paths.mlruns_dir={tmp_path / 'mlruns'}",
        "data.prepare.image_size=48",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = srun_env(0, 29500, tasks=4, nodes=2)
    result = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        "error: SLURM started 4 tasks (SLURM_NTASKS) but trainer.num_nodes x trainer.devices "
        "is 1 x 2 = 2: set trainer.num_nodes to the job's --nodes and trainer.devices to its "
        "--ntasks-per-node"
    ]
    assert not (tmp_path / "mlruns").exists()  # stopped before touching the store


@pytest.mark.parametrize(
    ("variables", "argv", "overrides"),
    [
        ({"SLURM_PROCID": "1"}, [], list(FOLLOWER_HYDRA_OVERRIDES)),
        ({"SLURM_PROCID": "0"}, [], []),
        ({"SLURM_PROCID": "1"}, ["-m", "hparams_search=cnn_optuna"], []),
        ({"SLURM_PROCID": "1", "SLURM_JOB_NAME": "interactive"}, [], []),
    ],
)
def test_only_rank_zero_of_ranks_started_together_writes_hydra_files(
    slurm, variables, argv, overrides
):
    slurm(rank=int(variables.pop("SLURM_PROCID")), **variables)
    assert hydra_overrides(argv) == overrides


def test_a_process_started_alone_keeps_its_hydra_files(slurm):
    assert hydra_overrides([]) == []


def test_a_one_task_slurm_job_is_a_process_alone(slurm):
    slurm(tasks=1, nodes=1)
    assert external_environment() is None  # no process group to form
    slurm(tasks=2, nodes=2)
    assert external_environment().world_size() == 2


def test_a_sweep_workers_trial_is_no_slurm_task(slurm):
    # Worker 3 of 4 (one per node): its trial's ranks are the node's, started by Lightning.
    slurm(rank=3, tasks=4, nodes=4)
    leave_slurm_job()
    assert not set(SLURM_TASK_VARIABLES) & set(os.environ)
    assert os.environ["SLURM_JOB_ID"] == JOB_ID and os.environ["MASTER_PORT"] == "29500"
    assert external_environment() is None
