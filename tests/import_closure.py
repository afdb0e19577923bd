"""The project files a command can load: a static walk of its imports, lazy ones included.

Every ``import``/``from ... import`` anywhere in a module (inside functions too) is followed,
and so is every string constant that names a project module (``python -m leukemia_mlops.train``
in a subprocess command, a ``_target_`` in code). Parent packages count, since importing
``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE_ROOTS = {"leukemia_mlops": REPO / "src", "hydra_plugins": REPO}


def module_file(module: str) -> Path | None:
    """The source file of a project module or package, or None (not ours, or not a module)."""
    root = PACKAGE_ROOTS.get(module.split(".")[0])
    if root is None:
        return None
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _named_modules(path: Path, module: str) -> Iterator[str]:
    """Module names a file imports or mentions (dotted names that may be modules)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and str(node.value).split(".")[0] in PACKAGE_ROOTS:
            yield node.value


def closure(modules: Iterable[str]) -> dict[str, Path]:
    """Every project module that loading ``modules`` can load, with its file."""
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        parts = todo.pop().split(".")
        for end in range(1, len(parts) + 1):
            name = ".".join(parts[:end])
            path = module_file(name)
            if path is not None and name not in seen:
                seen[name] = path
                todo.extend(_named_modules(path, name))
    return seen
