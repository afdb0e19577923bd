"""Every ``lmo-*`` command answers ``--help``, and its help names only paths that exist.

A path in a help text is one of the project's files or folders, a DVC output (or a file in
one), or a folder a tool writes outside the pipeline (:data:`TOOL_OUTPUTS`). ``paths.<key>``
stands for that config value; placeholders stand for a pipeline model key (``<key>``) or any
one name (:data:`ANY_NAME`); any other placeholder is a path the layout does not have.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from functools import cache
from pathlib import Path

import pytest
import yaml

from leukemia_mlops.config import REPO_DIR, compose
from leukemia_mlops.tracking.run_files import PIPELINE_MODELS

SCRIPTS: dict[str, str] = tomllib.loads((REPO_DIR / "pyproject.toml").read_text())["project"][
    "scripts"
]
#: Folders that commands write outside DVC's outputs: export's ONNX files, compare-seeds' runs
#: and reports.
TOOL_OUTPUTS = ("exports", "models/seeds", "reports/seeds")
#: Placeholders for one name of the user's (a run folder, a registered model, a run id).
ANY_NAME = ("<run>", "<name>", "<alias>", "<id>")
#: Words with a slash that are not paths.
NOT_PATHS = ("and/or",)
_PATH = re.compile(r"[\w.<>*-]*/[\w.<>*/-]*")


def help_text(command: str) -> str:
    """What the installed ``<command> --help`` prints; it must exit 0 and start with a usage
    line."""
    done = subprocess.run(
        [str(Path(sys.executable).parent / command), "--help"],
        env={**os.environ, "COLUMNS": "1000"},  # unwrapped: no path split at a line end
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_DIR,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("usage: "), done.stdout[:500]
    return done.stdout


@cache
def layout() -> tuple[frozenset[str], frozenset[str]]:
    """The project's files and folders (tracked by git) and the outputs of DVC's stages and
    of the tools: paths, and the output folders whose files a help may name."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO_DIR, capture_output=True, text=True, check=True
    ).stdout.split()
    outputs = set(TOOL_OUTPUTS)
    for stage in yaml.safe_load((REPO_DIR / "dvc.yaml").read_text())["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            outputs |= {o if isinstance(o, str) else next(iter(o)) for o in stage.get(kind, [])}
    paths = {str(parent) for file in tracked for parent in Path(file).parents} | set(tracked)
    return frozenset((paths | outputs) - {"."}), frozenset(outputs)


def expansions(path: str) -> list[str]:
    """``path`` with its config values and placeholders filled in, as glob patterns."""
    config_paths = compose().paths
    path = re.sub(r"<?paths\.(\w+)>?", lambda m: str(config_paths[m[1]]), path)
    for name in ANY_NAME:
        path = path.replace(name, "*")
    key = re.compile("<key>", re.IGNORECASE)
    return [key.sub(k, path) for k in PIPELINE_MODELS] if key.search(path) else [path]


def in_layout(pattern: str) -> bool:
    """Whether a path pattern names a path of :func:`layout`, a folder holding one, or a path
    inside an output folder."""
    pattern = pattern.rstrip("/")
    if "<" in pattern:
        return False
    paths, outputs = layout()
    parents = [str(p) for p in Path(pattern).parents if str(p) != "."]
    return any(fnmatch(known, pattern) or fnmatch(known, pattern + "/*") for known in paths) or any(
        fnmatch(folder, parent) for folder in outputs for parent in parents
    )


def named_paths(text: str) -> list[str]:
    """The paths a help text names (not URIs such as ``runs:/``, nor words like and/or)."""
    words = re.findall(r"\S+", text)
    found = []
    for word in words:
        if ":/" in word:
            continue
        found += [p for p in _PATH.findall(word) if p not in NOT_PATHS and p.strip("/")]
    return found


@pytest.mark.parametrize("command", sorted(SCRIPTS))
def test_every_command_has_help_naming_only_paths_of_the_layout(command):
    text = help_text(command)
    missing = [path for path in named_paths(text) if not all(map(in_layout, expansions(path)))]
    assert not missing, f"{command} --help names paths the project does not have: {missing}"


def test_a_stale_path_in_a_help_is_found():
    """The check itself: paths from before the pipeline named its models by key."""
    assert not all(map(in_layout, expansions("paths.models_dir/cnn")))
    assert not all(map(in_layout, expansions("paths.reports_dir/eval/<family>/metrics.json")))
    assert all(map(in_layout, expansions("<paths.reports_dir>/eval/<key>/metrics.json")))
    assert all(map(in_layout, expansions("exports/<run>.onnx")))
