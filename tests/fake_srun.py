"""``srun`` inside an allocation, on one machine: ``fake_srun.py --nodes=N --ntasks-per-node=K
[--kill-on-bad-exit=1] COMMAND...`` starts N x K tasks of COMMAND at once, each with the
variables srun gives it (``cluster_jobs.srun_env``) and a free port for their job. As
``--kill-on-bad-exit=1`` asks, the first task that fails ends the others; the exit status is
that task's (0 when all succeed)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from cluster_jobs import srun_env


def main(argv: list[str]) -> int:
    options = {}
    while argv and argv[0].startswith("--"):
        key, _, value = argv.pop(0)[2:].partition("=")
        options[key] = value
    nodes, per_node = int(options["nodes"]), int(options["ntasks-per-node"])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tasks = {
        subprocess.Popen(argv, env=srun_env(rank, port, nodes * per_node, nodes)).pid: rank
        for rank in range(nodes * per_node)
    }
    status = 0
    while tasks:
        pid, wait_status = os.wait()
        tasks.pop(pid, None)
        code = os.waitstatus_to_exitcode(wait_status)
        if code != 0 and status == 0:
            status = code if code > 0 else 128 - code
            for other in tasks:
                os.kill(other, signal.SIGKILL)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
