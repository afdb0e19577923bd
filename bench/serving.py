"""The served model under load: ``mlflow models serve`` of a logged image model on 127.0.0.1,
K concurrent clients sending cell image files, one per request.

The server runs with one worker, as tested (``--env-manager local``); clients are threads of
this process posting with ``urllib``. Figures: throughput and latency percentiles per K, the
server's resident memory (its whole process tree) before the first request, after the first
tenth of them and after the last; and every answer's class (HTTP status, per-row error), so
that a lost or failed request shows. The slow test ``tests/test_serving_load.py`` runs the
same load at a smaller count and asserts the classes and the memory, never a latency.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # tests/servers.py takes free_port from here: no torch on import
    from bench.report import Section
    from bench.workspace import Workspace

TITLE = "Serving under load: `mlflow models serve` of the image model"
START_TIMEOUT_S = 120
REQUEST_TIMEOUT_S = 60
#: Concurrent clients of each load phase.
CLIENTS = (1, 4, 16)
#: Requests of a full run and of a quick one (the slow test sends 300); the first tenth warms
#: up.
REQUESTS, QUICK_REQUESTS = 2000, 60
#: Cell image files the requests take in turn.
CELL_FILES = 16
#: The most the server's memory may grow from the first tenth of the requests to the last.
RSS_GROWTH_LIMIT = 0.20


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Server:
    """A running ``mlflow models serve``: its URL and the process id of its group leader."""

    url: str
    pid: int

    def rss(self) -> int:
        """Resident bytes of the server's process tree (the CLI and the uvicorn it started)."""
        import psutil

        leader = psutil.Process(self.pid)
        processes = [leader, *leader.children(recursive=True)]
        total = 0
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += process.memory_info().rss
        return total


@contextlib.contextmanager
def serving(uri: str, model: str, log: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    """``mlflow models serve`` of ``model`` (in the store ``uri``, pickle refused, ``env``
    added to its environment) on 127.0.0.1 with one worker, logging to ``log``; stopped by
    its process group on exit."""
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
        # The server runs ``uvicorn`` by name: the venv's programs come first, as activated.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        **(env or {}),
    }
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "-p", str(port), "-w", "1"]
    with log.open("wb") as stream:
        process = subprocess.Popen(
            command, stdout=stream, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        _wait_for_ping(f"http://127.0.0.1:{port}", process, log)
        yield Server(f"http://127.0.0.1:{port}", process.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the CLI and the uvicorn it started
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def _wait_for_ping(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    raise RuntimeError(f"mlflow models serve did not answer /ping: {log.read_text()[-3000:]}")


@dataclass(frozen=True)
class Answer:
    """One HTTP answer: its status, its body as text, its latency."""

    status: int
    body: str
    seconds: float


def post(url: str, body: bytes, content_type: str | None = "application/json") -> Answer:
    """POST ``body`` to ``url``/invocations; an HTTP error is an answer too (its status)."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    request = urllib.request.Request(f"{url}/invocations", data=body, headers=headers)
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode(errors="replace")
    return Answer(status, text, time.perf_counter() - start)


def image_request(files: list[Path]) -> bytes:
    """A request body scoring ``files`` as base64 image bytes, one row each."""
    rows = [[base64.b64encode(path.read_bytes()).decode()] for path in files]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()


def predictions(answer: Answer) -> list[dict]:
    """The rows of a 200 answer."""
    return json.loads(answer.body)["predictions"]


@dataclass
class Phase:
    """``requests`` requests from ``clients`` threads: each answer's class and latency."""

    clients: int
    requests: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    classes: Counter = field(default_factory=Counter)

    @property
    def per_s(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        """A latency percentile in milliseconds."""
        return float(np.percentile(self.latencies, q)) * 1000

    def as_dict(self) -> dict:
        return {
            "clients": self.clients,
            "requests": self.requests,
            "seconds": self.seconds,
            "per_s": self.per_s,
            **{f"p{q}_ms": self.percentile(q) for q in (50, 95, 99)},
            "classes": dict(self.classes),
        }


def answer_class(answer: Answer) -> str:
    """``ok`` (a 200 whose every row was scored), ``row error``, or ``HTTP <status>``."""
    if answer.status != 200:
        return f"HTTP {answer.status}"
    return "row error" if any(row["error"] for row in predictions(answer)) else "ok"


def load(url: str, bodies: list[bytes], clients: int, requests: int) -> Phase:
    """Send ``requests`` requests (the ``bodies`` in turn) from ``clients`` threads at once."""
    phase = Phase(clients, requests)
    numbers, lock = itertools.count(), threading.Lock()

    def client() -> None:
        while (number := next(numbers)) < requests:
            answer = post(url, bodies[number % len(bodies)])
            with lock:
                phase.latencies.append(answer.seconds)
                phase.classes[answer_class(answer)] += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for running in [pool.submit(client) for _ in range(clients)]:
            running.result()
    phase.seconds = time.perf_counter() - start
    return phase


def classes(*phases: Phase) -> str:
    """``<count> <class>, ...`` over ``phases``."""
    counts = sum((phase.classes for phase in phases), Counter())
    return ", ".join(f"{count} {name}" for name, count in sorted(counts.items()))


@dataclass
class LoadRun:
    """A whole run: the warm-up tenth, one phase per K, and the server's RSS along it."""

    warmup: Phase
    phases: list[Phase]
    rss: dict[str, int]

    @property
    def answered(self) -> int:
        return sum(sum(p.classes.values()) for p in [self.warmup, *self.phases])

    @property
    def rss_growth(self) -> float:
        """RSS after every request over RSS after the first tenth, less one."""
        return self.rss["end"] / self.rss["after first tenth"] - 1


def load_run(server: Server, bodies: list[bytes], requests: int) -> LoadRun:
    """The first tenth of ``requests`` from one client, then the rest split evenly over the
    phases of :data:`CLIENTS` clients, the server's RSS read at the start, after the first
    tenth and at the end."""
    rss = {"start": server.rss()}
    warmup = load(server.url, bodies, 1, requests // 10)
    rss["after first tenth"] = server.rss()
    rest = requests - warmup.requests
    counts = [rest // len(CLIENTS) + (i < rest % len(CLIENTS)) for i in range(len(CLIENTS))]
    phases = [load(server.url, bodies, k, n) for k, n in zip(CLIENTS, counts, strict=True)]
    rss["end"] = server.rss()
    return LoadRun(warmup, phases, rss)


def run(ws: Workspace) -> Section:
    from mlflow import MlflowClient

    from bench.report import Section, fmt, verdict
    from leukemia_mlops.inference.serving import IMAGE_MODEL, ServedModel, log_image_model
    from leukemia_mlops.models.backbones import build_classifier
    from leukemia_mlops.models.base import class_path
    from leukemia_mlops.models.classifier import CellClassifier

    size, requests = ws.image_size, QUICK_REQUESTS if ws.sizes.quick else REQUESTS
    files = sorted(ws.raw(ws.synthetic_spec(CELL_FILES)).rglob("*.bmp"))[:CELL_FILES]
    uri = f"sqlite:///{ws.root / 'serving.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("serving", str(ws.root / "serving-artifacts"))
    run_id = client.create_run(experiment).info.run_id
    served = ServedModel(class_path(CellClassifier), {"backbone": "resnet18"}, size, 450, "window")
    log_image_model(uri, run_id, build_classifier("resnet18"), served)
    model = f"runs:/{run_id}/{IMAGE_MODEL}"
    with serving(uri, model, ws.root / "serve.log") as server:
        result = load_run(server, [image_request([path]) for path in files], requests)
    rows = [
        [p.clients, p.requests, p.per_s, *(p.percentile(q) for q in (50, 95, 99)), classes(p)]
        for p in result.phases
    ]
    mib = {key: value / 2**20 for key, value in result.rss.items()}
    return Section(
        TITLE,
        f"resnet18 (untrained: speed does not depend on the weights) served at {size} px by "
        "`mlflow models serve --env-manager local -w 1` on 127.0.0.1, as logged by "
        "`log_image_model`; each request one 450 px BMP cell as base64 bytes "
        f"({len(files)} synthetic files in turn). {requests:,} requests: the first tenth from "
        f"one client, then the rest split evenly over {', '.join(map(str, CLIENTS))} "
        "concurrent clients (threads of the benchmark process, sharing the server's cores). "
        "RSS: the server's process tree.",
        ["clients", "requests", "requests/s", "p50 ms", "p95 ms", "p99 ms", "answers"],
        rows,
        [
            f"answered {result.answered:,} of {requests:,} requests; answer classes: "
            + classes(result.warmup, *result.phases),
            f"server RSS {fmt(mib['start'])} MiB before the first request, "
            f"{fmt(mib['after first tenth'])} MiB after the first tenth, "
            f"{fmt(mib['end'])} MiB after all",
            verdict(
                "RSS growth from the first tenth to the end",
                100 * result.rss_growth,
                100 * RSS_GROWTH_LIMIT,
                "%",
                below=True,
            ),
        ],
        {"warmup": result.warmup.as_dict(), "phases": [p.as_dict() for p in result.phases]}
        | {"rss_bytes": result.rss},
    )
