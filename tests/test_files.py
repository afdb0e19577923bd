"""Every file the project writes is written whole: a reader sees the old content or the new."""

from __future__ import annotations

import json

import pytest

from leukemia_mlops.files import write_json, write_text
from leukemia_mlops.tuning.reports import SweepReports


def test_a_file_is_replaced_whole_under_an_open_reader(tmp_path):
    # A worker reading (or copying into the store) a file another worker rewrites reads one
    # whole version: the file is replaced, never truncated under it.
    path = tmp_path / "optuna_results.yaml"
    write_text(path, "trials: 1\n" * 100)
    with path.open() as reader:
        write_text(path, "trials: 2\n")
        assert reader.read() == "trials: 1\n" * 100
    assert path.read_text() == "trials: 2\n"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_a_write_that_fails_midway_leaves_the_old_file(tmp_path):
    # The text cannot be encoded past its first megabyte: a plain write would leave that
    # megabyte in place of the old report.
    path = tmp_path / "reports" / "metrics.json"
    write_json(path, {"auroc": 0.9})
    with pytest.raises(UnicodeEncodeError):
        write_text(path, "x" * 2**20 + "\ud800")
    assert json.loads(path.read_text()) == {"auroc": 0.9}
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_json_keeps_the_payload_order_when_asked(tmp_path):
    path = tmp_path / "new" / "folder" / "run.json"
    write_json(path, {"b": 1, "a": float("nan")}, sort_keys=False)
    assert path.read_text() == '{\n  "b": 1,\n  "a": NaN\n}\n'
    write_json(path, {"b": 1, "a": 2})
    assert list(json.loads(path.read_text())) == ["a", "b"]


def test_the_sweep_reports_are_replaced_not_rewritten(tmp_path):
    # A new inode: the reports went through a temporary file, as every writer's do.
    reports = SweepReports(tmp_path, "detector")
    reports.write_untuned()
    before = {path: path.stat().st_ino for path in (reports.best_params, reports.summary)}
    # Both held open, so that no new file can reuse their inodes.
    with reports.summary.open(), reports.best_params.open():
        reports.write_untuned()
    assert all(path.stat().st_ino != inode for path, inode in before.items())
    assert json.loads(reports.summary.read_text()) == {"tuned": False}
