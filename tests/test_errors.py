"""Bugs keep their tracebacks; only bad input is one ``error:`` line.

A stage command or Hydra's training main prints one ``error:`` line and exits with status 2
for a failure the user can fix (:func:`leukemia_mlops.errors.expected_failure`); any other
exception, library errors from project code included, keeps its traceback and exits with 1.
The commands run as processes where the failure can be planted from outside.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY_SIZE

from leukemia_mlops.cli.args import BUG_HINT, run_cli
from leukemia_mlops.config import REPO_DIR, compose, load_params, write_params
from leukemia_mlops.models.classifier import CellClassifier

#: Run by a child process: the predict command after the classifier's constructor gained a
#: required argument that the checkpoint's hyperparameters lack.
CHANGED_CONSTRUCTOR = textwrap.dedent(
    """
    import sys

    from leukemia_mlops.cli.predict import main
    from leukemia_mlops.models.classifier import CellClassifier

    original = CellClassifier.__init__


    def changed(self, stain_norm, **kwargs):
        original(self, **kwargs)


    CellClassifier.__init__ = changed
    main(sys.argv[1:])
    """
)


def run(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """A project command as a process, its output captured."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_bug(code: int, err: str, raised: str) -> None:
    """Status 1, the traceback ending in ``raised``, the report line, no ``error:`` line."""
    assert code == 1, err[-3000:]
    assert "Traceback (most recent call last)" in err
    assert raised in err
    assert err.strip().splitlines()[-1] == BUG_HINT
    assert not [line for line in err.splitlines() if line.startswith("error: ")]


def assert_one_line(code: int, err: str, starts: str) -> None:
    """Status 2 and a last line ``error: <starts>...``, no traceback."""
    assert code == 2, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(f"error: {starts}"), err[-3000:]
    assert "Traceback" not in err


@pytest.fixture
def untrained_checkpoint(tmp_path: Path) -> Path:
    """A CellClassifier checkpoint as Lightning writes it, with untrained weights."""
    module = CellClassifier(backbone="resnet18", channels_last=False)
    path = tmp_path / "model.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": pl.__version__,
        },
        path,
    )
    return path


def test_a_constructor_that_no_longer_fits_the_checkpoint_is_a_bug(untrained_checkpoint, tmp_path):
    """The constructor changed, the checkpoint did not: Lightning's TypeError is a bug of the
    code, not a checkpoint to call bad (as every error while loading once was)."""
    images = tmp_path / "images"
    images.mkdir()
    done = run(
        "-c",
        CHANGED_CONSTRUCTOR,
        str(untrained_checkpoint),
        str(images),
        "--out",
        str(tmp_path / "predictions.csv"),
        "--params",
        str(tmp_path / "absent.yaml"),
        cwd=tmp_path,
    )
    assert_bug(done.returncode, done.stderr, "TypeError: changed() missing 1 required positional")


@pytest.fixture
def params(tmp_path: Path) -> Path:
    """The project's params.yaml, composed."""
    path = tmp_path / "params.yaml"
    write_params(compose(), path)
    return path


@pytest.mark.parametrize(
    ("read", "raised"),
    [
        (lambda cfg: cfg.nope, "ConfigAttributeError: Key 'nope' is not in struct"),
        (lambda cfg: cfg["nope"], "ConfigKeyError: Key 'nope' is not in struct"),
    ],
    ids=["attribute", "item"],
)
def test_reading_an_undeclared_key_is_a_bug(read, raised, params, monkeypatch, capsys):
    """A stage's config holds only the keys its ``dvc.yaml`` entry declares: a stage body
    that reads another one is a bug of the stage, never a config error of the user."""
    monkeypatch.chdir(REPO_DIR)  # where dvc.yaml declares the stage's keys

    def body() -> None:
        read(load_params(params, stage="evaluate"))

    with pytest.raises(SystemExit) as exit_info:
        run_cli(body)
    assert_bug(exit_info.value.code, capsys.readouterr().err, raised)


@pytest.mark.parametrize(
    ("edit", "overrides", "starts"),
    [
        (None, ["seed=${nope}"], "Interpolation key 'nope' not found"),
        (("seed: 42", "seed: ???"), [], "Missing mandatory value: seed"),
    ],
    ids=["interpolation", "missing-value"],
)
def test_a_bad_value_the_user_gave_is_one_line(edit, overrides, starts, params, capsys):
    """The other side of the line: OmegaConf's errors about a value the user wrote."""
    if edit is not None:
        params.write_text(params.read_text().replace(*edit))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: load_params(params, overrides).seed)
    assert_one_line(exit_info.value.code, capsys.readouterr().err, starts)


def test_a_yaml_syntax_error_in_the_users_params_is_one_line(params, tmp_path):
    params.write_text(params.read_text() + "seed: [1\n")
    done = run("-m", "leukemia_mlops.cli.prepare", "--params", str(params), cwd=tmp_path)
    assert_one_line(done.returncode, done.stderr, "while parsing a flow sequence")


def test_hydra_main_gives_expected_failures_one_line_and_bugs_their_traceback(
    tiny_prepared, tmp_path
):
    """``python -m leukemia_mlops.train``: ImageNet weights neither cached nor downloadable
    (a proxy that refuses every connection) are one line and status 2, as in the stage
    commands; a bug in a stage (a datamodule ``_target_`` that fails) keeps its traceback."""
    (tmp_path / "buggy_stage.py").write_text(
        "def datamodule(**kwargs):\n    return len(kwargs['batch_size'])  # the bug\n"
    )
    paths = [
        f"paths.prepared_dir={tiny_prepared}",
        f"paths.mlruns_dir={tmp_path / 'mlruns'}",
        f"paths.models_dir={tmp_path / 'models'}",
        f"paths.reports_dir={tmp_path / 'reports'}",
        f"data.prepare.image_size={TINY_SIZE}",
        "trainer.max_epochs=1",
        "datamodule.num_workers=0",
    ]
    offline = {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9"}
    weights = run(
        "-m", "leukemia_mlops.train", "model.weights=imagenet", *paths, cwd=tmp_path, **offline
    )
    assert_one_line(
        weights.returncode, weights.stderr, "ImageNet weights for resnet18 are not cached"
    )

    bug = run(
        "-m",
        "leukemia_mlops.train",
        "datamodule._target_=buggy_stage.datamodule",
        *paths,
        cwd=tmp_path,
        PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    )
    assert_bug(bug.returncode, bug.stderr, "TypeError: object of type 'int' has no len()")
    assert "return len(kwargs['batch_size'])  # the bug" in bug.stderr  # the line of the bug
