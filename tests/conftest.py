"""Shared fixtures: a tiny synthetic C-NMC tree in the real layout, its prepare cache, configs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from quiet_trainer import quiet_trainer

os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import pytorch_lightning as pl

from leukemia_mlops.config import compose
from leukemia_mlops.data.datamodule import CellDataModule
from leukemia_mlops.data.prepare import PrepareSpec, prepare_dataset
from leukemia_mlops.data.splits import SplitSpec
from leukemia_mlops.data.synthetic import SyntheticSpec, generate_cnmc
from leukemia_mlops.models.classifier import CellClassifier

TINY_SPEC = SyntheticSpec(
    n_train_subjects=8, n_prelim_subjects=4, cells_per_subject=8, n_final_images=3, seed=3
)
TINY_SIZE = 48


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> md5 of every file under ``root`` (to prove input trees stay intact)."""
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(autouse=True)
def no_inherited_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without ``$MLFLOW_TRACKING_URI``: ``mlflow.set_tracking_uri`` (which the
    project calls to log models) also sets it, and would send a later test's runs elsewhere.
    The same holds for the registry URI, which registering a model sets (in the process too)."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    mlflow.set_registry_uri(None)


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset in the Kaggle C-NMC layout (prelim CSV and final set included)."""
    root = tmp_path_factory.mktemp("raw") / "raw"
    generate_cnmc(root, TINY_SPEC, workers=1)
    return root


@pytest.fixture(scope="session")
def tiny_prepared(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prepare cache of :func:`tiny_raw` at a tiny training size."""
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    prepare_dataset(
        tiny_raw,
        out,
        PrepareSpec(image_size=TINY_SIZE, workers=1),
        SplitSpec(),
        progress=False,
        source="synthetic",
    )
    return out


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_prepared: Path):
    """A composed training config shrunk to run in seconds, writing only under ``tmp_path``."""

    def make(*overrides: str):
        return compose(
            [
                f"paths.prepared_dir={tiny_prepared}",
                f"paths.mlruns_dir={tmp_path / 'mlruns'}",
                f"paths.models_dir={tmp_path / 'models'}",
                f"paths.reports_dir={tmp_path / 'reports'}",
                f"data.prepare.image_size={TINY_SIZE}",
                "trainer.max_epochs=2",
                "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false",
                "trainer.log_every_n_steps=1",
                "datamodule.batch_size=16",
                "datamodule.num_workers=0",
                "logger.mlflow.log_model=false",
                *overrides,
            ]
        )

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet18 trained for one epoch on the tiny cache (a poor model is enough here)."""
    path = tmp_path_factory.mktemp("tiny_checkpoint") / "model.ckpt"
    pl.seed_everything(0)
    module = CellClassifier(backbone="resnet18", channels_last=False)
    trainer = quiet_trainer(
        max_epochs=1,
    )
    trainer.fit(module, datamodule=CellDataModule(str(tiny_prepared), 16, num_workers=0))
    trainer.save_checkpoint(path)
    return path
