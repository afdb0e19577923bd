"""INT8 export on real ONNX Runtime: calibrated on training cells only, checked against fp32 on
test cells, flagged (never silently) where it misses, and scored by ``predict`` like any ONNX."""

from __future__ import annotations

import base64
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import pytorch_lightning as pl
from conftest import TINY_SIZE as SIZE
from mlflow.pyfunc.model import PythonModelContext
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from quiet_trainer import quiet_trainer

from leukemia_mlops.cli import export as export_cli
from leukemia_mlops.data.datamodule import CachedSplit, CellDataModule
from leukemia_mlops.data.identity import read_identity
from leukemia_mlops.data.prepare import MANIFEST_FILE
from leukemia_mlops.evaluation.int8_parity import PARITY_KEY, PARITY_OK_KEY, export_int8
from leukemia_mlops.evaluation.metrics import binary_metrics
from leukemia_mlops.inference.export import export_onnx
from leukemia_mlops.inference.loading import load_scorer, onnx_metadata
from leukemia_mlops.inference.predict import predict_paths
from leukemia_mlops.inference.quantize import CALIBRATION_KEY, QUANTIZATION_KEY, cpu_has_vnni
from leukemia_mlops.inference.scorers import to_network_input
from leukemia_mlops.inference.serving import ONNX_ARTIFACT, ImageModel, ServedModel
from leukemia_mlops.models.base import class_path
from leukemia_mlops.models.classifier import CellClassifier

#: Epochs of the model whose INT8 labels are compared (the tiny fixture has one).
TRAINED_EPOCHS = 6


@pytest.fixture(scope="module")
def fp32(tiny_checkpoint, tiny_prepared, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fp32") / "model.onnx"
    export_onnx(tiny_checkpoint, path, SIZE, tiny_prepared)
    return path


@pytest.fixture(scope="module")
def int8(fp32, tiny_prepared, tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("int8") / "model.int8.onnx"
    return path, export_int8(fp32, path, tiny_prepared)


def metadata(path: Path) -> dict:
    return {key: json.loads(value) for key, value in onnx_metadata(path).items()}


def test_int8_is_calibrated_on_the_training_cells_and_says_so(int8, fp32, tiny_prepared, tmp_path):
    """The scales equal those of a reference quantization calibrated on every training cell
    read straight from the cache (test cells give other scales), and the metadata names the
    training split, its cell count and the cache's data identity."""
    path, _ = int8
    train = CachedSplit(tiny_prepared, "train")
    calibration = metadata(path)[CALIBRATION_KEY]
    assert calibration["split"] == "train" and calibration["cells"] == len(train)
    assert calibration["data_identity"] == read_identity(tiny_prepared).digest
    settings = metadata(path)[QUANTIZATION_KEY]
    assert settings["quant_format"] == "QDQ" and settings["per_channel"] is True
    assert settings["cpu_vnni"] == cpu_has_vnni()

    def reference(split: str) -> dict[str, np.ndarray]:
        cells = CachedSplit(tiny_prepared, split)
        batches = iter([{"images": to_network_input(np.asarray(cells.images[cells.rows]))}])
        pre, out = tmp_path / "pre.onnx", tmp_path / f"{split}.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(out),
            type("Reader", (), {"get_next": lambda self: next(batches, None)})(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            calibrate_method=CalibrationMethod.MinMax,
            reduce_range=settings["reduce_range"],
            op_types_to_quantize=settings["op_types_to_quantize"],
        )
        return scales(out)

    assert scales(path) == pytest.approx(reference("train"), rel=1e-6)
    assert scales(path) != pytest.approx(reference("test"), rel=1e-6)


def scales(path: Path) -> dict[str, float]:
    """The activation scales of a QDQ model (one float per quantized tensor)."""
    model = onnx.load(str(path))
    return {
        init.name: float(onnx.numpy_helper.to_array(init))
        for init in model.graph.initializer
        if init.name.endswith("_scale") and not init.dims
    }


def test_int8_parity_is_measured_on_the_test_split(int8, fp32, tiny_prepared):
    """Weighted F1 and AUROC of both models on every test cell, recomputed here, are what the
    metadata and the report state, and within the tolerance the flag says."""
    path, report = int8
    parity = metadata(path)[PARITY_KEY]
    assert report["parity"] == parity
    test = CachedSplit(tiny_prepared, "test")
    images = np.asarray(test.images[test.rows])
    calls = []
    for name, model in (("fp32", fp32), ("int8", path)):
        probs = load_scorer(model)(images)
        calls.append(probs > parity["threshold"])
        scored = binary_metrics(probs, test.labels, parity["threshold"])
        assert parity[f"f1_weighted_{name}"] == pytest.approx(scored["f1_weighted"], abs=1e-9)
        assert parity[f"auroc_{name}"] == pytest.approx(scored["auroc"], abs=1e-9)
    assert parity["label_agreement"] == pytest.approx((calls[0] == calls[1]).mean())
    assert parity["split"] == "test" and parity["cells"] == len(test)
    assert parity["tolerance"] == 0.01
    within = max(parity["f1_gap"], parity["auroc_gap"]) <= parity["tolerance"]
    assert metadata(path)[PARITY_OK_KEY] is within is report["parity_ok"]


def test_an_int8_model_missing_parity_is_written_flagged_and_warned(
    fp32, tiny_prepared, tmp_path, caplog
):
    """Calibrated on one cell, the activations clip: the gaps exceed a zero tolerance, and the
    model is still written, flagged false, with a warning in the log."""
    path = tmp_path / "clipped.int8.onnx"
    report = export_int8(fp32, path, tiny_prepared, calibration_cells=1, tolerance=0.0)
    parity = report["parity"]
    assert max(parity["f1_gap"], parity["auroc_gap"]) > 0, "the precondition: a real gap"
    assert path.is_file() and metadata(path)[PARITY_OK_KEY] is False
    assert any(
        record.levelname == "WARNING" and "misses parity" in record.message
        for record in caplog.records
    )


@pytest.fixture(scope="module")
def test_files(tiny_raw, tiny_prepared, tmp_path_factory) -> Path:
    """Every test-split cell of the tiny set as its raw file."""
    folder = tmp_path_factory.mktemp("test_cells")
    manifest = pd.read_parquet(tiny_prepared / MANIFEST_FILE)
    for path in manifest.loc[manifest["split"] == "test", "path"]:
        shutil.copyfile(tiny_raw / path, folder / Path(path).name)
    return folder


@pytest.fixture(scope="module")
def trained(tiny_prepared, tmp_path_factory) -> tuple[Path, Path]:
    """(fp32, INT8) ONNX models of a resnet18 trained for several epochs on the tiny set,
    whose probabilities spread out (the one-epoch fixture's stay in a narrow band, where int8
    rounding alone reorders cells)."""
    folder = tmp_path_factory.mktemp("trained")
    pl.seed_everything(0)
    module = CellClassifier(backbone="resnet18", channels_last=False)
    trainer = quiet_trainer(max_epochs=TRAINED_EPOCHS)
    trainer.fit(module, datamodule=CellDataModule(str(tiny_prepared), 16, num_workers=0))
    trainer.save_checkpoint(folder / "model.ckpt")
    export_onnx(folder / "model.ckpt", folder / "model.onnx", SIZE, tiny_prepared)
    export_int8(folder / "model.onnx", folder / "model.int8.onnx", tiny_prepared)
    return folder / "model.onnx", folder / "model.int8.onnx"


@pytest.mark.slow
def test_predict_on_the_int8_model_agrees_with_fp32(trained, test_files, tmp_path):
    """``predict`` takes the INT8 file like any ONNX model: the fp32 model's label on at least
    99% of the test cells, at a threshold that splits them (in the widest gap between the
    fp32 probabilities of their middle half, so that only the quantization moves a cell)."""
    fp32, int8 = trained
    probs = predict_paths(fp32, [test_files], tmp_path / "p.csv", image_size=SIZE)["prob_all"]
    middle = np.sort(probs)[len(probs) // 4 : 3 * len(probs) // 4 + 1]
    gap = int(np.argmax(np.diff(middle)))
    threshold = float(middle[gap : gap + 2].mean())
    tables = [
        predict_paths(
            model, [test_files], tmp_path / f"{n}.csv", image_size=SIZE, threshold=threshold
        )
        for n, model in enumerate((fp32, int8))
    ]
    assert tables[0]["file"].tolist() == tables[1]["file"].tolist()
    assert (tables[1]["error"] == "").all() and len(tables[1]) > 10
    assert set(tables[0]["label"]) == {"ALL", "HEM"}
    agreement = (tables[0]["label"] == tables[1]["label"]).mean()
    assert agreement >= 0.99, (agreement, threshold, probs.tolist())


def test_the_served_model_scores_with_the_int8_file_as_predict_does(int8, test_files, tmp_path):
    """The served model with the INT8 file as its network: predict's probabilities on the
    same files, sent as bytes."""
    files = sorted(test_files.iterdir())[:6]
    expected = predict_paths(int8[0], files, tmp_path / "p.csv", image_size=SIZE)
    config = ServedModel(class_path(CellClassifier), {}, SIZE, 450, "window")
    model = ImageModel()
    model.load_context(PythonModelContext({ONNX_ARTIFACT: str(int8[0])}, asdict(config)))
    rows = pd.DataFrame({"image": [base64.b64encode(f.read_bytes()).decode() for f in files]})
    answer = model.predict(None, rows)
    assert (answer["error"] == "").all()
    np.testing.assert_allclose(answer["prob_all"], expected["prob_all"], rtol=1e-6)


def test_export_cli_int8_writes_the_quantized_model(tiny_checkpoint, tiny_prepared, tmp_path):
    out = tmp_path / "cli.int8.onnx"
    export_cli.main(
        [
            *("--checkpoint", str(tiny_checkpoint), "--out", str(out), "--int8"),
            *("--image-size", str(SIZE), "--prepared-dir", str(tiny_prepared)),
            *("--params", str(tmp_path / "absent.yaml")),
        ]
    )
    held = metadata(out)
    assert held[CALIBRATION_KEY]["split"] == "train" and PARITY_OK_KEY in held
    assert not (tmp_path / "fp32.onnx").exists()


def test_export_cli_int8_needs_a_prepare_cache(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main(
            [
                *("--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "m.onnx")),
                *("--int8", "--image-size", str(SIZE)),
                *("--params", str(tmp_path / "absent.yaml")),
            ]
        )
    assert exit_info.value.code == 2
    assert "--int8 calibrates on a prepare cache" in capsys.readouterr().err
