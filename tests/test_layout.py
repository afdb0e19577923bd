"""The reader on generated fixtures in the real Kaggle/TCIA layouts, and on bad input."""

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import tree_digest

from leukemia_mlops.data.layout import DatasetLayoutError, Skip, scan_dataset
from leukemia_mlops.data.naming import ALL, HEM, parse_cell_name

TRAIN = "C-NMC_Leukemia/training_data"
PRELIM = "C-NMC_Leukemia/validation_data/C-NMC_test_prelim_phase_data"


@pytest.fixture
def raw_copy(tiny_raw: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "raw"
    shutil.copytree(tiny_raw, copy)
    return copy


def test_reads_every_split_of_the_kaggle_layout(tiny_raw):
    table, skipped = scan_dataset(tiny_raw)
    assert skipped == []
    assert set(table["source_split"]) == {"train", "prelim", "final"}
    train = table[table["source_split"] == "train"]
    assert set(train["fold"]) == {0, 1, 2}
    for row in train.itertuples():
        cell = parse_cell_name(Path(row.path).name)
        assert (cell.subject, cell.label) == (row.subject, row.label)
        assert Path(row.path).parent.name == ("all" if row.label == 1 else "hem")
    assert (table.loc[table["source_split"] == "final", "label"] == -1).all()


def test_prelim_labels_come_from_the_csv(tiny_raw):
    table, _ = scan_dataset(tiny_raw)
    labels = pd.read_csv(tiny_raw / f"{PRELIM}_labels.csv")
    prelim = table[table["source_split"] == "prelim"].set_index("path")
    assert len(prelim) == len(labels)
    for original, new_name, label in labels.itertuples(index=False):
        row = prelim.loc[f"{PRELIM}/{new_name}"]
        assert row["label"] == label
        assert row["subject"] == parse_cell_name(original).subject


def test_reads_the_tcia_layout(tiny_raw, tmp_path):
    tcia = tmp_path / "tcia"
    shutil.copytree(tiny_raw / TRAIN, tcia / "C-NMC_training_data")
    shutil.copytree(tiny_raw / PRELIM, tcia / "C-NMC_test_prelim_phase_data")
    shutil.copy(tiny_raw / f"{PRELIM}_labels.csv", tcia)
    table, skipped = scan_dataset(tcia)
    kaggle, _ = scan_dataset(tiny_raw)
    assert skipped == []
    assert len(table) == (kaggle["source_split"] != "final").sum()


def test_reads_a_plain_all_hem_folder_and_never_makes_a_file_its_own_subject(tiny_raw, tmp_path):
    plain = tmp_path / "plain"
    for label in ("all", "hem"):
        (plain / label).mkdir(parents=True)
        for src in sorted((tiny_raw / TRAIN / "fold_0" / label).glob("*.bmp"))[:2]:
            shutil.copy(src, plain / label)
    shutil.copy(next((plain / "all").iterdir()), plain / "all" / "any_name.bmp")
    table, skipped = scan_dataset(plain)
    # A name that gives no subject is skipped: as its own subject it would split by image.
    assert skipped == [
        Skip("all/any_name.bmp", "file name not of the form UID_<subject>_<image>_<cell>_<all|hem>")
    ]
    assert len(table) == 4
    assert list(table["subject"]) == [parse_cell_name(Path(p).name).subject for p in table["path"]]


@pytest.mark.parametrize("layout", ["plain", "kaggle"])
def test_a_hem_cell_of_a_subject_not_marked_healthy_is_reported_by_subject(
    layout, tiny_raw, raw_copy
):
    cell = next((tiny_raw / TRAIN / "fold_0" / "hem").glob("*.bmp")).read_bytes()
    root = raw_copy if layout == "kaggle" else raw_copy.parent / "plain"
    folder = root / (f"{TRAIN}/fold_0" if layout == "kaggle" else "")
    names = ["hem/UID_77_1_1_hem.bmp", "all/UID_H78_1_1_all.bmp"]  # reported
    for relative in [*names, "all/UID_77_2_1_all.bmp", "hem/UID_H78_2_1_hem.bmp"]:
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(cell)
    table, skipped = scan_dataset(root)
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert (
        reasons["UID_77_1_1_hem.bmp"] == "subject 77 is not marked healthy (H) but the cell is hem"
    )
    assert reasons["UID_H78_1_1_all.bmp"] == "subject H78 is marked healthy (H) but the cell is all"
    # Each subject keeps only the cells of its own label: none holds both.
    by_subject = table[table["label"] >= 0].groupby("subject")["label"]
    assert (by_subject.nunique() == 1).all()
    assert (by_subject.first()["77"], by_subject.first()["H78"]) == (ALL, HEM)


def test_bad_files_are_reported_and_the_tree_is_left_intact(raw_copy):
    fold = raw_copy / TRAIN / "fold_0"
    (fold / "all" / "notes.txt").write_text("x")
    (fold / "all" / "photo.bmp").write_bytes(b"")
    hem_as_all = next((fold / "hem").glob("*.bmp"))
    shutil.copy(hem_as_all, fold / "all" / hem_as_all.name)
    (fold / "all" / "nested").mkdir()
    for cell in (raw_copy / TRAIN / "fold_1" / "hem").glob("*.bmp"):
        cell.unlink()
    before = tree_digest(raw_copy)

    _, skipped = scan_dataset(raw_copy)
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert reasons["notes.txt"].startswith("not an image file")
    assert reasons["photo.bmp"].startswith("file name not of the form")
    assert reasons[hem_as_all.name] == "label in file name contradicts its folder all/"
    assert reasons["nested"] == "unexpected sub-folder"
    assert reasons["hem"] == "empty class folder"
    assert tree_digest(raw_copy) == before


def test_prelim_csv_problems(raw_copy):
    csv = raw_copy / f"{PRELIM}_labels.csv"
    labels = pd.read_csv(csv)
    extra = raw_copy / PRELIM / "9999.bmp"
    cv2.imwrite(str(extra), np.zeros((4, 4, 3), np.uint8))
    labels.loc[len(labels)] = ["UID_1_1_1_all.bmp", "../../escape.bmp", 1]
    labels.loc[0, "labels"] = 7
    labels.to_csv(csv, index=False)
    _, skipped = scan_dataset(raw_copy)
    reasons = {s.path: s.reason for s in skipped}
    assert reasons[f"{PRELIM}/9999.bmp"].startswith("not listed in")
    assert reasons["../../escape.bmp"].startswith("listed in")
    assert any("is not 0 or 1" in r for r in reasons.values())


def test_missing_or_malformed_prelim_csv_is_a_clear_error(raw_copy):
    csv = raw_copy / f"{PRELIM}_labels.csv"
    csv.write_text("name,label\n1.bmp,1\n")
    with pytest.raises(DatasetLayoutError, match="header must be Patient_ID,new_names,labels"):
        scan_dataset(raw_copy)
    csv.unlink()
    with pytest.raises(DatasetLayoutError, match="missing labels file"):
        scan_dataset(raw_copy)


def test_unknown_layout_is_a_clear_error(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetLayoutError, match="holds no C-NMC layout"):
        scan_dataset(tmp_path)
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        scan_dataset(tmp_path / "missing")
