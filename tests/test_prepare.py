"""The prepare stage: cache contents, manifest, report, bad input and atomic output."""

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
from leukemia_mlops.data.naming import HEM, LABEL_NAMES, format_cell_name, parse_cell_name
from leukemia_mlops.data.prepare import PrepareSpec, prepare_dataset
from leukemia_mlops.data.splits import SplitSpec
from leukemia_mlops.errors import InputError
from leukemia_mlops.owned import MARKER

PRELIM = "C-NMC_Leukemia/validation_data/C-NMC_test_prelim_phase_data"
PRELIM_CSV = f"{PRELIM}_labels.csv"


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
    for start, end, extent in (("box_x0", "box_x1", "width"), ("box_y0", "box_y1", "height")):
        assert (manifest[start] >= 0).all()
        assert (manifest[end] > manifest[start]).all()
        assert (manifest[end] <= manifest[extent]).all()
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
    assert "Traceback" not in result.stderr  # the one line replaces the traceback


def prepare(raw: Path, out: Path) -> dict:
    return prepare_dataset(raw, out, PrepareSpec(image_size=16, workers=1), SplitSpec(), False)


@pytest.mark.parametrize("folder", ["prepared", "prepared.tmp"])
def test_a_folder_prepare_did_not_write_is_never_replaced(folder, tiny_raw, tmp_path):
    """``paths.prepared_dir=~/Documents`` (or its ``.tmp`` sibling) is refused, not wiped."""
    user = tmp_path / folder
    user.mkdir()
    (user / "thesis.docx").write_bytes(b"years of work")
    before = tree_digest(tmp_path)
    with pytest.raises(InputError, match=f"^{user} exists and was not written by leukemia-mlops"):
        prepare(tiny_raw, tmp_path / "prepared")
    assert tree_digest(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder]


def test_prepare_replaces_its_own_cache_marked_or_older(tiny_raw, tmp_path):
    out = tmp_path / "prepared"
    prepare(tiny_raw, out)
    assert (out / MARKER).is_file()
    (out / "stale.txt").write_text("from the last run")
    prepare(tiny_raw, out)  # marked: replaced
    assert not (out / "stale.txt").exists()
    (out / MARKER).unlink()  # a cache written before markers existed has its manifest
    (out / "stale.txt").write_text("from the last run")
    prepare(tiny_raw, out)
    assert not (out / "stale.txt").exists() and (out / MARKER).is_file()
    assert not out.with_name("prepared.tmp").exists()


def test_the_plain_layout_with_unparseable_names_is_refused_clearly(tiny_raw, tmp_path):
    """The issue's case: 8 images copied into both all/ and hem/ under plain names must not
    become 16 one-image subjects split image by image."""
    raw = tmp_path / "raw"
    cells = sorted((tiny_raw / "C-NMC_Leukemia/training_data/fold_0/all").glob("*.bmp"))[:8]
    for label in ("all", "hem"):
        (raw / label).mkdir(parents=True)
        for number, cell in enumerate(cells):
            shutil.copy(cell, raw / label / f"cell{number}.bmp")
    with pytest.raises(
        InputError,
        match=r"no usable images under .*raw \(16 files skipped: 16 file name not of the form "
        r"UID_<subject>_<image>_<cell>_<all\|hem>\)$",
    ):
        prepare(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def copy_as(source: Path, folder: Path, subject: str, label: int) -> Path:
    """Copy a cell image under a new C-NMC name of ``subject``."""
    target = folder / format_cell_name(subject, 99, 1, label)
    shutil.copy(source, target)
    return target


def test_identical_images_never_land_in_two_splits(tiny_raw, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(tiny_raw, raw)
    fold = raw / "C-NMC_Leukemia/training_data/fold_0"
    # A test-split (prelim) image filed again under a training subject of the same label.
    labels = pd.read_csv(raw / PRELIM_CSV)
    first = labels.iloc[0]
    prelim_image = raw / PRELIM / first["new_names"]
    label = int(first["labels"])
    folder = fold / LABEL_NAMES[label]
    subject = parse_cell_name(next(folder.glob("*.bmp")).name).subject
    copy = copy_as(prelim_image, folder, subject, label)

    prepare(raw, tmp_path / "out")
    manifest = pd.read_parquet(tmp_path / "out/manifest.parquet")
    labelled = manifest[manifest["label"] >= 0]
    assert (labelled.groupby("content_hash")["split"].nunique() == 1).all()
    skipped = pd.read_csv(tmp_path / "out/skipped.csv")
    rel = copy.relative_to(raw).as_posix()
    assert skipped.set_index("path")["reason"].to_dict() == {
        rel: f"identical to {prelim_image.relative_to(raw).as_posix()} in the test split"
    }
    assert (
        manifest.loc[manifest["path"] == prelim_image.relative_to(raw).as_posix(), "split"].item()
        == "test"
    )
    images = np.load(tmp_path / "out/images.npy")
    assert len(images) == len(manifest)  # the cache rows still match the manifest


def test_identical_images_with_conflicting_labels_are_left_out_pair_by_pair(tiny_raw, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(tiny_raw, raw)
    fold = raw / "C-NMC_Leukemia/training_data/fold_0"
    blasts = sorted((fold / "all").glob("*.bmp"))[:2]
    copies = [copy_as(blast, fold / "hem", f"H9{n}", HEM) for n, blast in enumerate(blasts)]

    report = prepare(raw, tmp_path / "out")
    manifest = pd.read_parquet(tmp_path / "out/manifest.parquet")
    skipped = pd.read_csv(tmp_path / "out/skipped.csv").set_index("path")["reason"].to_dict()
    expected = {}
    for blast, copy in zip(blasts, copies, strict=True):
        blast, copy = blast.relative_to(raw).as_posix(), copy.relative_to(raw).as_posix()
        expected[blast] = f"identical to {copy} (hem) but labelled all: conflicting labels"
        expected[copy] = f"identical to {blast} (all) but labelled hem: conflicting labels"
    assert skipped == expected
    assert not manifest["path"].isin(list(expected)).any()  # out of training and evaluation
    assert report["skipped"] == 4
    images = np.load(tmp_path / "out/images.npy")
    assert len(images) == len(manifest)
    # The cache rows are the right images after leaving rows out.
    for index in range(len(manifest)):
        row = manifest.iloc[index]
        raw_image = bgr_to_rgb(decode_bgr((raw / row["path"]).read_bytes()))
        assert np.array_equal(images[index], to_training_image(raw_image, 16, 450))
