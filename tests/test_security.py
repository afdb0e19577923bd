"""Security: no loader runs a pickle payload, secrets stay out of MLflow, no path escapes.

* a checkpoint or weights file carrying a live pickle payload is refused by every loader:
  ``model.weights``, ``predict``, ``evaluate``, ``export``, resuming a run, and an MLflow model
  saved in pickle format; and every ``torch.load``/``load_from_checkpoint``/resume call in the
  code passes ``weights_only=True``;
* a tracking URI's password never reaches the params or the ``config.yaml`` of a real run;
* names in the prelim labels CSV cannot make ``prepare`` read a file outside the dataset;
* ``make ui`` serves on 127.0.0.1 only.
"""

from __future__ import annotations

import ast
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY_SIZE, tree_digest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf
from servers import (
    MlflowServer,
    Postgres,
    postgres_bin_dir,
    server_sweep_command,
    start_postgres,
)

from leukemia_mlops.cli import evaluate as evaluate_cli
from leukemia_mlops.cli import export as export_cli
from leukemia_mlops.cli import predict as predict_cli
from leukemia_mlops.cli import train as train_cli
from leukemia_mlops.config import write_params
from leukemia_mlops.data.prepare import PrepareSpec, prepare_dataset
from leukemia_mlops.data.splits import SplitSpec
from leukemia_mlops.errors import InputError
from leukemia_mlops.models.backbones import WeightsError, build_classifier
from leukemia_mlops.redaction import install_redaction, redact
from leukemia_mlops.tracking.provenance import config_hash
from leukemia_mlops.training.run import run_training

ROOT = Path(__file__).resolve().parents[1]
PRELIM = "C-NMC_Leukemia/validation_data/C-NMC_test_prelim_phase_data"
LABELS_CSV = f"{PRELIM}_labels.csv"
UNSUPPORTED_GLOBAL = r"Unsupported global: GLOBAL (builtins\.)?exec\b"


class Payload:
    """Unpickling this runs ``exec``: it writes ``marker``, standing for any command."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('payload ran')",)


@pytest.fixture(autouse=True)
def keep_mlflow_global_state(monkeypatch):
    """Training in-process sets MLflow's global tracking URI (and its env var): undo it."""
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", raising=False)


@pytest.fixture(scope="module", autouse=True)
def server_process(tmp_path_factory):
    """An MLflow server (sqlite store) on 127.0.0.1, booting while the first tests run."""
    base = tmp_path_factory.mktemp("tracking_server")
    server = MlflowServer(f"sqlite:///{base / 'mlflow.db'}", base / "artifacts", base / "log")
    server.launch()
    yield server
    server.stop()


@pytest.fixture
def tracking_server(server_process) -> MlflowServer:
    return server_process.wait()


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "PAYLOAD_RAN"


@pytest.fixture
def evil_ckpt(tiny_checkpoint: Path, marker: Path, tmp_path: Path) -> Path:
    """The real tiny checkpoint with a payload riding along."""
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    state["callbacks"] = {"EpochHistory": Payload(marker)}
    path = tmp_path / "evil.ckpt"
    torch.save(state, path)
    return path


@pytest.fixture
def evil_pth(tiny_checkpoint: Path, marker: Path, tmp_path: Path) -> Path:
    """A backbone state dict with a payload in it."""
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    state["net.backbone.fc.bias"] = Payload(marker)
    path = tmp_path / "evil.pth"
    torch.save(state, path)
    return path


def test_the_payload_is_live(evil_ckpt, evil_pth, marker):
    """Control: a plain ``torch.load`` does run it (so the refusals below mean something)."""
    for path in (evil_ckpt, evil_pth):
        torch.load(path, map_location="cpu", weights_only=False)
        assert marker.read_text() == "payload ran"
        marker.unlink()


def refused_by_cli(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_model_weights_refuse_a_payload(evil_pth, evil_ckpt, marker, tiny_config, tmp_path, capsys):
    for path in (evil_pth, evil_ckpt):
        with pytest.raises(WeightsError, match=r"cannot load .* safely") as refused:
            build_classifier("resnet18", weights=str(path))
        assert re.search(UNSUPPORTED_GLOBAL, str(refused.value))
    params = tmp_path / "params.yaml"
    write_params(tiny_config(f"model.weights={evil_pth}"), params)
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--params", str(params)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: model.weights: cannot load {evil_pth} safely")
    assert not marker.exists()


def test_predict_evaluate_and_export_refuse_a_payload(
    evil_ckpt, marker, tiny_raw, tiny_config, tmp_path, capsys
):
    images = tiny_raw / PRELIM
    params = tmp_path / "params.yaml"
    write_params(tiny_config(), params)
    line = refused_by_cli(
        predict_cli.main,
        [str(evil_ckpt), str(images), "--out", str(tmp_path / "p.csv"), "--params", str(params)],
        capsys,
    )
    assert line.startswith(f"error: {evil_ckpt} is not a model checkpoint")
    assert "Weights only load failed" in line

    best = tmp_path / "models/model/checkpoints/best.ckpt"
    best.parent.mkdir(parents=True)
    shutil.copyfile(evil_ckpt, best)
    line = refused_by_cli(evaluate_cli.main, ["--params", str(params)], capsys)
    assert line.startswith(f"error: {best} is not a model checkpoint")

    out = tmp_path / "model.onnx"
    argv = ["--checkpoint", str(evil_ckpt), "--image-size", "48", "--out", str(out)]
    line = refused_by_cli(export_cli.main, argv, capsys)
    assert line.startswith(f"error: {evil_ckpt} is not a model checkpoint")
    assert not out.exists()
    assert not marker.exists()


def test_resuming_from_a_last_checkpoint_with_a_payload_is_refused(
    evil_ckpt, marker, tiny_config, tracking_server, tmp_path
):
    """An unfinished run resumes from ``last.ckpt``: a planted one must not run its payload."""
    cfg = tiny_config(
        f"logger.mlflow.tracking_uri={tracking_server.url}",
        "logger.mlflow.experiment_name=resume-payload",
    )
    run_dir = tmp_path / "models/model"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copyfile(evil_ckpt, run_dir / "checkpoints/last.ckpt")
    client = MlflowClient(tracking_server.url)
    run = client.create_run(client.create_experiment("resume-payload"))
    state = {
        "config_hash": config_hash(OmegaConf.to_container(cfg, resolve=True)),
        "mlflow_run_id": run.info.run_id,
        "status": "running",
    }
    (run_dir / "run.json").write_text(json.dumps(state))
    with pytest.raises(Exception, match="Weights only load failed") as error:
        run_training(cfg, run_dir)
    assert re.search(UNSUPPORTED_GLOBAL, str(error.value))
    assert not marker.exists()


def test_an_mlflow_model_in_pickle_format_is_refused(marker, tracking_server, tmp_path):
    """``predict runs:/...`` loads MLflow models: one saved in MLflow's pickle format is
    refused (MLflow would unpickle it by default; the predict loader turns that off)."""
    from leukemia_mlops.inference.loading import load_scorer

    uri = tracking_server.url
    model_dir = tmp_path / "model"
    data = model_dir / "data"
    data.mkdir(parents=True)
    torch.save(Payload(marker), data / "model.pth")
    (data / "pickle_module_info.txt").write_text("pickle")
    (model_dir / "MLmodel").write_text(
        "flavors:\n  pytorch:\n    model_data: data\n    pytorch_version: 2.14.1\n"
        "  python_function:\n    loader_module: mlflow.pytorch\n    data: data\n"
        "    env: {}\n"
    )
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("evil"))
    client.log_artifacts(run.info.run_id, str(model_dir), "model")
    with pytest.raises(MlflowException, match="Deserializing model using pickle is disallowed"):
        load_scorer(f"runs:/{run.info.run_id}/model", uri)
    assert not marker.exists()


FORBIDDEN = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("dill", "load"),
    ("joblib", "load"),
    ("yaml", "unsafe_load"),
    ("jit", "load"),
}


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else keyword
    return None


def _owner(func: ast.Attribute) -> str:
    value = func.value
    return value.id if isinstance(value, ast.Name) else getattr(value, "attr", "")


TRAINER_LOADS = ("fit", "validate", "test", "predict")  # each restores ``ckpt_path=``


def _imported(tree: ast.AST) -> dict[str, tuple[str, str]]:
    """Names bound by ``from package.module import name [as alias]``: alias -> (module, name)."""
    return {
        alias.asname or alias.name: (node.module.rsplit(".", 1)[-1], alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names
    }


def unsafe_loads(path: Path, root: Path = ROOT) -> list[str]:
    """Calls in ``path`` that could unpickle without ``weights_only=True``, called as
    ``module.load(...)`` or as a name imported from the module (``from torch import load``)."""
    tree = ast.parse(path.read_text(), str(path))
    imported = _imported(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Attribute):
            name, owner = node.func.attr, _owner(node.func)
        elif isinstance(node.func, ast.Name) and node.func.id in imported:
            owner, name = imported[node.func.id]
        else:
            continue
        where = f"{path.relative_to(root)}:{node.lineno}"
        checked = (name == "load" and owner == "torch") or name == "load_from_checkpoint"
        resume = name in TRAINER_LOADS and _keyword(node, "ckpt_path") is not None
        if (checked or resume) and _keyword(node, "weights_only") is not True:
            found.append(f"{where} {owner}.{name} without weights_only=True")
        if (owner, name) in FORBIDDEN:
            found.append(f"{where} {owner}.{name}")
        if name == "load" and owner in ("np", "numpy") and _keyword(node, "allow_pickle"):
            found.append(f"{where} np.load(allow_pickle=True)")
        if name == "load" and owner == "yaml":
            found.append(f"{where} yaml.load (use yaml.safe_load)")
    return found


def test_the_loader_scan_sees_imported_names_and_every_trainer_restore(tmp_path):
    code = tmp_path / "code.py"
    code.write_text(
        "from torch import load\n"
        "from torch import load as tload\n"
        "from pickle import loads\n"
        "load(a)\n"
        "tload(a)\n"
        "loads(b)\n"
        "load(a, weights_only=True)\n"
        "trainer.fit(m, ckpt_path=c)\n"
        "trainer.validate(m, ckpt_path=c)\n"
        "trainer.test(m, ckpt_path=c)\n"
        "trainer.predict(m, ckpt_path=c)\n"
        "trainer.test(m, ckpt_path=c, weights_only=True)\n"
        "trainer.test(m)\n"
    )
    lines = [hit.split()[0].split(":")[1] for hit in unsafe_loads(code, tmp_path)]
    assert lines == ["4", "5", "6", "8", "9", "10", "11"]


def test_every_checkpoint_loader_in_the_code_is_weights_only():
    files = sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "hydra_plugins").rglob("*.py"))
    assert len(files) > 20
    unsafe = [hit for path in files for hit in unsafe_loads(path)]
    assert unsafe == []
    # The scan does see the loaders it checks.
    sources = "".join(p.read_text() for p in files)
    assert sources.count("weights_only=True") >= 5


def test_a_tracking_password_stays_out_of_params_and_config_artifacts(
    tiny_config, tracking_server, tmp_path
):
    secret = "s3cr3t-" + os.urandom(4).hex()
    server = tracking_server
    uri = server.url.replace("http://", f"http://alice:{secret}@")
    cfg = tiny_config(f"logger.mlflow.tracking_uri={uri}", "trainer.max_epochs=1", "seed=1")
    run_dir = tmp_path / "models/model"
    run_training(cfg, run_dir)
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    client = MlflowClient(server.url)
    run = client.get_run(run_id)
    redacted = server.url.replace("http://", "http://alice:***@")
    assert run.data.params["logger.mlflow.tracking_uri"] == redacted
    assert secret not in json.dumps([run.data.params, run.data.tags])
    config = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl")))
    assert f"tracking_uri: {redacted}" in config.read_text()
    assert secret not in config.read_text()
    assert secret not in (run_dir / "config.yaml").read_text()
    assert secret not in (run_dir / "run.json").read_text()


def test_prelim_csv_names_cannot_reach_outside_the_dataset(tiny_raw, tmp_path):
    root = tmp_path / "raw"
    shutil.copytree(tiny_raw, root, copy_function=os.link)
    bait = next((tiny_raw / PRELIM).glob("*.bmp"))
    outside = tmp_path / "outside.bmp"
    shutil.copyfile(bait, outside)  # a valid image next to the dataset root
    labels = root / LABELS_CSV
    text = labels.read_text()
    labels.unlink()  # the file is a hard link to the shared fixture: never write through it
    rows = [
        "../../../../outside.bmp",
        str(outside),
        "sub/../../../../../outside.bmp",
        "..\\..\\..\\..\\outside.bmp",
    ]
    original = "UID_3_99_1_all.bmp"
    labels.write_text(text + "".join(f"{original},{name},1\n" for name in rows))
    before = tree_digest(root)

    out = tmp_path / "prepared"
    prepare_dataset(root, out, PrepareSpec(image_size=TINY_SIZE, workers=1), SplitSpec(), False)
    manifest = pd.read_parquet(out / "manifest.parquet")
    for path in manifest["path"]:
        assert (root / path).resolve().is_relative_to(root.resolve()), path
    assert not manifest["path"].str.contains("outside|\\.\\.").any()
    assert len(manifest) == len(list(tiny_raw.rglob("*.bmp")))  # only the dataset's own files
    skipped = pd.read_csv(out / "skipped.csv")
    listed = skipped.loc[skipped["reason"].str.contains("but missing"), "path"].tolist()
    # Reported as named in the CSV (a name without a slash: in the prelim folder), never opened.
    assert sorted(listed) == sorted(n if "/" in n else f"{PRELIM}/{n}" for n in rows)
    assert tree_digest(root) == before


def test_make_ui_serves_on_localhost_only():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^ui:.*\n((?:\t.*\n|.*\\\n)+)", makefile, re.MULTILINE)
    assert recipe is not None
    command = recipe.group(1).replace("\\\n", " ")
    assert "mlflow ui" in command or "mlflow server" in command
    assert re.search(r"--host[ =]127\.0\.0\.1\b", command), command
    assert "0.0.0.0" not in makefile


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        (
            "postgresql+psycopg2://bob:pw@db:5432/optuna",
            "postgresql+psycopg2://bob:***@db:5432/optuna",
        ),
        ("http://alice:a/b:c@host/path", "http://alice:***@host/path"),  # '/' and ':' in it
        ("redis://:onlypw@cache", "redis://:***@cache"),  # no user name
        # as Hydra escapes a URL in override text (a sweep trial's link to its storage)
        (r"storage:postgresql\://u\:pw@db\:5432/o", r"storage:postgresql\://u\:***@db\:5432/o"),
        ("x=http://u:p1@a and y=https://v:p2@b", "x=http://u:***@a and y=https://v:***@b"),
        ("http://user@host:5000/x", "http://user@host:5000/x"),  # no password: unchanged
        ("http://127.0.0.1:5000/api", "http://127.0.0.1:5000/api"),
    ],
)
def test_redact_masks_the_password_of_every_url(text, redacted):
    assert redact(text) == redacted


def test_log_records_and_prints_are_redacted_with_their_tracebacks(monkeypatch, capsys):
    for name in ("stdout", "stderr"):  # put back after the test
        monkeypatch.setattr(sys, name, getattr(sys, name))
    secret = "pw-" + os.urandom(4).hex()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("test_security.redaction")
    logger.addHandler(handler)
    factory = logging.getLogRecordFactory()
    try:
        install_redaction()
        logger.warning("connecting to %s", f"postgresql://bob:{secret}@db/optuna")
        try:
            raise ConnectionError(f"cannot reach http://alice:{secret}@mlflow:5000")
        except ConnectionError:
            logger.exception("tracking server down")
        print(f"View run at: http://alice:{secret}@mlflow:5000/#/runs/1")
    finally:
        logging.setLogRecordFactory(factory)
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "postgresql://bob:***@db/optuna" in text and "http://alice:***@mlflow:5000" in text
    assert "Traceback" in text and secret not in text
    assert capsys.readouterr().out == "View run at: http://alice:***@mlflow:5000/#/runs/1\n"


def test_an_error_line_names_the_server_but_not_its_password(
    tiny_config, tmp_path, capsys, monkeypatch
):
    """An unreachable tracking server is one ``error:`` line (status 2) with the URL redacted."""
    secret = "pw-" + os.urandom(4).hex()
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    params = tmp_path / "params.yaml"
    write_params(
        tiny_config(f"logger.mlflow.tracking_uri=http://alice:{secret}@127.0.0.1:{port}"), params
    )
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--params", str(params)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert f"http://alice:***@127.0.0.1:{port}" in err.strip().splitlines()[-1]
    assert secret not in err


def files_holding(root: Path, secret: str) -> list[str]:
    """Every file under ``root`` whose bytes contain ``secret`` (databases included)."""
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.slow
def test_a_hydra_run_writes_no_password_of_its_command_line(
    tiny_prepared, server_process, tracking_server, tmp_path
):
    """``python -m leukemia_mlops.train logger.mlflow.tracking_uri=http://alice:<pw>@...``:
    the password is in no file Hydra or the run writes (``.hydra/*.yaml``, the job log,
    checkpoints folder, run.json), in no byte of the MLflow store, and in no output line."""
    secret = "pw-" + os.urandom(4).hex()
    uri = tracking_server.url.replace("http://", f"http://alice:{secret}@")
    command = [
        sys.executable,
        "-m",
        "leukemia_mlops.train",
        f"logger.mlflow.tracking_uri={uri}",
        "logger.mlflow.experiment_name=planted-password",
        f"paths.prepared_dir={tiny_prepared}",
        f"paths.mlruns_dir={tmp_path / 'mlruns'}",
        f"data.prepare.image_size={TINY_SIZE}",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "datamodule.batch_size=16",
        "datamodule.num_workers=0",
        "logger.mlflow.log_model=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output.decode()[-3000:]
    assert (tmp_path / "run/.hydra/overrides.yaml").is_file()
    assert "alice:***@" in (tmp_path / "run/.hydra/overrides.yaml").read_text()
    assert [line for line in output.decode().splitlines() if secret in line] == []
    assert files_holding(tmp_path, secret) == []
    assert files_holding(server_process.artifacts_dir.parent, secret) == []


def test_a_training_never_wipes_a_checkpoints_folder_it_did_not_write(tiny_config, tmp_path):
    """``paths.models_dir`` pointing at a user's folder with a ``checkpoints/`` of its own:
    refused in one line, every file intact (a run of ours has its ``run.json``)."""
    run_dir = tmp_path / "models/model"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints/notes.txt").write_text("mine")
    with pytest.raises(InputError, match="checkpoints exists and was not written by leukemia"):
        run_training(tiny_config("trainer.max_epochs=1"), run_dir)
    assert (run_dir / "checkpoints/notes.txt").read_text() == "mine"


def database_dump(postgres: Postgres, database: str) -> str:
    """Every row of every table of ``database``, as JSON text (a dump to grep)."""
    connection = postgres.connect(database)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT quote_ident(table_name) FROM information_schema.tables "
                "WHERE table_schema = 'public'"
            )
            tables = [name for (name,) in cursor.fetchall()]
            rows = []
            for table in tables:
                cursor.execute(f"SELECT row_to_json(t)::text FROM {table} t")
                rows.extend(row for (row,) in cursor.fetchall())
    finally:
        connection.close()
    assert len(tables) > 5 and rows  # the dump does hold the store
    return "\n".join(rows)


@pytest.mark.slow
def test_a_sweep_writes_no_password_of_its_tracking_uri_or_storage(
    tiny_prepared, tmp_path, monkeypatch
):
    """A real 2-trial Optuna sweep (Hydra multirun) against an ``mlflow server --app-name
    basic-auth`` over PostgreSQL, with the server's password in the tracking URI and the
    PostgreSQL password in the storage URL: neither is in any output line, any file under the
    sweep's folders, the MLflow artifact store, or a dump of the MLflow and Optuna databases."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (no initdb/postgres): apt-get install postgresql")
    secret = "pw-" + os.urandom(8).hex()
    auth = tmp_path / "auth/basic_auth.ini"  # the credentials file, outside every output folder
    auth.parent.mkdir()
    auth.write_text(
        f"[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{auth.parent / 'users.db'}\n"
        f"admin_username = alice\nadmin_password = {secret}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(auth))
    monkeypatch.setenv("MLFLOW_FLASK_SERVER_SECRET_KEY", os.urandom(8).hex())
    postgres = start_postgres(bin_dir)
    try:
        server = MlflowServer(
            postgres.create_database("mlflow"),
            tmp_path / "store/artifacts",
            tmp_path / "log",
            app_name="basic-auth",
        )
        server.start()
        try:
            with pytest.raises(MlflowException, match="401"):  # the server does check
                MlflowClient(server.url).search_experiments()
            uri = server.url.replace("http://", f"http://alice:{secret}@")
            storage = postgres.create_database("optuna")
            work = tmp_path / "work"
            work.mkdir()
            command = [
                *server_sweep_command(storage, "planted", uri, "planted", tiny_prepared, work),
                f"hydra.sweep.dir={work / 'multirun'}",
                f"data.prepare.image_size={TINY_SIZE}",
            ]
            env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
            env.update(OMP_NUM_THREADS="1", MLFLOW_HTTP_REQUEST_MAX_RETRIES="1")
            result = subprocess.run(command, cwd=work, env=env, capture_output=True, timeout=600)
            output = (result.stdout + result.stderr).decode(errors="replace")
            assert result.returncode == 0, output[-3000:]
            client = MlflowClient(uri)  # the runs did reach the server, authenticated
            runs = client.search_runs([client.get_experiment_by_name("planted").experiment_id])
            assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3  # study + 2 trials
            dumps = database_dump(postgres, "mlflow") + database_dump(postgres, "optuna")
        finally:
            server.stop()
    finally:
        postgres.stop()
    assert len(list((work / "multirun").rglob(".hydra/overrides.yaml"))) == 2  # both trials ran
    for password in (secret, postgres.password):
        assert [line for line in output.splitlines() if password in line] == []
        assert files_holding(work, password) == []
        assert files_holding(tmp_path / "store", password) == []
        assert password not in dumps
