"""The synthetic C-NMC generator: real layout, determinism, subject splits, image content."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
from omegaconf import DictConfig, OmegaConf

from leukemia_mlops.config import build_spec, compose
from leukemia_mlops.data import synthetic
from leukemia_mlops.data.layout import UNLABELLED, scan_dataset
from leukemia_mlops.data.naming import ALL, HEM
from leukemia_mlops.data.splits import SplitSpec, assign_splits
from leukemia_mlops.data.synthetic import (
    SubjectStyle,
    SyntheticSpec,
    draw_subject_style,
    generate_cnmc,
    plan_cnmc,
    render_cell,
)

SPEC = SyntheticSpec(
    n_train_subjects=6,
    n_prelim_subjects=2,
    cells_per_subject=4,
    all_fraction=0.5,
    n_final_images=3,
    image_size=450,
    seed=0,
)
PRELIM_CSV = "C-NMC_Leukemia/validation_data/C-NMC_test_prelim_phase_data_labels.csv"


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("raw")
    return root, generate_cnmc(root, SPEC)


def _hashes(root: Path, suffix: str = "") -> dict[str, str]:
    """SHA-256 of every file of the tree under ``root``, by relative path."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob(f"*{suffix}"))
        if path.is_file()
    }


def test_scan_reads_the_tree_as_generated(generated: tuple[Path, pd.DataFrame]) -> None:
    root, table = generated
    scanned, skipped = scan_dataset(root)
    assert skipped == []
    assert sorted(scanned["path"]) == sorted(table["path"])
    both = table.merge(scanned, on="path", suffixes=("", "_scan"))
    labelled = both[both["source_split"] != "final"]
    for column in ("label", "subject", "image_id", "cell_id", "fold", "source_split"):
        assert labelled[column].equals(labelled[f"{column}_scan"]), column
    final = both[both["source_split"] == "final"]
    assert len(final) == SPEC.n_final_images
    assert (final["label_scan"] == UNLABELLED).all()
    assert final["subject_scan"].isna().all()


def test_test_phases_are_numbered_and_prelim_labelled_by_csv(
    generated: tuple[Path, pd.DataFrame],
) -> None:
    root, table = generated
    header = (root / PRELIM_CSV).read_text().splitlines()[0]
    assert header == "Patient_ID,new_names,labels"
    labels = pd.read_csv(root / PRELIM_CSV)
    for split in ("prelim", "final"):
        names = {Path(p).name for p in table.loc[table["source_split"] == split, "path"]}
        assert names == {f"{n}.bmp" for n in range(1, len(names) + 1)}
    assert sorted(labels["new_names"]) == sorted(
        Path(p).name for p in table.loc[table["source_split"] == "prelim", "path"]
    )
    assert set(labels["labels"]) == {ALL, HEM}
    assert labels["Patient_ID"].str.fullmatch(r"UID_(\d+_\d+_\d+_all|H\d+_\d+_\d+_hem)\.bmp").all()


def test_subjects_are_split_cleanly(generated: tuple[Path, pd.DataFrame]) -> None:
    _, table = generated
    per_subject = table.groupby("subject")
    assert (per_subject["label"].nunique() == 1).all()
    assert (per_subject["source_split"].nunique() == 1).all()
    train = table[table["source_split"] == "train"]
    assert (train.groupby("subject")["fold"].nunique() == 1).all()
    assert train["subject"].nunique() == SPEC.n_train_subjects
    assert sorted(train["fold"].unique()) == [0, 1, 2]
    assert (train.groupby("fold")["label"].nunique() == 2).all()
    prelim = table[table["source_split"] == "prelim"]
    assert prelim["subject"].nunique() == SPEC.n_prelim_subjects
    assert not set(prelim["subject"]) & set(train["subject"])
    assert prelim["fold"].isna().all()
    healthy = table["subject"].str.startswith("H")
    assert (table.loc[healthy, "label"] == HEM).all()
    assert (table.loc[~healthy, "label"] == ALL).all()
    assert train.groupby("subject").size().between(2, 6).all()  # 0.5x to 1.5x of 4 cells


def test_images_are_one_cell_on_black(generated: tuple[Path, pd.DataFrame]) -> None:
    root, table = generated
    for rel in table["path"]:
        bgr = cv2.imread(str(root / rel), cv2.IMREAD_UNCHANGED)
        assert bgr.shape == (450, 450, 3) and bgr.dtype == np.uint8, rel
        assert not bgr[[0, 0, -1, -1], [0, -1, 0, -1]].any(), rel
        cell = (bgr.max(axis=2) > 10).astype(np.uint8)
        n_parts, _ = cv2.connectedComponents(cell, connectivity=8)
        assert n_parts == 2, rel  # background and one cell
        ys, xs = np.nonzero(cell)
        assert min(ys.min(), xs.min()) >= 10 and max(ys.max(), xs.max()) < 440, rel
        blue, green, red = bgr[cell.astype(bool)].mean(axis=0)
        assert blue > green and red > green, rel  # violet/lilac stain, stored as BGR


def test_same_spec_gives_the_same_bytes_for_any_worker_count(
    generated: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    root, table = generated
    again = generate_cnmc(tmp_path / "serial", SPEC)
    parallel = generate_cnmc(tmp_path / "parallel", SPEC, workers=2)
    pd.testing.assert_frame_equal(again, table)
    pd.testing.assert_frame_equal(parallel, table)
    expected = _hashes(root)
    assert _hashes(tmp_path / "serial") == expected
    assert _hashes(tmp_path / "parallel") == expected


# Regenerates SPEC with every dispatched SIMD kernel of numpy and OpenCV switched off (the
# environment variables must be set before either library loads) and prints the file hashes.
_BASELINE_RUN = """
import json, sys
from pathlib import Path
import cv2
from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
from test_synthetic import SPEC, _hashes
from leukemia_mlops.data.synthetic import generate_cnmc

cv2.setUseOptimized(False)
numpy_simd = [f for f in __cpu_dispatch__ if __cpu_features__[f]]
opencv_simd = [f for f in cv2.getCPUFeaturesLine().split() if f[0] == "*" and f[-1] != "?"]
generate_cnmc(sys.argv[1], SPEC)
print(json.dumps({"simd": numpy_simd + opencv_simd, "hashes": _hashes(Path(sys.argv[1]))}))
"""


def test_bytes_do_not_depend_on_the_simd_level(
    generated: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    """The best evidence one machine gives that an AVX-512 (or ARM) machine writes these bytes:
    the same files with numpy's and OpenCV's CPU-specific kernels all switched off."""
    opencv_simd = [f[1:] for f in cv2.getCPUFeaturesLine().split() if f[0] == "*" and f[-1] != "?"]
    env = {
        **os.environ,
        "NPY_DISABLE_CPU_FEATURES": " ".join(f for f in __cpu_dispatch__ if __cpu_features__[f]),
        "OPENCV_CPU_DISABLE": ",".join(opencv_simd),
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path]),
    }
    result = subprocess.run(
        [sys.executable, "-c", _BASELINE_RUN, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    baseline = json.loads(result.stdout.splitlines()[-1])
    assert baseline["simd"] == []  # the switches took effect
    assert baseline["hashes"] == _hashes(generated[0])


def _project_defaults() -> DictConfig:
    """conf/ as the project ships it, without this checkout's conf/local choices."""
    return compose(["~local"])


def test_spec_defaults_are_the_configured_ones() -> None:
    configured = OmegaConf.to_container(_project_defaults().data.synthetic)
    assert dataclasses.asdict(SyntheticSpec()) == configured


def test_default_splits_count_enough_subjects_of_each_class() -> None:
    """The subject bootstrap needs at least 6 test subjects per class for its intervals, and
    selection on validation needs more than a handful of subjects (cells share their label)."""
    cfg = _project_defaults()
    table = plan_cnmc(build_spec(SyntheticSpec, cfg.data.synthetic, "data.synthetic"))
    labelled = table[table["source_split"] != "final"].reset_index(drop=True)
    split = assign_splits(labelled, build_spec(SplitSpec, cfg.data.split, "data.split"))
    subjects = {
        name: labelled[split == name].groupby("label")["subject"].nunique().to_dict()
        for name in ("test", "val")
    }
    assert subjects == {"test": {ALL: 17, HEM: 11}, "val": {ALL: 6, HEM: 4}}


def test_another_seed_gives_other_images(
    generated: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    root, _ = generated
    generate_cnmc(tmp_path, dataclasses.replace(SPEC, seed=1))
    assert not set(_hashes(root, ".bmp").values()) & set(_hashes(tmp_path, ".bmp").values())


def test_blasts_are_larger_with_overlap() -> None:
    areas: dict[int, list[int]] = {ALL: [], HEM: []}
    for label in areas:
        for k in range(150):
            style = draw_subject_style(np.random.default_rng([7, k]))
            image = render_cell(np.random.default_rng([label, k]), label, style, 160)
            assert image.shape == (160, 160, 3) and image.dtype == np.uint8
            areas[label].append(int((image.max(axis=2) > 10).sum()))
    blast, normal = np.array(areas[ALL]), np.array(areas[HEM])
    assert 1.2 < blast.mean() / normal.mean() < 1.45
    assert (normal[:, None] > blast[None, :]).mean() > 0.1  # many HEM cells beat ALL ones


def test_render_cell_is_reproducible() -> None:
    first = render_cell(np.random.default_rng(3), ALL, SubjectStyle(), 96)
    again = render_cell(np.random.default_rng(3), ALL, SubjectStyle(), 96)
    assert np.array_equal(first, again)


def test_refuses_to_overwrite_existing_data(generated: tuple[Path, pd.DataFrame]) -> None:
    root, _ = generated
    before = _hashes(root)
    with pytest.raises(FileExistsError, match="C-NMC_Leukemia"):
        generate_cnmc(root, SPEC)
    assert _hashes(root) == before
    assert [p.name for p in root.iterdir()] == ["C-NMC_Leukemia"]


def test_failed_run_leaves_no_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = iter(range(10))

    def flaky(*args: object) -> np.ndarray:
        if next(calls) == 5:
            raise RuntimeError("killed")
        return np.zeros((64, 64, 3), np.uint8)

    monkeypatch.setattr(synthetic, "render_cell", flaky)
    with pytest.raises(RuntimeError, match="killed"):
        generate_cnmc(tmp_path, SyntheticSpec(image_size=64, cells_per_subject=1))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_train_subjects", 2),
        ("n_prelim_subjects", 1),
        ("cells_per_subject", 0),
        ("all_fraction", 0.0),
        ("all_fraction", 1.0),
        ("all_fraction", 0.01),  # no ALL subject among 48
        ("n_final_images", -1),
        ("image_size", 32),
        ("seed", -1),
    ],
)
def test_bad_spec_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field) as err:
        SyntheticSpec(**{field: value})
    assert "\n" not in str(err.value)


def test_bad_worker_count(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="workers"):
        generate_cnmc(tmp_path, SPEC, workers=-1)
