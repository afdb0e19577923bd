"""Training logs no ``test/*`` metric: the evaluate stage owns those keys.

A ``test_step`` or ``predict_step`` that nothing calls would, once wired to ``trainer.test``,
log ``test/*`` at threshold 0.5 into the training run, where the evaluate stage logs the test
metrics at the validated threshold. The model classes and datamodules implement no test or
predict hook, and no project code runs ``trainer.test`` or ``trainer.predict``.
"""

from __future__ import annotations

import re

import pytest
import pytorch_lightning as pl
from import_closure import REPO
from pytorch_lightning.utilities.model_helpers import is_overridden

from leukemia_mlops.data.datamodule import CellDataModule
from leukemia_mlops.data.detection import DetectionDataModule
from leukemia_mlops.models.base import FineTunedModule
from leukemia_mlops.models.classifier import CellClassifier
from leukemia_mlops.models.detector import YoloDetector

HOOKS = {
    "model": ("test_step", "on_test_epoch_end", "predict_step"),
    "datamodule": ("test_dataloader", "predict_dataloader"),
}


@pytest.mark.parametrize("cls", [FineTunedModule, CellClassifier, YoloDetector])
def test_models_have_no_test_or_predict_hooks(cls):
    assert not [h for h in HOOKS["model"] if is_overridden(h, cls, parent=pl.LightningModule)]


@pytest.mark.parametrize("cls", [CellDataModule, DetectionDataModule])
def test_datamodules_have_no_test_or_predict_loaders(cls):
    assert not [
        h for h in HOOKS["datamodule"] if is_overridden(h, cls, parent=pl.LightningDataModule)
    ]


def test_no_code_runs_a_test_or_predict_loop():
    calls = re.compile(r"\.(test|predict)\(")
    found = [
        f"{path.relative_to(REPO)}:{number}"
        for path in sorted((REPO / "src").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "trainer" in line and calls.search(line)
    ]
    assert not found
