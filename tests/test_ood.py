"""The in-distribution rule: quiet on the training images, loud on smears and odd frames."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import TINY_SIZE

from leukemia_mlops.data.datamodule import CellDataset
from leukemia_mlops.data.images import cell_box, decode_bgr
from leukemia_mlops.data.prepare import PrepareSpec, decode_file
from leukemia_mlops.data.synthetic import SyntheticSpec, generate_cnmc
from leukemia_mlops.evaluation.ood_alarms import false_alarm_report
from leukemia_mlops.inference.ood import Verdict, assess
from leukemia_mlops.inference.predict import predict_paths

SPEC = PrepareSpec(image_size=TINY_SIZE, workers=1)
PINK, RED_CELL, WHITE_CELL = (205, 190, 240), (150, 110, 200), (170, 60, 120)  # BGR


def verdict(path: Path) -> Verdict:
    """The rule's answer for an image file, decoded as ``predict`` decodes it."""
    decoded = decode_file(path, SPEC)
    assert decoded.pixels is not None, decoded.reason
    return assess(decoded.height, decoded.width, decoded.box, decoded.pixels, SPEC.window)


def false_alarms(raw: Path) -> tuple[int, int]:
    """(flagged, total) over every image of a synthetic C-NMC tree."""
    files = sorted(raw.rglob("*.bmp"))
    return sum(not verdict(path).in_distribution for path in files), len(files)


def smear(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A blood-smear look-alike: many red cells and one stained white cell on light pink."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), PINK, np.uint8)
    for _ in range(width * height // 4000):
        centre = (int(rng.integers(width)), int(rng.integers(height)))
        cv2.circle(image, centre, int(rng.integers(12, 20)), RED_CELL, -1)
    cv2.circle(image, (width // 2, height // 2), min(width, height) // 10, WHITE_CELL, -1)
    cv2.imwrite(str(path), image)
    return path


def training_cell(tiny_raw: Path) -> np.ndarray:
    """The first synthetic training image, decoded (450x450, one cell on black)."""
    return decode_bgr(sorted(tiny_raw.rglob("*.bmp"))[0].read_bytes())


def test_no_false_alarm_on_the_tiny_training_set(tiny_raw):
    flagged, total = false_alarms(tiny_raw)
    assert total > 50 and flagged == 0


@pytest.mark.slow
def test_no_false_alarm_on_the_default_training_set(tmp_path):
    default = tmp_path / "raw"
    generate_cnmc(default, SyntheticSpec(), workers=2)  # params.yaml's (test_synthetic.py)
    flagged, total = false_alarms(default)
    assert total > 1000 and flagged == 0


@pytest.mark.parametrize(
    ("width", "height", "reasons"),
    [
        (1226, 652, ("size 1226x652", "background not dark")),
        (450, 450, ("background not dark",)),  # right frame: only the background gives it away
    ],
)
def test_a_smear_is_flagged_with_its_reasons(tmp_path, width, height, reasons):
    answer = verdict(smear(tmp_path / "smear.jpg", width, height))
    assert not answer.in_distribution
    for reason in reasons:
        assert reason in answer.reason


def test_several_cells_on_black_are_flagged(tiny_raw, tmp_path):
    cell = training_cell(tiny_raw)
    x0, y0, x1, y1 = cell_box(cell)
    small = cv2.resize(cell[y0:y1, x0:x1], None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    scene = np.zeros_like(cell)
    for offset in (20, 230):  # two cells, side by side on one black 450x450 frame
        scene[offset : offset + small.shape[0], offset : offset + small.shape[1]] = small
    cv2.imwrite(str(tmp_path / "two.png"), scene)
    assert verdict(tmp_path / "two.png") == Verdict(False, "2 separate cells")


@pytest.mark.parametrize(("scale", "reason"), [(0.2, "fills 1% of"), (2.5, "fills 100% of")])
def test_a_cell_far_too_small_or_large_for_its_frame_is_flagged(tiny_raw, tmp_path, scale, reason):
    cell = training_cell(tiny_raw)
    scaled = cv2.resize(cell, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    frame = np.zeros_like(cell)
    side = min(scaled.shape[0], frame.shape[0])
    start = (scaled.shape[0] - side) // 2
    frame[:side, :side] = scaled[start : start + side, start : start + side]
    cv2.imwrite(str(tmp_path / "cell.png"), frame)
    answer = verdict(tmp_path / "cell.png")
    assert not answer.in_distribution and reason in answer.reason


def test_predict_labels_a_flagged_input_only_beside_its_flag(tiny_checkpoint, tiny_raw, tmp_path):
    normal = tmp_path / "inputs" / "cell.png"
    normal.parent.mkdir()
    cv2.imwrite(str(normal), training_cell(tiny_raw))
    flagged = smear(normal.parent / "smear.jpg", 1226, 652)
    table = predict_paths(
        tiny_checkpoint, [normal.parent], tmp_path / "p.csv", image_size=TINY_SIZE, threshold=0.5
    ).set_index("file")
    assert table.loc[str(normal), "in_distribution"]
    assert table.loc[str(normal), "ood_reason"] == ""
    assert not table.loc[str(flagged), "in_distribution"]
    assert "background not dark" in table.loc[str(flagged), "ood_reason"]
    assert set(table["label"]) <= {"ALL", "HEM"} and table["error"].eq("").all()


def test_false_alarms_count_the_test_cells_the_rule_flags(tiny_prepared):
    """The evaluate stage's ``ood`` section: no test cell flagged, until one's recorded frame is
    a 1226x652 photograph's."""
    test = CellDataset(tiny_prepared, "test")
    assert false_alarm_report(test, SPEC.window)["flagged"] == 0
    test.manifest = test.manifest.assign(width=[1226] + [450] * (len(test) - 1))
    report = false_alarm_report(test, SPEC.window)
    assert (report["flagged"], report["test_cells"]) == (1, len(test))
    assert report["false_alarm_rate"] == 1 / len(test)
