"""The real ``dvc`` CLI on the project's dvc.yaml, in a temporary git repository."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_SPEC

from leukemia_mlops.config import compose, write_params
from leukemia_mlops.data.synthetic import generate_cnmc

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
