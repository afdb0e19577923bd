"""Scan a raw C-NMC dataset folder into a table of labelled cell images.

Three layouts are accepted, all relative to the raw data folder:

* Kaggle: ``C-NMC_Leukemia/training_data/fold_{0,1,2}/{all,hem}/*.bmp``, the labelled
  ``validation_data/C-NMC_test_prelim_phase_data/*.bmp`` with its ``..._labels.csv``, and the
  unlabelled ``testing_data/C-NMC_test_final_phase_data/*.bmp``;
* TCIA: the same, with ``C-NMC_training_data/`` as the training folder beside
  ``C-NMC_test_prelim_phase_data/`` and ``C-NMC_test_final_phase_data/``;
* plain: ``all/`` and ``hem/`` sub-folders of files named as in C-NMC (the name gives the
  subject).

Files that cannot be used are returned as :class:`Skip` records with a reason; nothing in the
raw folder is ever modified.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd

from leukemia_mlops.data.naming import ALL, HEM, LABELS_BY_NAME, CellNameError, parse_cell_name
from leukemia_mlops.errors import InputError

#: The image files a dataset folder and ``predict`` read.
IMAGE_SUFFIXES = frozenset({".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff"})
UNLABELLED = -1
PRELIM = "C-NMC_test_prelim_phase_data"
FINAL = "C-NMC_test_final_phase_data"
LABELS_HEADER = ("Patient_ID", "new_names", "labels")
#: The columns of a scanned dataset table and their dtypes.
COLUMN_TYPES = {
    "path": "string",
    "label": "int64",
    "subject": "string",
    "image_id": "Int64",
    "cell_id": "Int64",
    "fold": "Int64",
    "source_split": "string",
}
_FOLD = re.compile(r"^fold_(\d+)$")


class DatasetLayoutError(InputError):
    """The raw data folder does not hold a dataset layout this reader understands."""


@dataclass(frozen=True)
class Skip:
    """A file left out of the dataset, with the reason."""

    path: str
    reason: str


@dataclass
class _Scan:
    root: Path
    rows: list[dict]
    skipped: list[Skip]

    def rel(self, path: Path) -> str:
        return PurePosixPath(path.relative_to(self.root)).as_posix()

    def skip(self, path: Path, reason: str) -> None:
        self.skipped.append(Skip(self.rel(path), reason))


def scan_dataset(raw_dir: str | Path) -> tuple[pd.DataFrame, list[Skip]]:
    """Return the labelled (and unlabelled test) images under ``raw_dir`` and the skipped files."""
    root = Path(raw_dir)
    if not root.is_dir():
        raise DatasetLayoutError(f"raw data folder {root} does not exist")
    scan = _Scan(root, [], [])
    training = _first_dir(
        root, ["C-NMC_Leukemia/training_data", "training_data", "C-NMC_training_data"]
    )
    if training is not None:
        _scan_training(scan, training)
        prelim = _first_dir(
            root, [f"C-NMC_Leukemia/validation_data/{PRELIM}", f"validation_data/{PRELIM}", PRELIM]
        )
        if prelim is not None:
            _scan_prelim(scan, prelim)
        final = _first_dir(
            root, [f"C-NMC_Leukemia/testing_data/{FINAL}", f"testing_data/{FINAL}", FINAL]
        )
        if final is not None:
            _scan_unlabelled(scan, final)
    elif (root / "all").is_dir() or (root / "hem").is_dir():
        for name, label in LABELS_BY_NAME.items():
            _scan_class_folder(scan, root / name, label, fold=None, split="plain")
    else:
        raise DatasetLayoutError(
            f"{root} holds no C-NMC layout: expected C-NMC_Leukemia/training_data/fold_*/, "
            "C-NMC_training_data/fold_*/ or all/ and hem/ sub-folders"
        )
    table = pd.DataFrame(scan.rows, columns=list(COLUMN_TYPES)).astype(COLUMN_TYPES)
    return table, scan.skipped


def _first_dir(root: Path, candidates: list[str]) -> Path | None:
    return next((root / c for c in candidates if (root / c).is_dir()), None)


def _scan_training(scan: _Scan, training: Path) -> None:
    folds = sorted(p for p in training.iterdir() if p.is_dir() and _FOLD.match(p.name))
    if not folds:
        raise DatasetLayoutError(f"{training} has no fold_<n>/ folders")
    for fold_dir in folds:
        fold = int(_FOLD.match(fold_dir.name)[1])
        for name, label in LABELS_BY_NAME.items():
            _scan_class_folder(scan, fold_dir / name, label, fold=fold, split="train")


def _image_files(scan: _Scan, folder: Path) -> list[Path]:
    """The image files of a folder; anything else is reported as skipped."""
    images = []
    for path in sorted(folder.iterdir()):
        if path.is_dir():
            scan.skip(path, "unexpected sub-folder")
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            scan.skip(path, f"not an image file ({path.suffix or 'no extension'})")
        else:
            images.append(path)
    return images


def _scan_class_folder(scan: _Scan, folder: Path, label: int, fold: int | None, split: str) -> None:
    """Add a class folder's images; a name that gives no subject is skipped, never guessed.

    (Taking each such file as its own subject would silently split by image, the leakage
    subject-level splits exist to prevent.)
    """
    if not folder.is_dir():
        scan.skip(folder, "missing class folder")
        return
    images = _image_files(scan, folder)
    if not images:
        scan.skip(folder, "empty class folder")
    for path in images:
        try:
            cell = parse_cell_name(path.name)
        except CellNameError as err:
            scan.skip(path, str(err))
            continue
        if cell.label != label:
            scan.skip(path, f"label in file name contradicts its folder {folder.name}/")
            continue
        scan.rows.append(
            _row(scan.rel(path), label, cell.subject, cell.image_id, cell.cell_id, fold, split)
        )


def _scan_prelim(scan: _Scan, prelim: Path) -> None:
    labels_csv = prelim.parent / f"{prelim.name}_labels.csv"
    if not labels_csv.is_file():
        raise DatasetLayoutError(f"missing labels file {labels_csv} for {prelim}")
    labels = pd.read_csv(labels_csv, dtype=str)
    if tuple(labels.columns) != LABELS_HEADER:
        raise DatasetLayoutError(
            f"{labels_csv}: header must be {','.join(LABELS_HEADER)}, "
            f"got {','.join(labels.columns)}"
        )
    by_file = {}
    for original, new_name, value in labels.itertuples(index=False):
        by_file[str(new_name)] = (str(original), str(value).strip())
    for path in _image_files(scan, prelim):
        entry = by_file.pop(path.name, None)
        if entry is None:
            scan.skip(path, f"not listed in {labels_csv.name}")
            continue
        original, value = entry
        if value not in {str(ALL), str(HEM)}:
            scan.skip(path, f"label {value!r} in {labels_csv.name} is not 0 or 1")
            continue
        try:
            cell = parse_cell_name(original)
        except CellNameError:
            scan.skip(path, f"unparseable original name in {labels_csv.name}")
            continue
        if cell.label != int(value):
            scan.skip(path, f"label in {labels_csv.name} contradicts the original name")
            continue
        scan.rows.append(
            _row(
                scan.rel(path),
                cell.label,
                cell.subject,
                cell.image_id,
                cell.cell_id,
                None,
                "prelim",
            )
        )
    for new_name in sorted(by_file):
        scan.skipped.append(
            Skip(
                scan.rel(prelim / new_name) if _is_plain_name(new_name) else new_name,
                f"listed in {labels_csv.name} but missing",
            )
        )


def _scan_unlabelled(scan: _Scan, folder: Path) -> None:
    for path in _image_files(scan, folder):
        scan.rows.append(_row(scan.rel(path), UNLABELLED, None, None, None, None, "final"))


def _is_plain_name(name: str) -> bool:
    return PurePosixPath(name).name == name and name not in {"", ".", ".."}


def _row(path, label, subject, image_id, cell_id, fold, split) -> dict:
    return {
        "path": path,
        "label": label,
        "subject": subject,
        "image_id": image_id,
        "cell_id": cell_id,
        "fold": fold,
        "source_split": split,
    }
