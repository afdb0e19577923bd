"""2-process CPU DDP (gloo) of the real classifier: replicas stay equal, and equal one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from ddp_run import trainer

from leukemia_mlops.data.datamodule import CellDataModule
from leukemia_mlops.data.prepare import MANIFEST_FILE
from leukemia_mlops.models.classifier import CellClassifier

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("ddp_run.py")


def ddp_run(mode: str, out: Path, *args: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(SCRIPT), mode, "--out", str(out), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def changed(before: dict[str, str], after: dict[str, str], prefix: str) -> set[str]:
    return {k for k in before if k.startswith(prefix) and before[k] != after[k]}


def test_replicas_stay_bit_identical_through_warmup_and_thaw(tiny_prepared, tmp_path):
    ddp_run("fit", tmp_path, f"--prepared={tiny_prepared}", "--devices=2", "--epochs=2")
    records = json.loads((tmp_path / "digests.json").read_text())
    assert [r["when"] for r in records] == ["start", "epoch 0", "epoch 1"]
    for record in records:
        first, second = (rank["params"] for rank in record["ranks"])
        assert first == second, (record["when"], changed(first, second, ""))
    # (Buffers are not compared: DDP sends rank 0's to the others before each forward pass.)
    start, warmup, thawed = (r["ranks"][0] for r in records)
    # The warm-up trains the head only and keeps the backbone's batch-norm statistics.
    for kind in ("params", "buffers"):
        assert not changed(start[kind], warmup[kind], "backbone."), kind
    assert changed(start["params"], warmup["params"], "head.")
    # After the thaw every backbone parameter and statistic moves.
    for kind in ("params", "buffers"):
        before, after = warmup[kind], thawed[kind]
        every = {k for k in before if k.startswith("backbone.") and "num_batches" not in k}
        assert every <= changed(before, after, "backbone."), kind


def test_two_processes_reach_the_weights_of_one_with_twice_the_batch(tiny_prepared, tmp_path):
    # Batch norm from running statistics: per-device batch statistics differ by design.
    common = [f"--prepared={tiny_prepared}", "--epochs=1", "--warmup=0", "--eval-bn"]
    ddp_run("fit", tmp_path / "ddp", *common, "--devices=2", "--batch-size=8")
    ddp_run("fit", tmp_path / "single", *common, "--devices=1", "--batch-size=16")
    ddp = torch.load(tmp_path / "ddp/weights.pt", weights_only=True)
    single = torch.load(tmp_path / "single/weights.pt", weights_only=True)
    records = json.loads((tmp_path / "single/digests.json").read_text())
    start, after = (r["ranks"][0]["params"] for r in records)
    assert changed(start, after, "backbone.conv1")  # the whole network trained
    assert ddp.keys() == single.keys()
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_ddp_validation_scores_every_cell_once(tiny_prepared, tiny_checkpoint, tmp_path):
    # An odd validation split: a padded sampler would score one cell twice.
    manifest = pd.read_parquet(tiny_prepared / MANIFEST_FILE)
    assert (manifest["split"] == "val").sum() % 2 == 1
    args = [f"--prepared={tiny_prepared}", f"--checkpoint={tiny_checkpoint}", "--batch-size=4"]
    ddp_run("validate", tmp_path, *args, "--devices=2")
    ddp = json.loads((tmp_path / "metrics.json").read_text())

    module = CellClassifier.load_from_checkpoint(tiny_checkpoint, weights_only=True)
    datamodule = CellDataModule(str(tiny_prepared), 4, num_workers=0)
    [single] = trainer(1, 1, []).validate(module, datamodule=datamodule, verbose=False)
    assert ddp.keys() == single.keys() and "val/auroc" in ddp
    assert ddp == pytest.approx(single, rel=1e-6)
