"""Start a job's ranks on this machine as ``srun`` or ``torchrun`` would, and end them all.

``srun`` starts every task at once with its SLURM variables and no launcher in between;
``torchrun --nnodes 2`` is started once per node and forms one job through its c10d rendezvous.
Each rank (or node agent) runs in its own process group, so that ending it ends its children.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
TIMEOUT_S = 300  # bounds a failing or hanging job only
POLL_S = 0.2  # how often to look for an event a rank writes (its timing decides nothing)
JOB_ID = "4242"


def srun_env(rank: int, port: int, tasks: int = 2, nodes: int = 2, **extra: str) -> dict[str, str]:
    """The variables ``srun`` gives task ``rank`` of ``tasks`` over ``nodes`` nodes."""
    per_node = tasks // nodes
    slurm = {
        "SLURM_PROCID": rank,
        "SLURM_LOCALID": rank % per_node,
        "SLURM_NODEID": rank // per_node,
        "SLURM_NTASKS": tasks,
        "SLURM_NTASKS_PER_NODE": per_node,
        "SLURM_NNODES": nodes,
        "SLURM_JOB_NAME": "train",
        "SLURM_NODELIST": f"node[0-{nodes - 1}]",
        "SLURM_JOB_ID": JOB_ID,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
    }
    return {**os.environ, **{k: str(v) for k, v in slurm.items()}, **extra}


def torchrun_command(node: int, port: int, nodes: int = 2) -> list[str]:
    """``torchrun`` for one of ``nodes`` nodes of one rank each, meeting at 127.0.0.1:``port``."""
    return [
        str(Path(sys.executable).with_name("torchrun")),
        f"--nnodes={nodes}",
        f"--node-rank={node}",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
    ]


class Ranks:
    """The processes a test started; all of them are ended (their groups killed) at teardown."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def start(self, command: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        env = dict(env or os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
        log = self.cwd / f"process_{len(self.processes)}.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                list(command),
                cwd=self.cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(process)
        self.logs.append(log)
        return process

    def wait(self, timeout: float = TIMEOUT_S) -> list[int]:
        """Every process's exit status; one still running after ``timeout`` fails the test."""
        try:
            return [process.wait(timeout) for process in self.processes]
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job hung: still running after {timeout} s\n{self.tails()}")

    def wait_for(self, path: Path, timeout: float = TIMEOUT_S) -> None:
        """Return once ``path`` exists (a rank's event); fail if a process ended before it."""
        deadline = time.monotonic() + timeout
        while not path.exists():
            ended = [p.args for p in self.processes if p.poll() is not None]
            assert not ended and time.monotonic() < deadline, f"no {path}\n{self.tails()}"
            time.sleep(POLL_S)

    def kill(self, process: subprocess.Popen) -> None:
        """End ``process`` and its children (its process group) at once, and reap it."""
        with contextlib.suppress(ProcessLookupError):  # the whole group has ended
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def tails(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in self.logs)


def started_in(cwd: Path) -> Iterator[Ranks]:
    """The body of a ``ranks`` fixture: the processes of a test, every one ended after it."""
    started = Ranks(cwd)
    yield started
    for process in started.processes:
        started.kill(process)
