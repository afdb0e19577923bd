"""``python -m leukemia_mlops.train [group=option ...] [-m]``: Hydra entry point for training.

Returns the best validation AUROC (the monitored metric), the objective of
``-m hparams_search=...`` sweeps.
A sweep job whose trainer starts several processes (DDP) trains in a child process (see
:mod:`leukemia_mlops.training.launch`), so that its ranks never re-run the multirun. A sweep
worker that srun started is no task of that SLURM job: each trial is a job of its node.
A single run stops on an expected failure (:func:`~leukemia_mlops.errors.expected_failure`,
e.g. ImageNet weights that are not cached, offline) with one ``error:`` line and status 2, and
on a bug with its traceback and status 1, as the stage commands do. A sweep's trial raises
either, for its sweeper to record the trial as failed.
Ranks that torchrun or srun start together write one Hydra run directory, rank 0's: the
others run without one (:func:`~leukemia_mlops.training.cluster.hydra_overrides`). A single
run stopped by SIGUSR1 or SIGTERM saves its checkpoint and exits with status 75, for the
batch script to requeue it (:mod:`~leukemia_mlops.training.preemption`).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from leukemia_mlops.config import CONF_DIR


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from leukemia_mlops.errors import exit_on_failure
    from leukemia_mlops.training.cluster import leave_slurm_job
    from leukemia_mlops.training.launch import launches_processes, train_in_child
    from leukemia_mlops.training.preemption import requeue_on_preemption
    from leukemia_mlops.training.run import run_training

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        leave_slurm_job()  # a sweep worker's trials are its node's, whatever srun started
        if launches_processes(cfg.trainer):
            return train_in_child(cfg, hydra_cfg.runtime.output_dir)
        return run_training(cfg, hydra_cfg.runtime.output_dir)
    try:
        with requeue_on_preemption():
            return run_training(cfg, hydra_cfg.runtime.output_dir)
    except Exception as err:  # Hydra would print a bug wrapped by instantiate without traceback
        exit_on_failure(err)


if __name__ == "__main__":
    import sys

    from leukemia_mlops.training.cluster import hydra_overrides

    sys.argv += hydra_overrides(sys.argv[1:])
    main()
