"""Training that starts several processes (DDP), run apart from the process that asked for it.

Lightning starts DDP ranks 1..N by re-running the command line. Inside a Hydra multirun that
command holds ``-m``, so every rank would start a sweep of its own and ask Optuna for other
trials. A sweep job whose trainer needs several processes therefore trains in a child,
``python -m leukemia_mlops.training.launch CONFIG RUN_DIR``, whose command line is safe to
re-run: its ranks all read the same resolved config. Under SLURM the sweep worker has left
the job (:func:`~leukemia_mlops.training.cluster.leave_slurm_job`), so Lightning's launcher
starts the node's ranks; a trial on several nodes (``trainer.num_nodes``) needs its ranks
started together instead: ``trainer.trial_launcher`` is the command put before the child's
(``[srun, --kill-on-bad-exit=1]`` inside the sweep's allocation), and its ranks join as one
job (:func:`~leukemia_mlops.training.cluster.join_group`).
Rank 0 reports to the trial through the study's storage and writes the outcome; the sweep's
process alone talks to the sampler.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import yaml
from omegaconf import DictConfig, OmegaConf

from leukemia_mlops.errors import ConfigError
from leukemia_mlops.files import write_json, write_text
from leukemia_mlops.training.cluster import LAUNCHER_KEY

OUTCOME_FILE = "outcome.json"
CONFIG_FILE = "launch_config.yaml"


def launches_processes(trainer: DictConfig | dict[str, Any]) -> bool:
    """Whether Lightning would start more processes for this trainer config."""
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    strategy = str(trainer.get("strategy", "auto"))
    return (devices not in (1, "1") or nodes != 1) and "spawn" not in strategy


def trial_launcher(trainer: DictConfig) -> list[str]:
    """The words of ``trainer.trial_launcher`` (none when it is null)."""
    words = trainer.get(LAUNCHER_KEY)
    if words is None:
        return []
    if not OmegaConf.is_list(words) or not all(isinstance(word, str) for word in words):
        raise ConfigError(
            f"trainer.{LAUNCHER_KEY} must be a list of words, e.g. "
            f"[srun,'--kill-on-bad-exit=1'], got {words!r}"
        )
    return list(words)


def train_in_child(cfg: DictConfig, run_dir: str | Path) -> float:
    """Run :func:`run_training` in a child process; returns its best score or re-raises pruning."""
    run_dir = Path(run_dir)
    config = run_dir / CONFIG_FILE
    write_text(config, OmegaConf.to_yaml(cfg, resolve=True))
    (run_dir / OUTCOME_FILE).unlink(missing_ok=True)
    launcher = trial_launcher(cfg.trainer)
    child = [sys.executable, "-m", "leukemia_mlops.training.launch", str(config), str(run_dir)]
    finished = subprocess.run([*launcher, *child], check=False)
    outcome_file = run_dir / OUTCOME_FILE
    if finished.returncode != 0 or not outcome_file.is_file():
        raise RuntimeError(f"training in {run_dir} failed (exit status {finished.returncode})")
    outcome = json.loads(outcome_file.read_text())
    if outcome["pruned"]:
        raise optuna.TrialPruned(outcome["message"])
    return float(outcome["best"])


def main(argv: list[str] | None = None) -> None:
    """The child: train from a resolved config file; rank 0 records the outcome."""
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    from leukemia_mlops.training.run import run_training

    config, run_dir = (argv or sys.argv[1:])[:2]
    cfg = OmegaConf.create(yaml.safe_load(Path(config).read_text()))
    try:
        outcome = {"pruned": False, "best": run_training(cfg, run_dir)}
    except optuna.TrialPruned as pruned:
        outcome = {"pruned": True, "message": str(pruned)}
    if rank_zero_only.rank == 0:
        write_json(Path(run_dir) / OUTCOME_FILE, outcome)


if __name__ == "__main__":
    main()
