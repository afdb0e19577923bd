"""Imports between packages point down the layers of ARCHITECTURE.md, never up."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from import_closure import REPO, _named_modules, module_file

SRC = REPO / "src"
# Lowest first. A package may import its own layer's shared modules and any lower layer.
LAYERS = [
    {"errors", "redaction", "owned", "config", "files", "labels"},
    {"data", "tracking"},
    {"models"},
    {"tuning"},
    {"training"},
    {"inference"},
    {"evaluation"},
    {"train"},  # the Hydra main; the sweep stage launches it
    {"cli"},
]
LAYER = {package: level for level, packages in enumerate(LAYERS) for package in packages}


def project_imports() -> list[tuple[str, str, Path]]:
    """``(importing package, imported package, file)`` for every cross-package project import."""
    found = []
    for path in sorted((SRC / "leukemia_mlops").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        source = module.split(".")[1] if "." in module else ""
        for name in _named_modules(path, module):
            top, _, rest = name.partition(".")
            if top == "hydra_plugins":
                found.append((source, "hydra_plugins", path))
            elif top == "leukemia_mlops" and rest and module_file(name):
                target = rest.split(".")[0]
                if target != source:
                    found.append((source, target, path))
    return found


def test_every_package_has_a_layer():
    packages = {p.stem for p in (SRC / "leukemia_mlops").iterdir() if p.suffix == ".py"}
    packages |= {p.name for p in (SRC / "leukemia_mlops").iterdir() if (p / "__init__.py").exists()}
    assert packages - {"__init__"} <= set(LAYER)


@pytest.mark.parametrize(("source", "target", "path"), project_imports())
def test_imports_point_down(source, target, path):
    assert target != "hydra_plugins", f"{path}: the project never imports the Hydra plugin"
    assert LAYER[target] < LAYER[source] or (LAYER[target] == LAYER[source] == 0), (
        f"{path.relative_to(REPO)}: {source} (layer {LAYER[source]}) imports "
        f"{target} (layer {LAYER[target]})"
    )


#: What asks a model its family by name or by type instead of asking its class (ARCHITECTURE.md,
#: "Where a new family goes"): only ``models/`` may know the families apart.
FAMILY_TESTS = re.compile(r'family ==|isinstance\([^)]*(YoloDetector|CellClassifier)|"variant" in')


def test_only_models_tell_the_families_apart():
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sorted((SRC / "leukemia_mlops").rglob("*.py"))
        if "models" not in path.relative_to(SRC / "leukemia_mlops").parts[:1]
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if FAMILY_TESTS.search(line)
    ]
    assert not found, "ask the module class (models/base.py), not the family:\n" + "\n".join(found)
