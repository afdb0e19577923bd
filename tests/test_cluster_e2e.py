"""Multi-node training on one machine: ranks started as ``srun`` and ``torchrun --nnodes 2`` do.

Each job is a tiny Hydra training run over gloo. Its ranks carry a probe callback
(``cluster_probe.RankProbe``), and each rank records the files it opens in the MLflow store's
folder (``store_audit/sitecustomize.py``). A failing job is bounded by
``cluster_jobs.TIMEOUT_S``; nothing waits a set time for something to happen.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
from cluster_jobs import TESTS, Ranks, srun_env, started_in, torchrun_command
from cluster_probe import PLANTED
from mlflow import MlflowClient

from bench.serving import free_port
from leukemia_mlops.config import write_params
from leukemia_mlops.data.prepare import MANIFEST_FILE
from leukemia_mlops.tracking.store import tracking_uri
from leukemia_mlops.training.preemption import REQUEUE_EXIT

pytestmark = pytest.mark.slow

TRAIN = ["-m", "leukemia_mlops.train"]


@pytest.fixture
def ranks(tmp_path: Path) -> Iterator[Ranks]:
    yield from started_in(tmp_path)


def training(prepared: Path, tmp_path: Path, rank_variable: str, *overrides: str) -> list[str]:
    """A one-epoch run of two processes, one per node, whose run directory would differ by rank
    (``$rank_variable``, as two ranks' ``${now}`` can) were rank 0's not the run's."""
    return [
        "trainer=ddp_cpu",
        "trainer.num_nodes=2",
        "trainer.devices=1",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.process_group_timeout_s=60",
        f"paths.prepared_dir={prepared}",
        f"paths.mlruns_dir={tmp_path / 'mlruns'}",
        "data.prepare.image_size=48",
        "datamodule.batch_size=8",
        "datamodule.num_workers=0",
        "logger.mlflow.log_model=false",
        f"hydra.run.dir=run_${{oc.env:{rank_variable}}}",
        "+callbacks.extra.probe._target_=cluster_probe.RankProbe",
        f"+callbacks.extra.probe.out={tmp_path / 'probe'}",
        *overrides,
    ]


def audited(env: dict[str, str], tmp_path: Path, process: str) -> dict[str, str]:
    """``env`` with the store audit on: files opened under mlruns/ go to
    ``store_<process>.log``."""
    return {
        **env,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(TESTS / "store_audit"), os.environ.get("PYTHONPATH")])
        ),
        "STORE_AUDIT_DIR": str(tmp_path / "mlruns"),
        "STORE_AUDIT_LOG": str(tmp_path / f"store_{process}.log"),
    }


def start_srun(
    ranks: Ranks, prepared: Path, tmp_path: Path, *overrides: str, tasks: int = 2
) -> list:
    port = free_port()
    command = [sys.executable, *TRAIN, *training(prepared, tmp_path, "SLURM_PROCID", *overrides)]
    return [
        ranks.start(command, audited(srun_env(rank, port, tasks), tmp_path, f"job_rank{rank}"))
        for rank in range(tasks)
    ]


def start_torchrun(
    ranks: Ranks, prepared: Path, tmp_path: Path, *overrides: str, launch: str = "job"
) -> list:
    port = free_port()
    command = [*TRAIN, *training(prepared, tmp_path, "RANK", *overrides)]
    # c10d numbers the ranks in the order they join: either node's process may be rank 0.
    return [
        ranks.start(
            [*torchrun_command(node, port), *command],
            audited({}, tmp_path, f"{launch}_node{node}"),
        )
        for node in range(2)
    ]


def validation_cells(prepared: Path) -> int:
    manifest = pd.read_parquet(prepared / MANIFEST_FILE)
    return int((manifest["split"] == "val").sum())


def assert_one_run(tmp_path: Path, prepared: Path, launch: str = "job") -> dict:
    """The job trained one run: rank 0's run directory (Hydra's files written once) and
    :func:`assert_trained_as_one`. Returns the finished run's state."""
    assert sorted(p.name for p in tmp_path.glob("run_*")) == ["run_0"]
    run_dir = tmp_path / "run_0"
    state = json.loads((run_dir / "run.json").read_text())
    assert (run_dir / ".hydra/config.yaml").is_file() and (run_dir / "train.log").is_file()
    assert_trained_as_one(tmp_path, prepared, state, launch)
    return state


def assert_trained_as_one(tmp_path: Path, prepared: Path, state: dict, launch: str) -> None:
    """The run of ``state`` finished as the one MLflow run of a store that one process of the
    ``launch`` opened, with bit-identical replicas and every validation cell scored once over
    the ranks."""
    assert state["status"] == "finished"
    client = MlflowClient(tracking_uri(None, tmp_path / "mlruns"))
    run = client.get_run(state["mlflow_run_id"])
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [
        run.info.run_id
    ]
    assert len(list(tmp_path.glob(f"store_{launch}_*.log"))) == 1, "one rank opens the store"
    first, second = (json.loads((tmp_path / f"probe/rank{r}.json").read_text()) for r in (0, 1))
    assert first["params"] == second["params"]
    shard_0, shard_1 = first["validation"][-1], second["validation"][-1]  # the last epoch
    assert not set(shard_0) & set(shard_1)
    assert sorted(shard_0 + shard_1) == list(range(validation_cells(prepared)))


def test_two_torchrun_nodes_train_one_run(ranks, tiny_prepared, tmp_path):
    start_torchrun(ranks, tiny_prepared, tmp_path)

    assert ranks.wait() == [0, 0], ranks.tails()
    assert_one_run(tmp_path, tiny_prepared)


def test_two_torchrun_nodes_run_the_train_stage_as_one_run(
    ranks, tiny_config, tiny_prepared, tmp_path
):
    overrides = [o for o in training(tiny_prepared, tmp_path, "RANK") if "hydra." not in o]
    write_params(tiny_config(*overrides), tmp_path / "params.yaml")
    port = free_port()
    for node in range(2):
        stage = ["-m", "leukemia_mlops.cli.train", "--params", "params.yaml"]
        ranks.start([*torchrun_command(node, port), *stage], audited({}, tmp_path, f"job_{node}"))

    assert ranks.wait() == [0, 0], ranks.tails()
    run_dir, reports = tmp_path / "models/model", tmp_path / "reports"
    state = json.loads((run_dir / "run.json").read_text())
    assert_trained_as_one(tmp_path, tiny_prepared, state, "job")
    assert (reports / "train_model.json").read_text() == (run_dir / "metrics.json").read_text()


def test_torchrun_nodes_killed_in_training_resume_from_the_last_checkpoint(
    ranks, tiny_prepared, tmp_path
):
    job = [
        "trainer.max_epochs=2",
        "+callbacks.extra.probe.hold_rank=1",
        "+callbacks.extra.probe.hold_epoch=1",
    ]
    start_torchrun(ranks, tiny_prepared, tmp_path, *job)
    held = tmp_path / "probe/epoch1.rank1"  # rank 1 ended epoch 1, epoch 0's checkpoint saved
    ranks.wait_for(held)
    os.kill(int(held.read_text()), signal.SIGKILL)  # its node's training process dies

    assert 0 not in ranks.wait(), ranks.tails()  # both nodes' torchrun end, neither hangs
    survivor = "\n".join(log.read_text() for log in ranks.logs)
    assert "error: rank 0: rank(s) 1 ended during training (rank 1: no word within" in survivor
    run_dir = tmp_path / "run_0"
    interrupted = json.loads((run_dir / "run.json").read_text())
    assert interrupted["status"] == "running"
    saved = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert saved["epoch"] == 0

    (tmp_path / "probe/release").touch()
    start_torchrun(ranks, tiny_prepared, tmp_path, *job, launch="resumed")  # both nodes again

    assert ranks.wait()[2:] == [0, 0], ranks.tails()
    assert any("Restoring states from the checkpoint" in log.read_text() for log in ranks.logs[2:])
    state = assert_one_run(tmp_path, tiny_prepared, launch="resumed")
    assert state == {**interrupted, "status": "finished"}  # the same MLflow run, finished
    client = MlflowClient(tracking_uri(None, tmp_path / "mlruns"))
    # One value an epoch (epoch 1's, lost with the kill, came again after the resume) ...
    epoch_0, epoch_1 = client.get_metric_history(state["mlflow_run_id"], "val/auroc")
    # ... epoch 1 trained from the step epoch 0's checkpoint saved, not from step 0.
    assert epoch_1.step == epoch_0.step + saved["global_step"] > saved["global_step"]


def error_lines(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("error: ")]


def test_a_rank_that_dies_at_start_up_ends_the_job_naming_it(ranks, tiny_prepared, tmp_path):
    _, rank_1 = start_srun(ranks, tiny_prepared, tmp_path, "trainer.process_group_timeout_s=10")
    ranks.kill(rank_1)  # before it could join the job

    assert ranks.wait() == [2, -9], ranks.tails()
    assert error_lines(ranks.logs[0]) == [
        "error: rank 0: rank(s) 1 of 2 did not join the job within 10 s "
        "(process_group_timeout_s): see their logs"
    ]
    assert not (tmp_path / "run_0/run.json").exists()  # no run was started


def test_a_rank_that_dies_in_training_ends_the_job_naming_it(ranks, tiny_prepared, tmp_path):
    _, rank_1 = start_srun(
        ranks, tiny_prepared, tmp_path, "trainer.max_epochs=3", "+callbacks.extra.probe.hold_rank=1"
    )
    ranks.wait_for(tmp_path / "probe/epoch0.rank1")  # rank 1 ended its first epoch and waits
    ranks.kill(rank_1)

    assert ranks.wait() == [2, -9], ranks.tails()
    [line] = error_lines(ranks.logs[0])
    assert line.startswith(
        "error: rank 0: rank(s) 1 ended during training (rank 1: no word within 10 s "
        "(killed, or its host lost); here: "
    ), line
    state = json.loads((tmp_path / "run_0/run.json").read_text())
    assert state["status"] == "running"  # resumable from its last checkpoint


def test_a_rank_that_fails_in_training_is_named_with_its_error_by_the_others(
    ranks, tiny_prepared, tmp_path
):
    start_srun(ranks, tiny_prepared, tmp_path, "+callbacks.extra.probe.fail_rank=1")

    assert ranks.wait() == [2, 1], ranks.tails()
    [line] = error_lines(ranks.logs[0])
    assert line.startswith(
        f"error: rank 0: rank(s) 1 ended during training (rank 1: RuntimeError: {PLANTED}; "
    ), line
    failed = ranks.logs[1].read_text()  # rank 1 raises its own error and names no other rank
    assert f"RuntimeError: {PLANTED}" in failed and not error_lines(ranks.logs[1])


def test_srun_ranks_preempted_and_requeued_train_one_run(ranks, tiny_prepared, tmp_path):
    job = ["trainer.max_epochs=2", "+callbacks.extra.probe.hold_rank=0"]
    started = start_srun(ranks, tiny_prepared, tmp_path, *job)
    ranks.wait_for(tmp_path / "probe/epoch0.rank0")  # rank 0 ended epoch 0 and waits there
    for process in started:  # SLURM signals every task of the job
        os.killpg(process.pid, signal.SIGUSR1)
    (tmp_path / "probe/release").touch()

    assert ranks.wait() == [REQUEUE_EXIT, REQUEUE_EXIT], ranks.tails()
    assert "preempted: stopped by SIGUSR1 at epoch 1" in ranks.logs[0].read_text()
    run_dir = tmp_path / "run_0"
    preempted = json.loads((run_dir / "run.json").read_text())
    assert preempted["status"] == "running" and (run_dir / "checkpoints/last.ckpt").is_file()

    start_srun(ranks, tiny_prepared, tmp_path, *job)  # the requeued job

    assert ranks.wait()[2:] == [0, 0], ranks.tails()
    assert "Restoring states from the checkpoint" in ranks.logs[2].read_text()
    state = assert_one_run(tmp_path, tiny_prepared)
    assert state == {**preempted, "status": "finished"}  # the same MLflow run, finished
    client = MlflowClient(tracking_uri(None, tmp_path / "mlruns"))
    assert len(client.get_metric_history(state["mlflow_run_id"], "val/auroc")) == 2  # 1 a epoch


def test_a_run_rank_0_cannot_start_stops_every_rank_with_its_line(ranks, tiny_prepared, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    store = tmp_path / "a_file/mlruns"
    start_srun(ranks, tiny_prepared, tmp_path, f"paths.mlruns_dir={store}")

    assert ranks.wait() == [2, 2], ranks.tails()
    [line_0], [line_1] = (error_lines(log) for log in ranks.logs)
    assert str(store.parent) in line_0
    assert line_1 == f"error: rank 0 could not start the run: {line_0.removeprefix('error: ')}"
