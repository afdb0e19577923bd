"""Smoke test of the benchmark runner: its cheapest benchmark at quick sizes, end to end."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_preprocessing_writes_its_table_and_result(tmp_path):
    command = [sys.executable, "-m", "bench.run", "--quick", "--only", "preprocessing"]
    subprocess.run([*command, "--out", str(tmp_path)], cwd=REPO, check=True, timeout=120)

    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Machine" in text
    assert "## Preprocessing: prepare stage vs naive PIL loop" in text
    assert "| naive PIL loop | 1 |" in text
    assert "prepare vs naive:" in text
    record = json.loads((tmp_path / "bench/results/preprocessing.json").read_text())
    assert record["quick"] is True
    assert [row[0] for row in record["rows"]] == ["naive PIL loop", "prepare_dataset"]
    assert all(row[4] > 0 for row in record["rows"])  # img/s
