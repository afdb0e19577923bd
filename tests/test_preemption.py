"""Preemption in one process: a signal saves a resumable checkpoint, and the rerun resumes it.

SIGUSR1 across ranks started as ``srun`` starts them is in ``test_cluster_e2e.py``; here the
signal is SIGTERM (SLURM's preemption, torchrun's forwarded stop), sent by the run itself at the
end of an epoch (``signal_probe.SignalSelf``).
"""

from __future__ import annotations

import json
import re
import signal

import pytest
import torch
from mlflow import MlflowClient

from leukemia_mlops.tracking.store import tracking_uri
from leukemia_mlops.training.preemption import Preempted
from leukemia_mlops.training.run import run_training


def test_sigterm_saves_the_run_and_the_rerun_resumes_it(tiny_config, tmp_path):
    probe = ["+callbacks.extra.signal._target_=signal_probe.SignalSelf"]
    signalled = tiny_config(*probe, f"+callbacks.extra.signal.signum={int(signal.SIGTERM)}")
    run_dir = tmp_path / "run"
    handler = signal.getsignal(signal.SIGTERM)

    with pytest.raises(
        Preempted, match=r"^stopped by SIGTERM at epoch 1, step \d+: saved "
    ) as stop:
        run_training(signalled, run_dir)

    assert signal.getsignal(signal.SIGTERM) == handler  # the run's handler went with it
    preempted = json.loads((run_dir / "run.json").read_text())
    assert preempted["status"] == "running"
    saved = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    step = int(re.search(r"step (\d+)", str(stop.value)).group(1))
    assert (saved["epoch"], saved["global_step"]) == (1, step)  # mid-epoch 1, resumable there

    run_training(signalled, run_dir)  # the same run again (it resumes past epoch 0: no signal)

    state = json.loads((run_dir / "run.json").read_text())
    assert state == {**preempted, "status": "finished"}  # the same MLflow run, finished
    client = MlflowClient(tracking_uri(None, tmp_path / "mlruns"))
    epoch_0, epoch_1 = client.get_metric_history(state["mlflow_run_id"], "val/auroc")
    assert epoch_1.step > epoch_0.step
