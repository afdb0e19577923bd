"""Smoke tests of the benchmark runner and of the GPU check, at quick sizes, end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from leukemia_mlops.training.mixed_precision import cpu_has_bf16, resolve_precision

REPO = Path(__file__).resolve().parents[1]


def test_quick_preprocessing_writes_its_table_and_result(tmp_path):
    command = [sys.executable, "-m", "bench.run", "--quick", "--only", "preprocessing"]
    subprocess.run([*command, "--out", str(tmp_path)], cwd=REPO, check=True, timeout=300)

    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Machine" in text
    assert "## Preprocessing: prepare stage vs naive PIL loops" in text
    assert "Every section comes from one run" in text
    record = json.loads((tmp_path / "bench/results/preprocessing.json").read_text())
    assert record["quick"] is True
    workers = record["raw"]["workers"]
    # Each baseline names its processes: the naive loop in one, its Pool in as many as prepare.
    assert [row[:2] for row in record["rows"]] == [
        ["naive PIL loop", 1],
        ["naive PIL loop, multiprocessing.Pool", workers],
        ["prepare_dataset", workers],
    ]
    assert f"prepare vs naive Pool, both {workers} processes" in text
    rates = record["raw"]["img_per_s"]
    assert all(
        len(r["values"]) == 5 and r["min"] <= r["median"] <= r["max"] for r in rates.values()
    )
    assert all(r["min"] > 0 for r in rates.values())
    # The two downscales differ from cv2.INTER_AREA by a measured, small amount.
    differences = record["raw"]["downscale_vs_inter_area"]
    assert 0 < differences["naive"]["mean"] < 5 and 0 <= differences["prepare"]["mean"] < 5


@pytest.mark.slow  # seven short trainings at 64 px, two of them compiled
def test_quick_precision_sets_the_project_against_compute_only_eager_and_compiled(tmp_path):
    command = [sys.executable, "-m", "bench.run", "--quick", "--only", "precision"]
    subprocess.run([*command, "--out", str(tmp_path)], cwd=REPO, check=True, timeout=600)

    record = json.loads((tmp_path / "bench/results/precision.json").read_text())
    first_batch_s = {row[0]: row[-1] for row in record["rows"]}
    compared = [
        "Lightning (project), alternated",
        "compute-only (batches in memory), alternated",
        "plain, alternated",
        "Lightning (project), model.compile (eager)",
        "compute-only, torch.compile (eager)",
    ]
    assert set(compared) <= set(first_batch_s)
    assert all(first_batch_s[loop] > 0 for loop in compared)
    auto = resolve_precision("auto", "cpu")
    raw = record["raw"]
    assert raw[f"compute-only, torch.compile (eager) {auto} channels-last"]["per_s"] > 0
    # Two quick rounds each, the three loops taking turns.
    loops = ("plain, alternated", "compute-only (batches in memory), alternated")
    assert [len(raw[f"{loop} {auto} channels-last"]) for loop in loops] == [2, 2]
    readings = " ".join(record["readings"])
    assert "vs compute-only (same model, precision and layout" in readings
    assert "`torch.compile` (eager) vs eager, steady state: project" in readings


@pytest.mark.slow  # two DDP processes and an MLflow store: about 80 s of CPU
def test_quick_gpu_check_runs_every_check_and_gets_the_known_answers(tmp_path):
    checks = tmp_path / "checks.json"
    command = [sys.executable, "-m", "bench.gpu_check", "--quick", "--json", str(checks)]
    done = subprocess.run([*command, "--out", str(tmp_path)], cwd=REPO, timeout=900)

    outcomes = {o["name"]: o for o in json.loads(checks.read_text())}
    assert list(outcomes) == [
        "2-epoch fit with warm-up",
        "DDP replica equality",
        "DVC train stage under DDP",
        "YOLO-tiny step syncs",
        "predictions .ckpt / .onnx / runs:/",
        "matmul peaks",
        "resnet18 training",
        "efficientnet_b0 training",
        "loader, device augmentation",
        "YOLOv3 speed",
    ]
    for name, outcome in outcomes.items():  # everything is installed here: nothing skipped
        assert outcome["result"] and not outcome["result"].startswith(("error", "skip")), name
    fit = outcomes["2-epoch fit with warm-up"]
    assert fit["passed"] is True
    assert fit["raw"]["backbone_moved"][0] == 0 < fit["raw"]["backbone_moved"][1]
    assert outcomes["DDP replica equality"]["passed"] is True
    assert outcomes["DDP replica equality"]["raw"]["unequal"] == []
    stage = outcomes["DVC train stage under DDP"]
    assert stage["passed"] is True and stage["raw"]["status"] == "finished"
    parity = outcomes["predictions .ckpt / .onnx / runs:/"]
    assert parity["passed"] is True and set(parity["raw"]["max_abs_diff"]) == {".onnx", "runs:/"}
    assert max(parity["raw"]["max_abs_diff"].values()) <= 1e-4
    peaks = outcomes["matmul peaks"]["raw"]
    assert set(peaks) == ({"fp32", "bf16"} if cpu_has_bf16() else {"fp32"})
    for model in ("resnet18 training", "efficientnet_b0 training"):
        raw = outcomes[model]["raw"]
        assert raw["peak"] == {"32-true": "fp32", "bf16-mixed": "bf16"}[raw["precision"]]
        assert len(raw["img_per_s"]) == 5 and min(raw["img_per_s"].values()) > 0
        assert all(share > 0 for share in raw["of_peak"].values())  # of its own peak
    feed = outcomes["loader, device augmentation"]["raw"]
    assert feed["loader"] > 0 and feed["augment"] > 0 and feed["training"] > 0
    assert min(outcomes["YOLOv3 speed"]["raw"]["yolov3_tiny"]) > 0
    assert done.returncode == 0  # no check failed
    assert not (tmp_path / "BENCHMARKS.md").exists()  # the GPU section is written on CUDA only


def test_the_roofline_divides_each_rate_by_the_peak_of_its_own_precision(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # bench/ is a folder of the repository, not installed
    from bench.ceiling import roofline_row

    peaks = {"fp32": 100.0, "bf16": 800.0}
    # 2 GFLOP per image at 100 img/s = 200 GFLOP/s: a quarter of the bf16 peak, not twice fp32's.
    assert roofline_row("r", "bf16-mixed", 2.0, 100.0, peaks)[-2:] == ["bf16", "25.0%"]
    assert roofline_row("r", "32-true", 2.0, 25.0, peaks)[-2:] == ["fp32", "50.0%"]
    emulated = roofline_row("r", "bf16-mixed", 2.0, 100.0, {"fp32": 100.0})
    assert emulated[-1] == "no native bf16 peak"


def test_the_convolution_peak_counts_the_flops_torch_counts(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench import ceiling

    monkeypatch.setattr(ceiling, "CONV_SHAPE", (2, 8, 6))  # tiny: the count, not the speed
    batch, channels, side = ceiling.CONV_SHAPE
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    with FlopCounterMode(display=False) as counter:
        conv(torch.randn(batch, channels, side, side))
    # One call per second: the GFLOP/s it reports is then the GFLOP of one convolution.
    monkeypatch.setattr(ceiling, "rate_of", lambda call, clock: (call(), _OnePerSecond())[1])
    assert ceiling.conv_gflops("fp32", 0, 0.1) == counter.get_total_flops() / 1e9


class _OnePerSecond:
    per_s = 1.0


@pytest.mark.parametrize(
    ("project", "compute_only", "reason"),
    [
        (3.2, 3.4, None),
        (1.88, 1.94, "the compute-only loop, the bound of any training loop here, reaches 1.94x"),
        (1.88, 3.4, "compute-only reaches 3.4x, so the gap is the project's"),
    ],
)
def test_a_missed_bf16_speedup_says_whether_the_cpu_or_the_project_misses_it(
    project, compute_only, reason
):
    from bench.precision import speedup_reading

    reading = speedup_reading(project, compute_only)
    assert reading.startswith(f"project vs plain fp32: {project}x (target >= 3x)")
    assert ("**met**" in reading) == (reason is None)
    assert reason is None or reason in reading


def test_an_overhead_pairs_the_rounds_run_back_to_back():
    """A machine that slows down between rounds slows both loops of a round: each round's own
    ratio is the overhead (5 % here), whatever the medians of the two columns say (6.7 %)."""
    from bench.loops import paired_overhead
    from bench.timing import Rate

    def rates(*per_s: float) -> list:
        return [Rate(items=round(10 * value), seconds=10.0, batches=1) for value in per_s]

    project, compute_only = rates(100, 50, 60), rates(105, 52, 64)
    assert paired_overhead(project, compute_only) == pytest.approx(5.0)
    assert paired_overhead(compute_only, compute_only) == 0.0
    with pytest.raises(ValueError):  # rounds that do not pair up are an error, not a figure
        paired_overhead(project, compute_only[:2])
