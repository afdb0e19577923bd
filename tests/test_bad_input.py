"""Bad input at every entry point: a clear one-line error or a reported skip, inputs untouched.

One table drives the stage commands in-process (``main(argv)``): each case names the exit
code (2 where the run cannot go on), a pattern for the last stderr line (``error: ...``) and the
inputs it reads, whose bytes must be the same afterwards. Files that ``prepare`` and
``predict`` cannot use are skipped and reported per file instead, with the run going on. The
real command lines (Hydra's ``leukemia_mlops.train`` and ``cli.prepare``) run as processes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_SIZE, tree_digest

from leukemia_mlops.cli import evaluate as evaluate_cli
from leukemia_mlops.cli import export as export_cli
from leukemia_mlops.cli import predict as predict_cli
from leukemia_mlops.cli import prepare as prepare_cli
from leukemia_mlops.cli import train as train_cli
from leukemia_mlops.cli.args import BUG_HINT
from leukemia_mlops.config import compose, write_params

TRAINING = "C-NMC_Leukemia/training_data"
FOLD = f"{TRAINING}/fold_0"
PRELIM = "C-NMC_Leukemia/validation_data/C-NMC_test_prelim_phase_data"
LABELS_CSV = f"{PRELIM}_labels.csv"
ENTRIES = {
    "prepare": prepare_cli.main,
    "train": train_cli.main,
    "predict": predict_cli.main,
    "evaluate": evaluate_cli.main,
    "export": export_cli.main,
}


def encode(suffix: str, pixels: np.ndarray) -> bytes:
    ok, data = cv2.imencode(suffix, pixels)
    assert ok
    return data.tobytes()


def bad_files(cell: bytes) -> dict[str, tuple[bytes, str | None]]:
    """Files added to a valid dataset: path -> (bytes, the reason it is skipped or None when
    it is usable). ``cell`` is a valid cell image (BMP) of the dataset."""
    pixels = cv2.imdecode(np.frombuffer(cell, np.uint8), cv2.IMREAD_COLOR)
    noise = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    undecodable = "not a decodable image (corrupt or truncated)"
    all_dir, hem_dir = f"{FOLD}/all", f"{FOLD}/hem"
    return {
        f"{all_dir}/UID_90_1_1_all.bmp": (noise, undecodable),
        f"{all_dir}/UID_90_1_2_all.bmp": (b"", "empty file"),
        f"{all_dir}/UID_90_1_3_all.bmp": (cell[: len(cell) // 2], undecodable),
        f"{all_dir}/UID_90_1_4_all.bmp": (cell[:40], undecodable),
        f"{all_dir}/UID_90_1_5_all.bmp": (b"this is text, not a bitmap", undecodable),
        f"{all_dir}/UID_90_1_6_all.tiff": (
            encode(".tiff", pixels.astype(np.float32) / 255),
            "unsupported pixel type float32",
        ),
        f"{all_dir}/UID_90_1_7_all.bmp": (
            encode(".bmp", np.zeros((4, 4, 3), np.uint8)),
            "blank image (no cell pixels)",
        ),
        f"{all_dir}/notes.txt": (b"hello", "not an image file (.txt)"),
        f"{all_dir}/README": (b"hello", "not an image file (no extension)"),
        f"{all_dir}/cell_17.bmp": (
            cell,
            "file name not of the form UID_<subject>_<image>_<cell>_<all|hem>",
        ),
        f"{all_dir}/UID_H5_1_1_all.bmp": (
            cell,
            "subject H5 is marked healthy (H) but the cell is all",
        ),
        f"{hem_dir}/UID_93_1_1_hem.bmp": (
            cell,
            "subject 93 is not marked healthy (H) but the cell is hem",
        ),
        f"{all_dir}/UID_H91_1_1_hem.bmp": (cell, "label in file name contradicts its folder all/"),
        f"{hem_dir}/UID_92_1_1_all.bmp": (cell, "label in file name contradicts its folder hem/"),
        f"{all_dir}/nested/UID_90_9_1_all.bmp": (cell, None),  # its folder is reported
        # Other modes and sizes are converted, not refused: gray, RGBA, 16-bit, odd sizes.
        f"{all_dir}/UID_90_2_1_all.png": (
            encode(".png", cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)),
            None,
        ),
        f"{all_dir}/UID_90_2_2_all.png": (
            encode(".png", cv2.cvtColor(pixels, cv2.COLOR_BGR2BGRA)),
            None,
        ),
        f"{all_dir}/UID_90_2_3_all.png": (encode(".png", pixels.astype(np.uint16) * 257), None),
        f"{all_dir}/UID_90_2_4_all.png": (
            encode(".png", cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257),
            None,
        ),
        f"{all_dir}/UID_90_2_5_all.bmp": (encode(".bmp", np.full((6, 9, 3), 200, np.uint8)), None),
        f"{all_dir}/UID_90_2_6_all.bmp": (encode(".bmp", cv2.resize(pixels, (1200, 900))), None),
        # Prelim images whose CSV row is wrong, or missing.
        f"{PRELIM}/900.bmp": (
            cell,
            "label '2' in C-NMC_test_prelim_phase_data_labels.csv is not 0 or 1",
        ),
        f"{PRELIM}/901.bmp": (
            cell,
            "unparseable original name in C-NMC_test_prelim_phase_data_labels.csv",
        ),
        f"{PRELIM}/902.bmp": (
            cell,
            "label in C-NMC_test_prelim_phase_data_labels.csv contradicts the original name",
        ),
        f"{PRELIM}/903.bmp": (cell, "not listed in C-NMC_test_prelim_phase_data_labels.csv"),
    }


# Rows added to the prelim labels CSV (for 900-902 above, and one for a file that is absent).
CSV_ROWS = [
    "UID_3_98_1_all.bmp,900.bmp,2",
    "cell.bmp,901.bmp,1",
    "UID_3_97_1_all.bmp,902.bmp,0",
    "UID_3_99_1_all.bmp,904.bmp,1",
]
MISSING = (f"{PRELIM}/904.bmp", "listed in C-NMC_test_prelim_phase_data_labels.csv but missing")
SUBFOLDER = (f"{FOLD}/all/nested", "unexpected sub-folder")


def link_tree(source: Path, target: Path) -> Path:
    """A copy made of hard links (files here are only ever added or replaced, never edited)."""
    shutil.copytree(source, target, copy_function=os.link)
    return target


def replace(path: Path, data: bytes | str) -> None:
    """Write ``path`` as a new file (a hard-linked original stays as it is)."""
    path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


@pytest.fixture(scope="module")
def inputs(tiny_raw, tiny_prepared, tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Every input the cases read, by name; outputs go under ``out``."""
    base = tmp_path_factory.mktemp("bad_input")
    paths: dict[str, Path] = {"out": base / "out", "checkpoint": tiny_checkpoint}
    paths["out"].mkdir()
    cell = next((tiny_raw / FOLD / "all").glob("*.bmp")).read_bytes()

    raw = paths["bad_raw"] = link_tree(tiny_raw, base / "bad_raw")
    for relative, (data, _) in bad_files(cell).items():
        replace(raw / relative, data)
    csv = raw / LABELS_CSV
    replace(csv, csv.read_text() + "".join(f"{row}\n" for row in CSV_ROWS))

    def small_tree(name: str, files: dict[str, bytes]) -> Path:
        root = paths[name] = base / name
        root.mkdir()
        for relative, data in files.items():
            replace(root / relative, data)
        return root

    training = {f"{FOLD}/all/UID_1_1_1_all.bmp": cell, f"{FOLD}/hem/UID_H2_1_1_hem.bmp": cell}
    small_tree("no_layout", {"images/UID_1_1_1_all.bmp": cell})
    small_tree("no_folds", {f"{TRAINING}/first/UID_1_1_1_all.bmp": cell})
    small_tree("no_csv", {**training, f"{PRELIM}/1.bmp": cell})
    small_tree(
        "bad_header",
        {**training, f"{PRELIM}/1.bmp": cell, LABELS_CSV: b"name,label\nUID_1_2_1_all.bmp,1\n"},
    )
    small_tree("all_undecodable", {"all/a.bmp": b"junk", "hem/b.bmp": b""})
    small_tree("user_folder", {"thesis.docx": b"years of work"})
    (base / "empty_raw").mkdir()
    paths["empty_raw"] = base / "empty_raw"
    paths["no_files"] = base / "no_files"
    paths["no_files"].mkdir()

    # Prepare caches broken in different ways.
    for name, breaker in {
        "zero_npy": lambda d: replace(d / "images.npy", b""),
        "short_npy": lambda d: replace(d / "images.npy", (d / "images.npy").read_bytes()[:9000]),
    }.items():
        paths[name] = link_tree(tiny_prepared, base / name)
        breaker(paths[name])

    # Files that are not checkpoints of this project.
    good = tiny_checkpoint.read_bytes()
    for name, data in {
        "junk_ckpt": b"hello",
        "empty_ckpt": b"",
        "truncated_ckpt": good[: len(good) // 3],
    }.items():
        paths[name] = base / f"{name}.ckpt"
        replace(paths[name], data)
    paths["foreign_ckpt"] = base / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, paths["foreign_ckpt"])
    paths["object_pth"] = base / "object.pth"  # not only tensors: torch refuses it
    torch.save(argparse.Namespace(weights=torch.zeros(3)), paths["object_pth"])
    paths["image_model"] = base / "model.bmp"
    replace(paths["image_model"], cell)
    paths["no_threshold"] = base / "metrics.json"
    replace(paths["no_threshold"], json.dumps({"auroc": 0.5}))

    # Configs: a good one over the tiny cache, and one per broken cache.
    out = paths["out"]

    def params(name: str, prepared: Path, *overrides: str) -> None:
        cfg = compose(
            [
                f"paths.raw_dir={raw}",
                f"paths.prepared_dir={prepared}",
                f"paths.mlruns_dir={out / 'mlruns'}",
                f"paths.models_dir={out / 'models'}",
                f"paths.reports_dir={out / 'reports'}",
                f"data.prepare.image_size={TINY_SIZE}",
                "data.prepare.workers=1",
                "trainer.max_epochs=1",
                "trainer.enable_progress_bar=false",
                "datamodule.num_workers=0",
                "logger.mlflow.log_model=false",
                "evaluate.n_resamples=5",
                *overrides,
            ]
        )
        paths[name] = base / f"{name}.yaml"
        write_params(cfg, paths[name])

    params("params", out / "prepared")  # prepare writes here; train reads the tiny cache:
    params("train_params", tiny_prepared)
    params("no_cache_params", base / "no_such_cache")
    params("zero_npy_params", paths["zero_npy"])
    params("short_npy_params", paths["short_npy"])
    # evaluate reads <models_dir>/model/checkpoints/best.ckpt: a junk one, and the good one.
    for name, checkpoint in (("junk_models", paths["junk_ckpt"]), ("models", tiny_checkpoint)):
        paths[name] = base / name
        (paths[name] / "model/checkpoints").mkdir(parents=True)
        os.link(checkpoint, paths[name] / "model/checkpoints/best.ckpt")
    return paths


@pytest.fixture(autouse=True)
def keep_mlflow_global_state(monkeypatch):
    """Lightning's MLflow logger sets MLflow's global tracking URI and its env var: undo it."""
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def run_entry(entry: str, argv: list[str], capsys, stdout: list[str] | None = None):
    """Run a stage command in-process: its exit code and its stderr (stdout: appended to)."""
    capsys.readouterr()
    try:
        ENTRIES[entry](argv)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    if stdout is not None:
        stdout.append(captured.out)
    return code, captured.err


@dataclass(frozen=True)
class Case:
    id: str
    entry: str
    argv: tuple[str, ...]  # {name} placeholders: the paths of the ``inputs`` fixture
    message: str  # a pattern the last stderr line matches after "error: "
    reads: tuple[str, ...]  # inputs that must stay byte-identical
    code: int = 2
    absent: tuple[str, ...] = ()  # outputs a failed run must not leave behind


P = ("--params", "{params}")
T = ("--params", "{train_params}")
E = ("--params", "{train_params}", "paths.models_dir={models}")
EXPORT = ("--checkpoint", "{checkpoint}", "--image-size")
PREDICT = ("{bad_raw}/" + PRELIM, "--out", "{out}/predictions.csv", "--params", "{params}")


CASES = [
    # prepare: layouts it cannot read, bad config values.
    Case(
        "wrong-layout",
        "prepare",
        (*P, "paths.raw_dir={no_layout}"),
        "holds no C-NMC layout",
        ("no_layout",),
    ),
    Case(
        "no-fold-folders",
        "prepare",
        (*P, "paths.raw_dir={no_folds}"),
        "has no fold_<n>/ folders",
        ("no_folds",),
    ),
    Case(
        "missing-labels-csv",
        "prepare",
        (*P, "paths.raw_dir={no_csv}"),
        "missing labels file .*_labels.csv",
        ("no_csv",),
    ),
    Case(
        "labels-csv-bad-header",
        "prepare",
        (*P, "paths.raw_dir={bad_header}"),
        "header must be Patient_ID,new_names,labels",
        ("bad_header",),
    ),
    Case(
        "empty-raw-folder",
        "prepare",
        (*P, "paths.raw_dir={empty_raw}"),
        "holds no C-NMC layout",
        ("empty_raw",),
    ),
    Case(
        "missing-raw-folder",
        "prepare",
        (*P, "paths.raw_dir={out}/nothing"),
        "raw data folder .* does not exist",
        (),
    ),
    Case(
        "output-inside-raw",
        "prepare",
        (*P, "paths.prepared_dir={bad_raw}/prepared"),
        "must lie outside the raw data",
        ("bad_raw",),
        absent=("{bad_raw}/prepared", "{bad_raw}/prepared.tmp"),
    ),
    Case(
        "output-is-a-user-folder",
        "prepare",
        (*P, "paths.prepared_dir={user_folder}"),
        "user_folder exists and was not written by leukemia-mlops",
        ("bad_raw", "user_folder"),
        absent=("{user_folder}.tmp",),
    ),
    Case(
        "unknown-key",
        "prepare",
        (*P, "data.prepare.bogus=1"),
        "data.prepare.bogus: Key 'bogus' not in 'PrepareSpec'",
        ("bad_raw",),
    ),
    Case(
        "wrong-type",
        "prepare",
        (*P, "data.prepare.image_size=abc"),
        "data.prepare.image_size: .*'abc'.* Integer",
        ("bad_raw",),
    ),
    Case(
        "out-of-range",
        "prepare",
        (*P, "data.prepare.image_size=4"),
        "image_size must be >= 16, got 4",
        ("bad_raw",),
    ),
    Case(
        "unknown-option",
        "prepare",
        (*P, "data.prepare.fit=stretch"),
        "fit must be 'window' or 'box'",
        ("bad_raw",),
    ),
    Case(
        "bad-split",
        "prepare",
        (*P, "data.split.val=nonsense"),
        "split.val must be subjects or fold",
        ("bad_raw",),
    ),
    pytest.param(
        Case(
            "missing-params", "prepare", ("--params", "{out}/none.yaml"), "none.yaml not found", ()
        ),
    ),
    # train: bad config values, caches and weights.
    Case("missing-params", "train", ("--params", "{out}/none.yaml"), "none.yaml not found", ()),
    pytest.param(
        Case("wrong-type", "train", (*T, "trainer.max_epochs=abc"), "trainer.max_epochs", ()),
    ),
    Case(
        "out-of-range-lr",
        "train",
        (*T, "model.optimizer.lr=-1"),
        "model.optimizer.lr must be > 0",
        (),
    ),
    Case(
        "unknown-backbone",
        "train",
        (*T, "model.backbone=resnet99"),
        "model.backbone must be one of",
        (),
    ),
    Case(
        "unknown-model-key",
        "train",
        (*T, "--model-key", "nope"),
        "no model config under 'nope'",
        (),
    ),
    Case(
        "no-cache",
        "train",
        ("--params", "{no_cache_params}"),
        "no_such_cache records no data identity: rebuild it",
        (),
    ),
    Case(
        "truncated-cache",
        "train",
        ("--params", "{short_npy_params}"),
        "mmap length is greater than file size",
        ("short_npy",),
    ),
    Case(
        "missing-weights",
        "train",
        (*T, "model.weights={out}/none.pth"),
        "model.weights: no such file",
        (),
    ),
    Case(
        "junk-weights",
        "train",
        (*T, "model.weights={junk_ckpt}"),
        "model.weights: cannot load .* safely",
        ("junk_ckpt",),
    ),
    Case(
        "foreign-weights",
        "train",
        (*T, "model.weights={foreign_ckpt}"),
        "model.weights: .* does not fit this backbone",
        ("foreign_ckpt",),
    ),
    pytest.param(
        Case(
            "weights-not-only-tensors",
            "train",
            (*T, "model.weights={object_pth}"),
            "model.weights: cannot load .* safely",
            ("object_pth",),
        ),
    ),
    pytest.param(
        Case("unknown-key", "train", (*T, "trainer.bogus=1"), "trainer.bogus", ()),
    ),
    pytest.param(
        Case(
            "out-of-range-batch",
            "train",
            (*T, "datamodule.batch_size=0"),
            "batch_size must be >= 1",
            (),
        ),
    ),
    pytest.param(
        Case(
            "bad-tracking-uri",
            "train",
            (*T, "logger.mlflow.tracking_uri=notascheme://x"),
            "notascheme",
            (),
        ),
    ),
    pytest.param(
        Case(
            "zero-byte-cache",
            "train",
            ("--params", "{zero_npy_params}"),
            "images.npy",
            ("zero_npy",),
        ),
    ),
    # predict: models that are not checkpoints, bad inputs and options.
    Case(
        "junk-checkpoint",
        "predict",
        ("{junk_ckpt}", *PREDICT),
        "is not a model checkpoint",
        ("junk_ckpt", "bad_raw"),
    ),
    Case(
        "empty-checkpoint",
        "predict",
        ("{empty_ckpt}", *PREDICT),
        "is not a model checkpoint",
        ("empty_ckpt",),
    ),
    Case(
        "truncated-checkpoint",
        "predict",
        ("{truncated_ckpt}", *PREDICT),
        "is not a model checkpoint",
        ("truncated_ckpt",),
    ),
    Case(
        "foreign-checkpoint",
        "predict",
        ("{foreign_ckpt}", *PREDICT),
        "is not a model checkpoint",
        ("foreign_ckpt",),
    ),
    Case(
        "image-as-model",
        "predict",
        ("{image_model}", *PREDICT),
        "model must be a .ckpt or .onnx file",
        ("image_model",),
    ),
    Case(
        "missing-input",
        "predict",
        ("{checkpoint}", "{out}/none", "--params", "{params}"),
        "no such file or folder",
        ("checkpoint",),
    ),
    Case(
        "empty-input-folder",
        "predict",
        ("{checkpoint}", "{no_files}", "--params", "{params}"),
        "no files found in",
        ("checkpoint",),
    ),
    Case(
        "threshold-out-of-range",
        "predict",
        ("{checkpoint}", *PREDICT, "--threshold", "2"),
        r"threshold must be in \[0, 1\]",
        ("checkpoint",),
    ),
    Case(
        "batch-size-zero",
        "predict",
        ("{checkpoint}", *PREDICT, "--batch-size", "0"),
        "batch_size must be >= 1",
        ("checkpoint",),
    ),
    Case(
        "metrics-without-threshold",
        "predict",
        ("{checkpoint}", *PREDICT, "--metrics", "{no_threshold}"),
        "holds no decision threshold",
        ("no_threshold",),
    ),
    Case(
        "no-params-no-declared-settings",
        "predict",
        ("{checkpoint}", "{bad_raw}/" + PRELIM, "--params", "{out}/none.yaml"),
        "none.yaml not found: it must give image_size",
        ("checkpoint",),
    ),
    pytest.param(
        Case(
            "unknown-mlflow-run",
            "predict",
            ("runs:/0123456789abcdef/model", *PREDICT),
            "0123456789abcdef",
            (),
        ),
    ),
    # evaluate
    Case(
        "missing-checkpoint",
        "evaluate",
        (*T, "paths.models_dir={out}/none"),
        "no such checkpoint",
        (),
    ),
    Case(
        "junk-checkpoint",
        "evaluate",
        (*T, "paths.models_dir={junk_models}"),
        "is not a model checkpoint",
        ("junk_models",),
    ),
    Case(
        "unknown-key",
        "evaluate",
        (*E, "evaluate.bogus=1"),
        "evaluate.bogus: Key 'bogus' not in 'EvaluateSpec'",
        ("models",),
    ),
    Case(
        "wrong-type",
        "evaluate",
        (*E, "evaluate.n_resamples=abc"),
        "evaluate.n_resamples: .*'abc'",
        ("models",),
    ),
    Case(
        "out-of-range",
        "evaluate",
        (*E, "evaluate.n_resamples=-1"),
        "n_resamples must be >= 1, got -1",
        ("models",),
    ),
    Case(
        "no-cache",
        "evaluate",
        ("--params", "{no_cache_params}", "paths.models_dir={models}"),
        "no prepared data in",
        ("models",),
    ),
    Case(
        "truncated-cache",
        "evaluate",
        ("--params", "{short_npy_params}", "paths.models_dir={models}"),
        "mmap length is greater than file size",
        ("models", "short_npy"),
    ),
    pytest.param(
        Case(
            "zero-byte-cache",
            "evaluate",
            ("--params", "{zero_npy_params}", "paths.models_dir={models}"),
            "images.npy",
            ("models", "zero_npy"),
        ),
    ),
    # export: a failed export must not leave a model file behind
    Case(
        "junk-checkpoint",
        "export",
        ("--checkpoint", "{junk_ckpt}", "--image-size", "48", "--out", "{out}/junk.onnx"),
        "is not a model checkpoint",
        ("junk_ckpt",),
        absent=("{out}/junk.onnx",),
    ),
    Case(
        "missing-checkpoint",
        "export",
        ("--checkpoint", "{out}/none.ckpt", "--image-size", "48", "--out", "{out}/none.onnx"),
        "no such checkpoint",
        (),
        absent=("{out}/none.onnx",),
    ),
    pytest.param(
        Case(
            "missing-parity-cache",
            "export",
            (*EXPORT, "48", "--prepared-dir", "{out}/none", "--out", "{out}/unchecked.onnx"),
            "no prepare cache at .*none for the parity check",
            ("checkpoint",),
            absent=("{out}/unchecked.onnx",),
        ),
    ),
    pytest.param(
        Case(
            "image-size-negative",
            "export",
            (*EXPORT, "-5", "--params", "{out}/none.yaml", "--out", "{out}/negative.onnx"),
            "image",
            ("checkpoint",),
            absent=("{out}/negative.onnx",),
        ),
    ),
]


def case_id(case) -> str:
    return f"{case.entry}-{case.id}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bad_input_is_one_clear_error_and_changes_no_input(case: Case, inputs, capsys):
    names = {key: str(value) for key, value in inputs.items()}
    argv = [arg.format(**names) for arg in case.argv]
    before = {name: tree_digest_of(inputs[name]) for name in case.reads}
    code, err = run_entry(case.entry, argv, capsys)
    lines = err.strip().splitlines()
    assert code == case.code, err[-3000:]
    assert lines and lines[-1].startswith("error: "), err[-3000:]
    assert sum(line.startswith("error: ") for line in lines) == 1, err[-3000:]
    assert "Traceback" not in err
    assert_matches(case.message, lines[-1].removeprefix("error: "))
    assert {name: tree_digest_of(inputs[name]) for name in case.reads} == before
    absent = [Path(path.format(**names)) for path in case.absent]
    if case.entry == "prepare":
        absent.append(inputs["out"] / "prepared")
    assert [path for path in absent if path.exists()] == []  # nothing half-written


def tree_digest_of(path: Path) -> dict[str, str] | str:
    return tree_digest(path) if path.is_dir() else hashlib.md5(path.read_bytes()).hexdigest()


def assert_matches(pattern: str, line: str) -> None:
    assert re.search(pattern, line), f"{pattern!r} not in {line!r}"


def test_prepare_skips_and_reports_every_unusable_file(inputs, tiny_raw, tiny_prepared, capsys):
    raw, out = inputs["bad_raw"], inputs["out"] / "prepared_bad_raw"
    before = tree_digest(raw)
    cell = next((tiny_raw / FOLD / "all").glob("*.bmp")).read_bytes()
    added = bad_files(cell)
    argv = ["--params", str(inputs["params"]), f"paths.prepared_dir={out}"]
    argv.append(f"paths.reports_dir={inputs['out'] / 'reports_bad_raw'}")
    code, err = run_entry("prepare", argv, capsys)
    assert code == 0, err[-3000:]
    assert "Traceback" not in err

    skipped = pd.read_csv(out / "skipped.csv")
    reasons = dict(zip(skipped["path"], skipped["reason"], strict=True))
    expected = {path: reason for path, (_, reason) in added.items() if reason is not None}
    expected.update([MISSING, SUBFOLDER])
    assert reasons == expected  # every unusable file, each with its reason, nothing else

    manifest = pd.read_parquet(out / "manifest.parquet")
    usable = {path for path, (_, reason) in added.items() if reason is None}
    usable.discard(f"{FOLD}/all/nested/UID_90_9_1_all.bmp")
    assert usable <= set(manifest["path"])  # converted modes and odd sizes are kept
    assert len(manifest) == len(pd.read_parquet(tiny_prepared / "manifest.parquet")) + len(usable)
    report = json.loads((inputs["out"] / "reports_bad_raw/data.json").read_text())
    assert report["skipped"] == len(expected)
    assert sum(report["skipped_by_reason"].values()) == len(expected)
    assert tree_digest(raw) == before


def test_prepare_with_no_decodable_image_fails_clearly(inputs, capsys):
    raw, out = inputs["all_undecodable"], inputs["out"] / "prepared_undecodable"
    argv = ["--params", str(inputs["params"]), f"paths.raw_dir={raw}"]
    before = tree_digest(raw)
    code, err = run_entry("prepare", [*argv, f"paths.prepared_dir={out}"], capsys)
    assert tree_digest(raw) == before
    assert code == 2, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: "), err[-3000:]
    assert not out.exists()


def test_predict_scores_what_it_can_and_reports_the_rest(inputs, tiny_raw, capsys):
    folder = inputs["bad_raw"] / FOLD / "all"
    before = tree_digest(folder)
    out = inputs["out"] / "bad_folder_predictions.csv"
    argv = [str(inputs["checkpoint"]), str(folder), "--out", str(out)]
    printed: list[str] = []
    code, err = run_entry("predict", [*argv, "--params", str(inputs["params"])], capsys, printed)
    assert code == 0, err[-3000:]
    table = pd.read_csv(out, keep_default_na=False).set_index("file")
    cell = next((tiny_raw / FOLD / "all").glob("*.bmp")).read_bytes()
    for relative, (_, reason) in bad_files(cell).items():
        if not relative.startswith(f"{FOLD}/all/"):
            continue
        row = table.loc[str(inputs["bad_raw"] / relative)]
        if reason is None or any(word in reason for word in ("name", "label", "subject")):
            # predict does not read names or folders: every decodable file is scored
            assert row["error"] == "" and 0 <= float(row["prob_all"]) <= 1, relative
        else:
            assert (row["error"], row["label"]) == (reason, ""), relative
    assert f"{len(table)} files scored" in printed[0]
    assert tree_digest(folder) == before


def test_real_command_lines_fail_cleanly(inputs):
    """The processes themselves: Hydra's main with a bad override, and ``cli.prepare``."""
    raw = inputs["no_layout"]
    before = tree_digest(raw)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    prepare_args = ["--params", str(inputs["params"]), f"paths.raw_dir={raw}"]
    commands = {
        "hydra": [sys.executable, "-m", "leukemia_mlops.train", "trainer.max_epochz=1"],
        "prepare": [sys.executable, "-m", "leukemia_mlops.cli.prepare", *prepare_args],
    }
    processes = {
        name: subprocess.Popen(
            command, cwd=inputs["out"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for name, command in commands.items()
    }
    try:
        errs = {name: p.communicate(timeout=180)[1].decode() for name, p in processes.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    hydra, hydra_err = processes["hydra"], errs["hydra"]
    prepare, prepare_err = processes["prepare"], errs["prepare"]

    # Hydra reports a bad override itself: exit 1, the key named, no traceback; its last
    # line is its own hint (HYDRA_FULL_ERROR), not an `error:` line.
    assert hydra.returncode == 1, hydra_err[-3000:]
    assert "Could not override 'trainer.max_epochz'" in hydra_err
    assert "Key 'max_epochz' is not in struct" in hydra_err
    assert "Traceback" not in hydra_err
    assert prepare.returncode == 2, prepare_err[-3000:]
    assert prepare_err.strip().splitlines()[-1].startswith(f"error: {raw} holds no C-NMC layout")
    assert tree_digest(raw) == before
    assert not (inputs["out"] / "outputs").exists()  # Hydra made no run directory


def test_a_bug_keeps_its_traceback_and_is_not_called_bad_input(
    inputs, tmp_path, monkeypatch, capsys
):
    """A TypeError inside a stage (here in the datamodule the config names) is a bug: its
    traceback, a line asking to report it and status 1, never a one-line ``error:``."""
    (tmp_path / "buggy_stage.py").write_text(
        "def datamodule(**kwargs):\n    return len(kwargs['batch_size'])  # the bug\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["--params", str(inputs["train_params"]), "datamodule._target_=buggy_stage.datamodule"]
    code, err = run_entry("train", argv, capsys)
    assert code == 1, err[-3000:]
    assert "Traceback (most recent call last)" in err
    assert "return len(kwargs['batch_size'])  # the bug" in err  # the line of the bug
    assert "TypeError: object of type 'int' has no len()" in err
    assert err.strip().splitlines()[-1] == BUG_HINT
    assert not [line for line in err.splitlines() if line.startswith("error: ")]
