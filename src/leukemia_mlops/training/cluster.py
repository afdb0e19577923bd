"""Ranks that a cluster launcher starts together: their checks, their roll call, their group.

``torchrun`` and SLURM's ``srun`` start every rank of a job at once (Lightning's own DDP
launcher instead starts ranks 1..N from rank 0). Such ranks join the process group before
anything else (:func:`join_group`), so that rank 0 alone decides the run and touches shared
state and the others receive its decision. Each rank answers a roll call on joining: a rank
that never joins ends the job within ``trainer.process_group_timeout_s``, named by rank 0; one
that ends later is named by the others' roll calls in training
(:mod:`~leukemia_mlops.training.attendance`).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning_fabric.plugins.environments import (
    ClusterEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)

from leukemia_mlops.errors import ConfigError
from leukemia_mlops.training.attendance import Attendance, JobError

#: The ``trainer.*`` key (conf/trainer/ddp*.yaml) that bounds the wait for the other ranks.
TIMEOUT_KEY = "process_group_timeout_s"
#: The ``trainer.*`` key of the command that starts a sweep trial's ranks on several nodes
#: (:mod:`~leukemia_mlops.training.launch`), e.g. ``[srun, --kill-on-bad-exit=1]``.
LAUNCHER_KEY = "trial_launcher"
#: ``trainer.*`` keys of the project's own, not Lightning Trainer arguments.
PROJECT_TRAINER_KEYS = (TIMEOUT_KEY, LAUNCHER_KEY)
DEFAULT_TIMEOUT = timedelta(minutes=30)  # torch's own, where the trainer config sets none
#: SLURM job names that make Lightning ignore SLURM (its interactive mode).
IGNORED_JOB_NAMES = ("bash", "interactive")
#: What a rank other than 0 of ranks started together gives Hydra: no run directory, ``.hydra/``
#: or log file of its own (it logs to its output); rank 0's run directory is the run's.
FOLLOWER_HYDRA_OVERRIDES = (
    "hydra.run.dir=.",
    "hydra.output_subdir=null",
    "hydra/job_logging=stdout",
)
#: SLURM's variables that make a process one task of a multi-task job (Lightning reads them).
SLURM_TASK_VARIABLES = ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID")
_ROLL_CALL = "leukemia_mlops/roll_call"
_ATTENDANCE = "attendance"  # rank 0's store for the roll calls in training: "host port"


def external_environment() -> ClusterEnvironment | None:
    """The launcher that started this job's ranks at once (SLURM first, as Lightning picks),
    or None: a process alone (a one-task SLURM job too), or one Lightning's launcher runs."""
    if SLURMEnvironment.detect():
        environment: ClusterEnvironment = SLURMEnvironment()
    elif TorchElasticEnvironment.detect():
        environment = TorchElasticEnvironment()
    else:
        return None
    return environment if environment.world_size() > 1 else None


def leave_slurm_job() -> None:
    """Make this process no SLURM task: a sweep worker (one task per node) runs its trials as
    jobs of its node alone, in process or with ranks that Lightning's launcher starts, never as
    ranks of the SLURM job that started the workers."""
    for name in SLURM_TASK_VARIABLES:
        os.environ.pop(name, None)


def hydra_overrides(argv: list[str]) -> list[str]:
    """The overrides a single Hydra run adds to ``argv`` on this rank: none on rank 0, and
    :data:`FOLLOWER_HYDRA_OVERRIDES` on the others that torchrun or srun started."""
    environment = external_environment()
    multirun = "-m" in argv or "--multirun" in argv
    if environment is None or multirun or environment.global_rank() == 0:
        return []
    return list(FOLLOWER_HYDRA_OVERRIDES)


def check_launch(trainer: Mapping[str, Any]) -> None:
    """Stop with one line when the launch cannot give the trainer config its ranks.

    Several nodes need ranks that torchrun or srun started together (:func:`join_group`).
    Lightning takes its world from ``SLURM_NTASKS``: tasks that are not ``num_nodes x devices``
    processes wait for each other forever; a job named ``bash`` or ``interactive`` makes it
    ignore SLURM, and every task would then start a job of its own.
    """
    tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    name = os.environ.get("SLURM_JOB_NAME")
    if tasks > 1 and name in IGNORED_JOB_NAMES:
        raise ConfigError(
            f"SLURM job name {name!r} makes Lightning ignore SLURM's {tasks} tasks: name the "
            "job otherwise (#SBATCH --job-name=train, or srun --job-name=train)"
        )
    nodes = trainer.get("num_nodes", 1)
    if nodes > 1 and external_environment() is None:
        raise ConfigError(
            f"trainer.num_nodes={nodes} needs every node's ranks started by torchrun or srun "
            "(scripts/torchrun_train.sh, scripts/slurm/train.sbatch; a sweep's trials: "
            f"trainer.{LAUNCHER_KEY}): Lightning's own launcher "
            "on each node (NODE_RANK) would let every node open the MLflow store and decide "
            "the run on its own"
        )
    if tasks < 2:
        return
    devices = trainer.get("devices", 1)
    if isinstance(devices, list | tuple):
        devices = len(devices)
    if isinstance(devices, int) and devices > 0 and nodes * devices != tasks:
        raise ConfigError(
            f"SLURM started {tasks} tasks (SLURM_NTASKS) but trainer.num_nodes x "
            f"trainer.devices is {nodes} x {devices} = {nodes * devices}: set "
            "trainer.num_nodes to the job's --nodes and trainer.devices to its --ntasks-per-node"
        )


def join_group(environment: ClusterEnvironment, timeout_s: float | None) -> Attendance:
    """Join the job's process group (Lightning keeps it), after a roll call of its ranks;
    returns this rank's part, answering, in the roll calls in training (in a store rank 0
    hosts).

    Rank 0 hosts the rendezvous store (under torchrun its agent does) and waits at most
    ``timeout_s`` for every rank to answer; the others wait as long for rank 0's store.
    """
    rank, world = environment.global_rank(), environment.world_size()
    timeout = timedelta(seconds=timeout_s) if timeout_s else DEFAULT_TIMEOUT
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    address, port = environment.main_address, environment.main_port
    try:
        store = dist.TCPStore(
            address,
            port,
            world,
            is_master=rank == 0 and not agent_store,
            timeout=timeout,
            wait_for_workers=False,
        )
    except dist.DistError as err:
        raise JobError(
            f"rank {rank}: rank 0 did not open the job's store at {address}:{port} within "
            f"{timeout.total_seconds():.0f} s ({TIMEOUT_KEY})"
        ) from err
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun's store outlives one
    roll = dist.PrefixStore(f"{_ROLL_CALL}/{attempt}", store)
    roll.set(str(rank), "")
    try:
        roll.wait([str(r) for r in range(world)], timeout)
    except dist.DistError as err:
        raise JobError(
            f"rank {rank}: rank(s) {_absent(roll, world)} of {world} did not join the job "
            f"within {timeout.total_seconds():.0f} s ({TIMEOUT_KEY}): see their logs"
        ) from err
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    if agent_store:
        store = _rank_zero_store(roll, rank, world, address)
    attendance = Attendance(
        dist.PrefixStore(f"{_ROLL_CALL}/{attempt}/training", store), rank, world
    )
    attendance.start()
    return attendance


def _rank_zero_store(roll: dist.Store, rank: int, world: int, address: str) -> dist.Store:
    """A store that rank 0 hosts where torchrun's agent hosts the job's store (an agent ends
    with its node's ranks, and the others could no longer call the roll)."""
    if rank == 0:
        host = _reachable_address(address)
        own = dist.TCPStore(host, 0, world, is_master=True, wait_for_workers=False)
        roll.set(_ATTENDANCE, f"{host} {own.port}")
        return own
    host, port = roll.get(_ATTENDANCE).decode().split()
    return dist.TCPStore(host, int(port), world, is_master=False)


def _reachable_address(store_host: str) -> str:
    """This host's address as the job's other hosts reach it: that of the interface routing to
    the job's store, or the store host's own name where that is this host (a loopback route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((store_host, 9))  # a datagram socket sends nothing on connect
        own = probe.getsockname()[0]
    return store_host if ipaddress.ip_address(own).is_loopback else own


def _absent(roll: dist.Store, world: int) -> str:
    """The ranks that did not answer the roll call (rank 0 when its store is gone)."""
    try:
        return ", ".join(str(r) for r in range(world) if not roll.check([str(r)]))
    except dist.DistError:
        return "0 (the job's store went with it)"
