"""dvc.yaml names every file a stage can load: a code change reruns the stages it affects."""

from __future__ import annotations

import compileall
import json
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from import_closure import REPO, closure
from test_dvc_pipeline import DVC, run

STAGES: dict[str, dict] = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def _targets(node: object) -> list[str]:
    """Every ``_target_`` in a config section (objects the stage builds by Hydra instantiate)."""
    if isinstance(node, dict):
        own = [node["_target_"]] if isinstance(node.get("_target_"), str) else []
        return own + [t for value in node.values() for t in _targets(value)]
    if isinstance(node, list):
        return [t for value in node for t in _targets(value)]
    return []


# Modules a stage loads that no import names: Hydra discovers the sweeper plugin by itself.
DISCOVERED = {
    stage: ["hydra_plugins.leukemia_optuna_sweeper.optuna_sweeper"]
    for stage in ("sweep", "sweep_detector")
}


def stage_files(name: str) -> set[Path]:
    """The project files stage ``name`` can load: its command's imports and its params' targets."""
    words = shlex.split(STAGES[name]["cmd"])
    entry = [words[i + 1] for i, word in enumerate(words) if word == "-m"]
    entry += DISCOVERED.get(name, [])
    declared = [key for key in STAGES[name].get("params", []) if isinstance(key, str)]
    targets = [t for key in declared for t in _targets(PARAMS.get(key.split(".")[0]))]
    return set(closure(entry + targets).values())


def covered(path: Path, deps: list[str]) -> bool:
    return any(path == REPO / dep or REPO / dep in path.parents for dep in deps)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_file_a_stage_can_load_is_one_of_its_deps(name):
    files = stage_files(name)
    assert any(f.name == "config.py" for f in files)  # the walk found the shared modules
    missing = sorted(
        str(f.relative_to(REPO)) for f in files if not covered(f, STAGES[name]["deps"])
    )
    assert not missing, f"stage {name} loads files dvc.yaml does not list: {missing}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_declared_dep_exists(name):
    code_deps = [d for d in STAGES[name]["deps"] if d.startswith(("src/", "conf/", "hydra_"))]
    assert all((REPO / dep).exists() for dep in code_deps)


def _placeholder_outputs(root: Path) -> None:
    """An empty file (or folder) at every output path, so that ``dvc commit`` can lock them."""
    for stage in STAGES.values():
        for section in ("outs", "metrics", "plots"):
            for entry in stage.get(section, []):
                path = root / (entry if isinstance(entry, str) else next(iter(entry)))
                if path.suffix:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("")
                else:
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "placeholder").write_text("")


@pytest.fixture(scope="module")
def locked_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repo's pipeline in a temporary DVC repo, every stage locked as up to date."""
    root = tmp_path_factory.mktemp("locked")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root)
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("src", "conf", "hydra_plugins"):
        shutil.copytree(REPO / folder, root / folder, ignore=ignore)
    (root / "data/raw").mkdir(parents=True)
    (root / "data/raw/cell.bmp").write_text("")
    run("git", "init", "-q", cwd=root)
    run(DVC, "init", "-q", cwd=root)
    shutil.copy(REPO / ".dvcignore", root)
    _placeholder_outputs(root)
    run(DVC, "commit", "-f", "-q", cwd=root)
    return root


@pytest.mark.parametrize(
    "module",
    [
        "data/sampling.py",
        "config.py",
        "cli/args.py",
        "models/yolo/loss.py",
        "evaluation/bootstrap.py",
        "data/naming.py",
    ],
)
def test_a_changed_module_makes_dvc_rerun_every_stage_that_loads_it(locked_project, module):
    path = locked_project / "src/leukemia_mlops" / module
    source = REPO / path.relative_to(locked_project)
    loaders = {name for name in STAGES if source in stage_files(name)}
    listing = {name for name in STAGES if covered(source, STAGES[name]["deps"])}
    assert loaders, f"no stage loads {module}"
    assert json.loads(run(DVC, "status", "--json", cwd=locked_project)) == {}
    original = path.read_text()
    path.write_text(original + "# a comment\n")
    try:
        changed = set(json.loads(run(DVC, "status", "--json", cwd=locked_project)))
    finally:
        path.write_text(original)
    # Whole packages are deps, so a stage may rerun for a module it does not load; never less.
    assert changed == listing and loaders <= changed


def test_bytecode_next_to_the_sources_is_no_dependency(locked_project):
    """Python writes ``__pycache__`` wherever it imports the sources from (unless told not to):
    that must not make a fresh clone's ``dvc repro`` change dvc.lock."""
    src = locked_project / "src"
    assert compileall.compile_dir(src, quiet=1)
    try:
        assert any(src.rglob("*.pyc"))
        assert json.loads(run(DVC, "status", "--json", cwd=locked_project)) == {}
    finally:
        for cache in list(src.rglob("__pycache__")):
            shutil.rmtree(cache)
