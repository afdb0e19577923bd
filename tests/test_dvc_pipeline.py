"""The real ``dvc`` CLI on the project's dvc.yaml, in a temporary git repository."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_SPEC

from leukemia_mlops.config import compose, write_params
from leukemia_mlops.data.synthetic import generate_cnmc
from leukemia_mlops.evaluation.headline import headline

REPO = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))


def run(*args: str, cwd: Path, timeout: int = 300) -> str:
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}:" + os.environ["PATH"],
    }
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    return result.stdout + result.stderr


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A git + DVC repo holding the project's dvc.yaml and code, with tiny synthetic data."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root)
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    write_params(
        compose(["data.prepare.image_size=16", "data.prepare.workers=1"]), root / "params.yaml"
    )
    generate_cnmc(root / "data/raw", TINY_SPEC)
    run("git", "init", "-q", cwd=root)
    run(DVC, "init", "-q", cwd=root)
    run(DVC, "config", "core.analytics", "false", cwd=root)
    run(DVC, "add", "-q", "data/raw", cwd=root)
    dvc_file = (root / "data/raw.dvc").read_text().replace("path: raw", "path: data/raw")
    (root / "data.dvc").write_text(dvc_file)
    (root / "data/raw.dvc").unlink()
    return root


def test_prepare_runs_once_then_only_after_a_param_change(project):
    first = run(DVC, "repro", "prepare", cwd=project)
    assert "Running stage 'prepare'" in first
    assert (project / "data/prepared/images.npy").is_file()
    report = yaml.safe_load((project / "reports/data.json").read_text())
    assert report["images"] > 0 and report["skipped"] == 0

    second = run(DVC, "repro", "prepare", cwd=project)
    assert "Running stage" not in second

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["prepare"]["image_size"] = 24
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    third = run(DVC, "repro", "prepare", cwd=project)
    assert "Running stage 'prepare'" in third
    # The data report counts images; it is not a metric of any model, so DVC does not list it.
    assert "reports/data.json" not in run(DVC, "metrics", "show", cwd=project)
    assert (
        yaml.safe_load((project / "reports/data.json").read_text())["prepare"]["image_size"] == 24
    )


def test_changed_raw_data_is_detected_and_committed_to_data_dvc(project):
    run(DVC, "repro", "prepare", cwd=project)
    old_hash = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    extra = next((project / "data/raw").rglob("*_hem.bmp"))
    shutil.copy(extra, extra.with_name(extra.name.replace("_hem", "9_hem")))
    assert "modified" in run(DVC, "status", cwd=project)
    run(DVC, "commit", "-f", "data.dvc", cwd=project)
    assert yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"] != old_hash
    assert "Running stage 'prepare'" in run(DVC, "repro", "prepare", cwd=project)


@pytest.mark.slow
def test_default_synthetic_data_is_what_data_dvc_records(tmp_path, monkeypatch):
    """``make data`` (params from conf/, then lmo-synth) writes the very tree data.dvc versions.

    The directory hash is computed by DVC's own code, as ``dvc add`` does; an empty DVC cache
    cannot hide a difference.
    """
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    from leukemia_mlops.cli import synth

    monkeypatch.chdir(tmp_path)
    write_params(compose(), "params.yaml")
    synth.main(["--params", "params.yaml"])
    fs = LocalFileSystem()
    odb = HashFileDB(fs, str(tmp_path / "odb"))
    _, meta, tree = build(odb, str(tmp_path / "data/raw"), fs, "md5", dry_run=True)
    recorded = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]
    generated = {"md5": tree.hash_info.value, "size": meta.size, "nfiles": meta.nfiles}
    assert generated == {key: recorded[key] for key in generated}


def evaluation_report(f1: float, low: float, high: float, auroc: float) -> dict:
    """The section of an evaluation report (``metrics.json``) a headline reads."""
    test = {"f1_weighted": f1, "f1_weighted_bca_low": low, "f1_weighted_bca_high": high}
    return {"test": test | {"auroc": auroc, "auroc_bca_low": auroc - 0.1}}


def test_the_model_metrics_fill_the_first_screen_of_dvc_exp_show(project):
    """In an 80-column terminal ``dvc exp show`` pages its table (``less -S``): the first screen
    shows each experiment, its date and `model`'s numbers; ``dvc metrics show`` prints the whole
    headline, the comparison's verdict included."""
    reports = {
        "model": evaluation_report(0.7039512705634096, 0.6118800508, 0.7961836671, 0.8276),
        "detector": evaluation_report(0.5191593, 0.4540212, 0.5830712, 0.3909871),
    }
    comparison = {
        "auroc": {"point": 0.4366, "bca_low": 0.301, "bca_high": 0.552},
        "verdict": "CNN better",
    }
    (project / "reports").mkdir()
    (project / "reports/metrics.json").write_text(json.dumps(headline(reports, comparison)))
    run("git", "add", "-A", cwd=project)
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "ok", cwd=project)
    reports["model"]["test"]["f1_weighted"] = 0.81234
    (project / "reports/metrics.json").write_text(json.dumps(headline(reports, comparison)))

    # Not a terminal, dvc prints the whole table its pager would scroll: its first 80 columns
    # are the first screen.
    screen = [line[:80] for line in run(DVC, "exp", "show", cwd=project).splitlines()]
    first = ["Experiment", "Created", "f1", "f1_bca_low", "f1_bca_high", "auroc"]
    assert screen[1].split()[:6] == first
    workspace, committed = screen[3:5]
    assert re.search(r"^  workspace .* 0\.812 +0\.612 +0\.796 +0\.828 ", workspace)
    assert re.search(r"0\.704 +0\.612 +0\.796 +0\.828 ", committed)
    header, row = run(DVC, "metrics", "show", cwd=project).splitlines()[:2]
    assert header.split() == [
        "Path", "auroc", "d_auroc", "d_auroc_bca_high", "d_auroc_bca_low", "det_auroc",
        "det_auroc_bca_low", "det_f1", "f1", "f1_bca_high", "f1_bca_low", "verdict",
    ]  # fmt: skip
    assert row.split() == [
        "reports/metrics.json", "0.828", "0.437", "0.552", "0.301", "0.391", "0.291", "0.519",
        "0.812", "0.796", "0.612", "CNN", "better",
    ]  # fmt: skip
