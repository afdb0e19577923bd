"""Throwaway servers for the end-to-end tests: a PostgreSQL cluster and an MLflow server.

Both bind 127.0.0.1 on a free port, live in a temporary folder and are stopped by their
process id. PostgreSQL refuses to run as root, so as root the cluster belongs to the
``postgres`` user (``nobody`` where there is none) and its programs run through ``runuser``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.serving import free_port

__all__ = ["MlflowServer", "Postgres", "free_port", "postgres_bin_dir", "start_postgres"]

START_TIMEOUT_S = 90
STOP_TIMEOUT_S = 30


def postgres_bin_dir() -> Path | None:
    """The folder of ``initdb`` and ``postgres`` (Debian's newest version first), or None."""

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", path))

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).resolve().parent))
    for folder in candidates:
        if all(os.access(Path(folder, name), os.X_OK) for name in ("initdb", "postgres")):
            return Path(folder)
    return None


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return not _alive(pid)


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else "(no log)"


@dataclass
class Postgres:
    """A running PostgreSQL cluster on 127.0.0.1 with one password-protected superuser."""

    bin_dir: Path
    base: Path
    port: int
    user: str = "lmo"
    password: str = field(default_factory=lambda: "pw-" + secrets.token_hex(8))
    process: subprocess.Popen | None = None

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def log_file(self) -> Path:
        return self.base / "postgres.log"

    def url(self, database: str = "postgres", driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres"):
        import psycopg2

        return psycopg2.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=database,
            connect_timeout=5,
        )

    def create_database(self, name: str) -> str:
        """Create database ``name``; returns its SQLAlchemy URL (psycopg2 driver)."""
        connection = self.connect()
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return self.url(name)

    def postmaster_pid(self) -> int | None:
        pid_file = self.data_dir / "postmaster.pid"
        try:
            return int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """Fast shutdown by the postmaster's PID (SIGINT), SIGKILL if it lingers."""
        pid = self.postmaster_pid() or (self.process.pid if self.process else None)
        if pid is not None:
            _kill(pid, signal.SIGINT)
            if not _wait_gone(pid, STOP_TIMEOUT_S):
                _kill(pid, signal.SIGKILL)
                _wait_gone(pid, 5)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=STOP_TIMEOUT_S)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=5)
        shutil.rmtree(self.base, ignore_errors=True)


def _as_owner(command: list[str], owner: str | None) -> list[str]:
    return ["runuser", "-u", owner, "--", *command] if owner else command


def start_postgres(bin_dir: Path) -> Postgres:
    """initdb a fresh cluster in a temporary folder and start it on a free port.

    fsync is off: the cluster is thrown away after the test, and durability across a power
    cut is not what these tests measure.
    """
    owner = None
    if os.geteuid() == 0:
        owner = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
        if owner is None:
            raise RuntimeError("running as root, but there is no postgres or nobody user")
    base = Path(tempfile.mkdtemp(prefix="lmo-pg-"))
    server = Postgres(bin_dir, base, free_port())
    pw_file = base / "pw"
    pw_file.write_text(server.password + "\n")
    if owner:
        entry = pwd.getpwnam(owner)
        for path in (base, pw_file):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    try:
        subprocess.run(
            _as_owner(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(server.data_dir),
                    "-U",
                    server.user,
                    f"--pwfile={pw_file}",
                    "--auth=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--no-locale",
                    "--no-sync",
                ],
                owner,
            ),
            check=True,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
        )
        with open(server.log_file, "wb") as log:
            server.process = subprocess.Popen(
                _as_owner(
                    [
                        str(bin_dir / "postgres"),
                        "-D",
                        str(server.data_dir),
                        "-p",
                        str(server.port),
                        "-c",
                        "listen_addresses=127.0.0.1",
                        "-c",
                        f"unix_socket_directories={base}",
                        "-c",
                        "fsync=off",
                        "-c",
                        "synchronous_commit=off",
                        "-c",
                        "full_page_writes=off",
                        "-c",
                        "max_connections=200",
                    ],
                    owner,
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_for_postgres(server)
    except BaseException as err:
        server.stop()
        if isinstance(err, subprocess.CalledProcessError):
            raise RuntimeError(f"initdb failed: {err.stderr[-2000:]}") from None
        raise
    return server


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _wait_for_postgres(server: Postgres) -> None:
    import psycopg2

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"postgres exited: {_tail(server.log_file)}")
        try:
            server.connect().close()
            return
        except psycopg2.OperationalError:
            time.sleep(0.2)
    raise RuntimeError(f"postgres did not accept connections in time: {_tail(server.log_file)}")


@dataclass
class MlflowServer:
    """``mlflow server`` on 127.0.0.1 over a backend store; stop and start it again at will."""

    backend_uri: str
    artifacts_dir: Path
    log_file: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    #: ``mlflow server --app-name`` (``basic-auth``: its settings come from the environment,
    #: ``MLFLOW_AUTH_CONFIG_PATH`` and ``MLFLOW_FLASK_SERVER_SECRET_KEY``).
    app_name: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = START_TIMEOUT_S) -> MlflowServer:
        """Start the server (again, on the same port) and wait until ``/health`` answers."""
        return self.launch().wait(timeout)

    def launch(self) -> MlflowServer:
        """Start the server process without waiting for it (see :meth:`wait`)."""
        env = {
            **os.environ,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_ENABLE_TELEMETRY": "false",
            "DO_NOT_TRACK": "1",
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--workers",
            "1",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            self.backend_uri,
            "--artifacts-destination",
            str(self.artifacts_dir),
            *(["--app-name", self.app_name] if self.app_name else []),
        ]
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        return self

    def wait(self, timeout: float = START_TIMEOUT_S) -> MlflowServer:
        """Wait until the launched server answers ``/health``; stop it if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {_tail(self.log_file)}")
            if self.healthy():
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy in {timeout} s: {_tail(self.log_file)}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server and its workers: ``sig`` to its process group, SIGKILL if needed."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
        # Workers left in the group (the server's own children) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


def server_sweep_command(
    storage: str, study_name: str, tracking_uri: str, experiment: str, prepared: Path, work: Path
) -> list[str]:
    """A 2-trial one-epoch resnet18 sweep on a shared study storage, logging to a server."""
    return [
        sys.executable,
        "-m",
        "leukemia_mlops.train",
        "-m",
        "hparams_search=cnn_optuna",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.study_name={study_name}",
        f"hydra.sweeper.storage='{storage}'",
        f"paths.prepared_dir={prepared}",
        f"paths.mlruns_dir={work / 'mlruns'}",
        f"logger.mlflow.tracking_uri={tracking_uri}",
        f"logger.mlflow.experiment_name={experiment}",
        "logger.mlflow.log_model=false",
        "model=resnet18",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "datamodule.num_workers=0",
    ]
