"""The scripts users copy to a cluster launch what their resource lines ask for."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from cluster_jobs import srun_env

from leukemia_mlops.config import compose
from leukemia_mlops.training.cluster import check_launch
from leukemia_mlops.training.preemption import REQUEUE_EXIT

SCRIPTS = Path(__file__).parents[1] / "scripts"
README = Path(__file__).parents[1] / "README.md"


def sbatch_options(script: Path) -> dict[str, str]:
    """``#SBATCH --key=value`` lines as ``{key: value}``."""
    lines = re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", script.read_text(), re.MULTILINE)
    return {key: value for key, value in lines}


def launch_command(script: Path) -> list[str]:
    """The words of the script's ``python -m leukemia_mlops.train`` command (continued lines
    joined)."""
    text = script.read_text().replace("\\\n", " ")
    [line] = [line for line in text.splitlines() if "-m leukemia_mlops.train" in line]
    return shlex.split(line)


def trainer_of(command: list[str]) -> dict:
    """The trainer config that the command's ``trainer`` overrides compose."""
    overrides = [word for word in command if word.startswith("trainer")]
    return dict(compose(overrides).trainer)


def gpus(options: dict[str, str]) -> int:
    return int(re.fullmatch(r"gpu:(\d+)", options["gres"]).group(1))


def test_the_training_job_runs_one_task_per_gpu_of_its_trainer(monkeypatch):
    script = SCRIPTS / "slurm/train.sbatch"
    options, command = sbatch_options(script), launch_command(script)
    trainer = trainer_of(command)
    nodes, per_node = int(options["nodes"]), int(options["ntasks-per-node"])
    assert command[0] == "srun" and "trainer=ddp" in command
    assert (trainer["num_nodes"], trainer["devices"]) == (nodes, per_node)
    assert gpus(options) == per_node == trainer["devices"]
    # The tasks srun starts pass the training's own launch check.
    for name, value in srun_env(0, 29500, nodes * per_node, nodes).items():
        monkeypatch.setenv(name, value)
    check_launch(trainer)
    # Requeued on the time-limit warning: the run saves and exits with REQUEUE_EXIT.
    assert options["signal"] == "USR1@90" and "requeue" in options
    assert f'"$status" -eq {REQUEUE_EXIT} ]; then\n    scontrol requeue' in script.read_text()


def test_each_sweep_worker_trains_its_trials_on_its_nodes_gpus():
    script = SCRIPTS / "slurm/sweep.sbatch"
    options, command = sbatch_options(script), launch_command(script)
    trainer = trainer_of(command)
    # One worker (task) per node; Lightning starts each trial's ranks on the node's GPUs.
    assert command[:4] == ["python", "-m", "leukemia_mlops.train", "-m"]
    assert (options["nodes"], options["ntasks-per-node"]) == ("1", "1")
    assert trainer["num_nodes"] == 1 and trainer["devices"] == gpus(options) > 1
    assert any(word.startswith("hydra.sweeper.storage=") for word in command)


def test_a_multinode_sweep_starts_each_trials_ranks_over_its_allocation(monkeypatch):
    script = SCRIPTS / "slurm/sweep_multinode.sbatch"
    options, command = sbatch_options(script), launch_command(script)
    trainer = trainer_of(command)
    nodes, per_node = int(options["nodes"]), int(options["ntasks-per-node"])
    # The worker runs once (the batch step); srun starts each trial's ranks, one per GPU.
    assert command[:4] == ["python", "-m", "leukemia_mlops.train", "-m"]
    launcher = trainer["trial_launcher"]
    assert launcher[0] == "srun" and "--kill-on-bad-exit=1" in launcher
    assert {f"--nodes={nodes}", f"--ntasks-per-node={per_node}"} <= set(launcher)
    assert (trainer["num_nodes"], trainer["devices"]) == (nodes, per_node) == (nodes, gpus(options))
    assert any(word.startswith("hydra.sweeper.storage=") for word in command)
    # The ranks srun starts pass the training's own launch check.
    for name, value in srun_env(0, 29500, nodes * per_node, nodes).items():
        monkeypatch.setenv(name, value)
    check_launch(trainer)


@pytest.mark.parametrize(
    "script",
    [
        "slurm/train.sbatch",
        "slurm/sweep.sbatch",
        "slurm/sweep_multinode.sbatch",
        "torchrun_train.sh",
    ],
)
def test_the_readme_cluster_section_shows_each_script(script):
    section = README.read_text().split("## On a cluster", 1)[1].split("\n## ", 1)[0]
    assert f"scripts/{script}" in section
