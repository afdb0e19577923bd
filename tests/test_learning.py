"""Both families learn single cells, and learn them alike in fp32 and bf16 (real training).

The data is synthetic cells with the size cue the real set has (blasts about 30% larger), in
the C-NMC layout, cached at the detector's input side. The default detector once ranked
single cells backwards because its two-epoch budget stopped it inside an early phase of
training; these tests train a fixed number of steps past it and check the ranking itself.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import pytorch_lightning as pl
from quiet_trainer import quiet_trainer

from leukemia_mlops.data.datamodule import CellDataModule
from leukemia_mlops.data.detection import DetectionDataModule
from leukemia_mlops.data.prepare import PrepareSpec, prepare_dataset
from leukemia_mlops.data.splits import SplitSpec
from leukemia_mlops.data.synthetic import SyntheticSpec, generate_cnmc
from leukemia_mlops.models.classifier import CellClassifier
from leukemia_mlops.models.detector import YoloDetector

pytestmark = pytest.mark.slow

SIZE = 64  # a multiple of 32, the detector's stride
CUE_SPEC = SyntheticSpec(
    n_train_subjects=12, n_prelim_subjects=4, cells_per_subject=16, n_final_images=1, seed=3
)
PRECISIONS = ("32-true", "bf16-mixed")
#: Epochs each family trains: the detector's single-cell ranking is at chance for its first
#: 4-5 epochs here (val AUROC 0.50, 0.50, 0.63, 0.44, 0.56), then rises to about 0.8; the
#: two-epoch budget that once shipped fails the test.
EPOCHS = {"cnn": 8, "yolo": 10}
LEARNED_AUROC = 0.7  # the detector's validation AUROC once it learned the cue; chance is 0.5
#: bf16 against fp32 after the same steps from the same seed: final training loss within
#: this fraction, validation AUROC of the last three epochs within this difference (the
#: validation split has 4 subjects). Measured: CNN losses 0.348 and 0.351, AUROCs 0.65 and
#: 0.66; detector losses 3.47 and 3.72, AUROCs 0.83 and 0.80.
LOSS_TOLERANCE = 0.15
AUROC_TOLERANCE = 0.12


class Curve(NamedTuple):
    """Per-epoch training loss and validation AUROC of one fit."""

    train_loss: list[float]
    val_auroc: list[float]


class _Record(pl.Callback):
    def __init__(self) -> None:
        self.curve = Curve([], [])

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.curve.val_auroc.append(float(trainer.callback_metrics["val/auroc"]))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.curve.train_loss.append(float(trainer.callback_metrics["train/loss"]))


@pytest.fixture(scope="module")
def cue_prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("cue")
    generate_cnmc(root / "raw", CUE_SPEC, workers=1)
    spec = PrepareSpec(image_size=SIZE, workers=1)
    prepare_dataset(root / "raw", root / "prepared", spec, SplitSpec(), progress=False)
    return root / "prepared"


def fit(family: str, prepared, precision: str) -> Curve:
    """Train ``family`` from seed 0 for its fixed number of epochs in ``precision``."""
    pl.seed_everything(0)
    if family == "yolo":
        module = YoloDetector(img_size=SIZE, width_mult=0.25, channels_last=False)
        data = DetectionDataModule(
            str(prepared), SIZE, batch_size=16, num_workers=0, train_scenes=32, val_scenes=4
        )
    else:
        module = CellClassifier(backbone="resnet18", channels_last=False)
        data = CellDataModule(str(prepared), 16, num_workers=0)
    record = _Record()
    trainer = quiet_trainer(
        max_epochs=EPOCHS[family],
        precision=precision,
        callbacks=[record],
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    return record.curve


@pytest.fixture(scope="module")
def curves(cue_prepared):
    """(family, precision) -> its curve, each fit once for the module."""
    cache: dict[tuple[str, str], Curve] = {}

    def get(family: str, precision: str) -> Curve:
        if (family, precision) not in cache:
            cache[family, precision] = fit(family, cue_prepared, precision)
        return cache[family, precision]

    return get


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_detector_learns_to_rank_single_cells(curves, precision):
    """Its single-cell probability ranks ALL above HEM once trained past the early phase."""
    curve = curves("yolo", precision)
    assert curve.val_auroc[-1] >= LEARNED_AUROC, curve
    assert curve.train_loss[-1] < curve.train_loss[0]


def settled(values: list[float]) -> float:
    """The mean of the last three epochs: one epoch's AUROC on 4 validation subjects is noisy."""
    return sum(values[-3:]) / len(values[-3:])


@pytest.mark.parametrize("family", ["cnn", "yolo"])
def test_bf16_trains_like_fp32(curves, family):
    full, mixed = (curves(family, precision) for precision in PRECISIONS)
    assert len(full.val_auroc) == len(mixed.val_auroc) == EPOCHS[family]
    for curve in (full, mixed):  # each learns: its training loss falls by a quarter or more
        assert curve.train_loss[-1] < 0.75 * curve.train_loss[0], curve
    assert mixed.train_loss[-1] == pytest.approx(full.train_loss[-1], rel=LOSS_TOLERANCE)
    assert abs(settled(mixed.val_auroc) - settled(full.val_auroc)) <= AUROC_TOLERANCE, (full, mixed)
