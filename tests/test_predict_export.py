"""Batch prediction from image files and ONNX export, on the tiny synthetic set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from conftest import TINY_SIZE as SIZE
from mlflow import MlflowClient
from omegaconf import OmegaConf

from leukemia_mlops.cli import export as export_cli
from leukemia_mlops.cli import predict as predict_cli
from leukemia_mlops.cli.export import default_export_path
from leukemia_mlops.config import stage_outs
from leukemia_mlops.data.prepare import IMAGES_FILE, MANIFEST_FILE
from leukemia_mlops.evaluation.evaluate import EvaluateSpec, evaluate_model, log_evaluation
from leukemia_mlops.inference.export import ParityError, export_onnx
from leukemia_mlops.inference.loading import (
    ONNX_THRESHOLD_KEY,
    file_sha256,
    load_module,
    validated_threshold,
)
from leukemia_mlops.inference.predict import predict_paths
from leukemia_mlops.inference.scorers import TorchScorer
from leukemia_mlops.tracking.model_logging import log_classifier

# The session fixture training the tiny checkpoint, shared so that both files use one model.
BROKEN = {"corrupt.png": "not a decodable image", "empty.bmp": "empty file", "notes.txt": ".txt"}
COLUMNS = [
    "file",
    "prob_all",
    "label",
    "threshold",
    "threshold_source",
    "calibrated",
    "conformal_set",
    "in_distribution",
    "ood_reason",
    "error",
]
NOTICE = "notice: no validated threshold is known for this model; calling ALL above 0.5"


@pytest.fixture(scope="module")
def image_folder(tiny_raw: Path, tiny_prepared: Path, tmp_path_factory) -> tuple[Path, dict]:
    """Test-split images (some in a subfolder), three unreadable files and a hidden one.

    Returns the folder and, per copied image, its row in the prepare cache.
    """
    folder = tmp_path_factory.mktemp("inputs")
    manifest = pd.read_parquet(tiny_prepared / MANIFEST_FILE)
    rows = {}
    for number, row in enumerate(manifest.index[manifest["split"] == "test"][:10]):
        target = folder / ("nested" if number % 2 else "") / f"cell_{number:02d}.bmp"
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(tiny_raw / manifest.loc[row, "path"], target)
        rows[str(target)] = row
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    (folder / "empty.bmp").write_bytes(b"")
    (folder / "notes.txt").write_text("a stray note\n")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return folder, rows


@pytest.fixture(scope="module")
def checkpoint_predictions(
    tiny_checkpoint, image_folder, tmp_path_factory
) -> tuple[Path, pd.DataFrame]:
    """The CSV written and the table returned for the folder, in batches of 4 files."""
    out = tmp_path_factory.mktemp("predict") / "predictions.csv"
    return out, predict_paths(
        tiny_checkpoint, [image_folder[0]], out, image_size=SIZE, batch_size=4
    )


def test_predictions_do_not_depend_on_the_decoding_processes(
    checkpoint_predictions, tiny_checkpoint, image_folder, tmp_path
):
    _, with_one_worker = checkpoint_predictions  # the default: one loader process
    in_process = predict_paths(
        tiny_checkpoint,
        [image_folder[0]],
        tmp_path / "p.csv",
        image_size=SIZE,
        batch_size=4,
        workers=0,
    )
    pd.testing.assert_frame_equal(in_process, with_one_worker)
    with pytest.raises(ValueError, match="workers must be >= 0"):
        predict_paths(
            tiny_checkpoint, [image_folder[0]], tmp_path / "q.csv", image_size=SIZE, workers=-1
        )


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tiny_prepared, tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return path, export_onnx(tiny_checkpoint, path, SIZE, tiny_prepared)


def test_predict_streams_a_folder_and_lists_unreadable_files(
    checkpoint_predictions,
    image_folder,
    tiny_prepared,
    tiny_checkpoint,
):
    folder, rows = image_folder
    _, table = checkpoint_predictions
    assert list(table.columns) == COLUMNS
    assert sorted(table["file"]) == sorted([*rows, *(str(folder / name) for name in BROKEN)])
    assert not table["file"].str.contains(".DS_Store").any()

    broken = table[table["error"] != ""].set_index("file")
    assert sorted(broken.index) == sorted(str(folder / name) for name in BROKEN)
    for name, reason in BROKEN.items():
        assert reason in broken.loc[str(folder / name), "error"]
    assert broken["prob_all"].isna().all() and (broken["label"] == "").all()
    assert not broken["in_distribution"].any() and (broken["ood_reason"] == "not scored").all()

    scored = table[table["error"] == ""]
    assert scored["in_distribution"].all() and (scored["ood_reason"] == "").all()
    cache = np.load(tiny_prepared / IMAGES_FILE, mmap_mode="r")
    expected = TorchScorer(load_module(tiny_checkpoint).net, device="cpu")(
        np.asarray(cache[[rows[f] for f in scored["file"]]])
    )
    np.testing.assert_allclose(scored["prob_all"], expected, rtol=0, atol=1e-6)
    assert (scored["label"] == np.where(scored["prob_all"] > 0.5, "ALL", "HEM")).all()


def test_predictions_csv_equals_the_returned_table(checkpoint_predictions):
    path, table = checkpoint_predictions
    on_disk = pd.read_csv(path, keep_default_na=False, na_values={"prob_all": [""]})
    pd.testing.assert_frame_equal(on_disk, table, check_dtype=False)


def test_onnx_export_matches_pytorch(exported):
    path, report = exported
    assert report["max_abs_diff"] < 1e-4
    assert report["parity_source"] == "prepare cache" and report["parity_images"] > 2
    model = onnx.load(path)
    (model_input,) = model.graph.input
    dims = model_input.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    assert [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE]


def test_predict_through_onnx_equals_the_checkpoint(
    exported, image_folder, checkpoint_predictions, tmp_path
):
    _, expected = checkpoint_predictions
    table = predict_paths(
        exported[0], [image_folder[0]], tmp_path / "p.csv", image_size=SIZE, batch_size=3
    )
    assert table["file"].tolist() == expected["file"].tolist()
    assert table["error"].tolist() == expected["error"].tolist()
    np.testing.assert_allclose(table["prob_all"], expected["prob_all"], atol=1e-4)
    with pytest.raises(ValueError, match="image_size=32"):
        predict_paths(exported[0], [image_folder[0]], tmp_path / "q.csv", image_size=32)


def test_a_failed_parity_check_removes_the_export(tiny_checkpoint, tmp_path):
    path = tmp_path / "model.onnx"
    with pytest.raises(ParityError, match="differ"):
        export_onnx(tiny_checkpoint, path, SIZE, n_images=3, tolerance=-1.0)
    assert not path.exists()


def labels_of(out: Path) -> set[str]:
    """The labels a predictions CSV gives its readable files."""
    table = pd.read_csv(out, keep_default_na=False)
    return set(table.loc[table["error"] == "", "label"])


def thresholds_of(out: Path) -> set[tuple[float, str]]:
    """The (threshold, threshold_source) pairs of a predictions CSV's rows, unreadable included."""
    table = pd.read_csv(out, keep_default_na=False)
    return set(zip(table["threshold"], table["threshold_source"], strict=True))


def test_predict_cli_threshold_flag_then_the_evaluated_checkpoints_then_half(
    tiny_checkpoint, image_folder, tmp_path, capsys
):
    """--threshold beats the evaluation's threshold, which counts only for the checkpoint it
    scored; with none known predict calls at 0.5 and says so. Every row names the threshold
    and its source: ``default``, ``validation`` (found or given with --metrics), ``given``."""
    params = tmp_path / "params.yaml"
    prepare = {"image_size": SIZE, "window": 450, "fit": "window"}
    paths = {"reports_dir": str(tmp_path / "reports"), "mlruns_dir": str(tmp_path / "mlruns")}
    OmegaConf.save(OmegaConf.create({"data": {"prepare": prepare}, "paths": paths}), params)
    evaluation = tmp_path / "reports" / "eval" / "model" / "metrics.json"
    evaluation.parent.mkdir(parents=True)
    out = tmp_path / "out.csv"
    argv = [str(tiny_checkpoint), str(image_folder[0]), "--out", str(out), "--params", str(params)]

    evaluation.write_text(json.dumps({"threshold": 0.0, "checkpoint_sha256": "0" * 64}))
    predict_cli.main(argv)  # another checkpoint's evaluation: not this model's threshold
    printed = capsys.readouterr()
    assert NOTICE in printed.err and "at threshold 0.5, source default " in printed.out
    assert thresholds_of(out) == {(0.5, "default")}

    evaluation.write_text(
        json.dumps({"threshold": 0.0, "checkpoint_sha256": file_sha256(tiny_checkpoint)})
    )
    predict_cli.main(argv)
    printed = capsys.readouterr()
    assert labels_of(out) == {"ALL"} and NOTICE not in printed.err
    summary = "at threshold 0, source validation (3 could not be read, 0 unlike the training"
    assert f"{summary} images)" in printed.out and thresholds_of(out) == {(0.0, "validation")}

    predict_cli.main([*argv, "--threshold", "1.0"])
    printed = capsys.readouterr()
    assert labels_of(out) == {"HEM"} and "at threshold 1, source given " in printed.out
    assert thresholds_of(out) == {(1.0, "given")}

    metrics = tmp_path / "metrics.json"
    metrics.write_text(
        json.dumps({"threshold": 1.0, "checkpoint_sha256": file_sha256(tiny_checkpoint)})
    )
    predict_cli.main([*argv, "--metrics", str(metrics)])
    printed = capsys.readouterr()
    assert labels_of(out) == {"HEM"} and "at threshold 1, source validation " in printed.out
    assert thresholds_of(out) == {(1.0, "validation")}
    # Another model's report (the detector's, a retrained model's) is refused in one line.
    metrics.write_text(json.dumps({"threshold": 1.0, "checkpoint_sha256": "0" * 64}))
    with pytest.raises(SystemExit) as exit_info:
        predict_cli.main([*argv, "--metrics", str(metrics)])
    assert exit_info.value.code == 2
    assert "is the evaluation of another model" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        predict_cli.main([str(tmp_path / "missing.ckpt"), str(image_folder[0])])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: no such model file: {tmp_path}/missing.ckpt"


def test_evaluate_records_whose_threshold_it_chose(tiny_checkpoint, tiny_prepared, tmp_path):
    spec = EvaluateSpec(n_resamples=2, min_subjects=2, tta=False, seed=0, batch_size=64)
    metrics = evaluate_model(tiny_checkpoint, tiny_prepared, tmp_path / "eval", spec)
    evaluation = tmp_path / "eval" / "metrics.json"
    assert validated_threshold(tiny_checkpoint, evaluation) == metrics["threshold"]
    retrained = tmp_path / "retrained.ckpt"
    retrained.write_bytes(tiny_checkpoint.read_bytes() + b"\0")
    assert validated_threshold(retrained, evaluation) is None


def test_an_onnx_model_carries_its_threshold(
    tiny_checkpoint, exported, image_folder, tmp_path, capsys
):
    assert exported[1][ONNX_THRESHOLD_KEY] is None
    assert validated_threshold(exported[0]) is None
    path = tmp_path / "model.onnx"
    report = export_onnx(tiny_checkpoint, path, SIZE, n_images=3, threshold=0.0)
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert report[ONNX_THRESHOLD_KEY] == 0.0 and props == {ONNX_THRESHOLD_KEY: "0.0"}
    capsys.readouterr()
    predict_paths(path, [image_folder[0]], tmp_path / "p.csv", image_size=SIZE)
    assert labels_of(tmp_path / "p.csv") == {"ALL"} and NOTICE not in capsys.readouterr().err
    assert thresholds_of(tmp_path / "p.csv") == {(0.0, "validation")}


def test_an_mlflow_model_predicts_at_its_runs_evaluated_threshold(
    tiny_checkpoint, image_folder, tmp_path, capsys
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    log_classifier(uri, run_id, load_module(tiny_checkpoint).net, SIZE)
    model = f"runs:/{run_id}/model"
    assert validated_threshold(model, tracking_uri=uri) is None
    (tmp_path / "eval").mkdir()
    log_evaluation(uri, run_id, {"threshold": 0.0}, tmp_path / "eval")
    capsys.readouterr()
    predict_paths(model, [image_folder[0]], tmp_path / "p.csv", tracking_uri=uri, image_size=SIZE)
    assert labels_of(tmp_path / "p.csv") == {"ALL"} and NOTICE not in capsys.readouterr().err
    assert thresholds_of(tmp_path / "p.csv") == {(0.0, "validation")}


def test_export_cli_reports_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main(["--checkpoint", str(tmp_path / "no.ckpt"), "--image-size", "32"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: no such checkpoint")


def test_export_cli_stores_the_evaluated_threshold(tiny_checkpoint, tmp_path):
    metrics = tmp_path / "metrics.json"
    digest = file_sha256(tiny_checkpoint)
    metrics.write_text(json.dumps({"threshold": 0.25, "checkpoint_sha256": digest}))
    out = tmp_path / "model.onnx"
    export_cli.main(
        [
            *("--checkpoint", str(tiny_checkpoint), "--out", str(out)),
            *("--image-size", str(SIZE), "--metrics", str(metrics)),
            *("--params", str(tmp_path / "absent.yaml")),
        ]
    )
    assert validated_threshold(out) == 0.25


def test_the_default_export_lands_outside_every_dvc_output():
    """A file written into a stage's output (models/model/checkpoints) would make `dvc status`
    report the stage changed and the next `dvc repro` retrain it."""
    outs = [Path(out) for stage in ("train", "train_detector") for out in stage_outs(stage)]
    for key in ("model", "detector"):
        exported = default_export_path(Path(f"models/{key}/checkpoints/best.ckpt"))
        assert exported == Path(f"exports/{key}.onnx")
        assert not any(exported.is_relative_to(out) for out in outs)
    assert default_export_path(Path("elsewhere/mine.ckpt")) == Path("exports/mine.onnx")
