"""The prepare stage: cache contents, manifest, report, bad input and atomic output."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import TINY_SIZE, tree_digest

from leukemia_mlops.data.images import bgr_to_rgb, decode_bgr, to_training_image
from leukemia_mlops.data.naming import HEM, format_cell_name, parse_cell_name
from leukemia_mlops.data.prepare import PrepareSpec, prepare_dataset
from leukemia_mlops.data.splits import SplitSpec


def test_cache_equals_freshly_decoded_images(tiny_raw, tiny_prepared):
    images = np.load(tiny_prepared / "images.npy", mmap_mode="r")
    manifest = pd.read_parquet(tiny_prepared / "manifest.parquet")
    assert images.shape == (len(manifest), TINY_SIZE, TINY_SIZE, 3) and images.dtype == np.uint8
    for index in range(0, len(manifest), 7):
        row = manifest.iloc[index]
        raw = bgr_to_rgb(decode_bgr((tiny_raw / row["path"]).read_bytes()))
        assert np.array_equal(images[index], to_training_image(raw, TINY_SIZE, 450))
        assert (row["width"], row["height"]) == (raw.shape[1], raw.shape[0])
        assert row["size_bytes"] == (tiny_raw / row["path"]).stat().st_size


def test_manifest_columns_and_boxes(tiny_prepared):
    manifest = pd.read_parquet(tiny_prepared / "manifest.parquet")
    expected = {
        "path",
        "label",
        "subject",
        "fold",
        "source_split",
        "content_hash",
        "size_bytes",
        "box_x0",
        "box_y0",
        "box_x1",
        "box_y1",
        "split",
    }
    assert expected <= set(manifest.columns)
    assert (manifest["box_x1"] > manifest["box_x0"]).all()
    assert (manifest["box_x1"] <= manifest["width"]).all()
    assert manifest["content_hash"].str.len().eq(32).all()


def test_bad_files_are_skipped_with_reasons_and_raw_data_is_untouched(tiny_raw, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(tiny_raw, raw)
    hem = next((raw / "C-NMC_Leukemia/training_data/fold_0/hem").glob("*.bmp"))
    subject = parse_cell_name(hem.name).subject
    corrupt = hem.with_name(format_cell_name(subject, 91, 1, HEM))
    corrupt.write_bytes(b"BM" + b"\x00" * 100)
    blank = hem.with_name(format_cell_name(subject, 92, 1, HEM))
    cv2.imwrite(str(blank), np.zeros((450, 450, 3), np.uint8))
    before = tree_digest(raw)

    report = prepare_dataset(
        raw, tmp_path / "out", PrepareSpec(image_size=16, workers=2), SplitSpec(), progress=False
    )
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    reasons = dict(zip(skipped["path"].map(lambda p: Path(p).name), skipped["reason"], strict=True))
    assert reasons[corrupt.name].startswith("not a decodable image")
    assert reasons[blank.name] == "blank image (no cell pixels)"
    assert report["skipped"] == 2
    images = np.load(tmp_path / "out" / "images.npy")
    assert (
        len(images) == report["images"] == len(pd.read_parquet(tmp_path / "out/manifest.parquet"))
    )
    assert tree_digest(raw) == before


def test_report_counts_subjects_and_classes(tiny_raw, tmp_path):
    report = prepare_dataset(
        tiny_raw,
        tmp_path / "out",
        PrepareSpec(image_size=16, workers=1),
        SplitSpec(),
        progress=False,
    )
    manifest = pd.read_parquet(tmp_path / "out/manifest.parquet")
    assert report["images"] == len(manifest)
    assert sum(report[s]["images"] for s in ("train", "val", "test")) + report["unlabelled"] == (
        len(manifest)
    )
    assert (
        report["test"]["subjects"] == manifest.loc[manifest["split"] == "test", "subject"].nunique()
    )
    assert report["duplicate_images"] == 0


def test_output_inside_the_raw_folder_is_refused(tiny_raw):
    with pytest.raises(ValueError, match="must lie outside the raw data"):
        prepare_dataset(tiny_raw, tiny_raw / "prepared", PrepareSpec(), SplitSpec())


def test_cli_reports_a_bad_config_value_in_one_line(tmp_path):
    params = tmp_path / "params.yaml"
    subprocess.run(
        [sys.executable, "-m", "leukemia_mlops.cli.params", "--out", str(params)],
        check=True,
        capture_output=True,
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "leukemia_mlops.cli.prepare",
            "--params",
            str(params),
            "data.prepare.image_size=tiny",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: bad config value data.prepare.image_size")
    assert "image_size" in last
    assert json.dumps(result.stdout) is not None
