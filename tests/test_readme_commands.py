"""Every command of the README's ``bash`` blocks parses as written.

Each block must be valid shell (``bash -n``). Each command of a project tool then runs with
``--help`` appended (``make`` with ``-n``), from the repository root with the venv's programs
on the path, as after ``source .venv/bin/activate``: the entry point and module must exist,
and the options and Hydra overrides before ``--help`` must parse (Hydra's help composes the
config with them). Nothing is executed beyond that.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.DOTALL | re.MULTILINE)
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
#: Programs whose command lines are checked (the rest of a block only parses as shell).
PYTHONS = {"python", ".venv/bin/python"}
TOOLS = {"dvc", "mlflow", "torchrun"}
RUN_TIMEOUT_S = 300
#: Values for the shell variables the README's commands leave to the reader.
EXAMPLE_VALUES = {"NODE_RANK": "0", "MASTER": "10.0.0.5", "WORKER_ID": "1"}


def readme_blocks() -> list[str]:
    return BLOCK.findall((REPO / "README.md").read_text())


def block_commands(block: str) -> list[list[str]]:
    """Each simple command of a block as words, its leading ``NAME=value`` words dropped."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        current: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", ";", "||"):
                while current and ASSIGNMENT.match(current[0]):
                    current.pop(0)
                if current:
                    commands.append([_with_examples(word) for word in current])
                current = []
            else:
                current.append(word)
    return commands


def _with_examples(word: str) -> str:
    return re.sub(r"\$(\w+)", lambda found: EXAMPLE_VALUES.get(found[1], found[0]), word)


def help_check(words: list[str]) -> list[str] | None:
    """The command line that checks ``words`` without running them, None if none applies."""
    program, args = words[0], words[1:]
    if program == "make":
        return ["make", "-n", *args]
    if program in PYTHONS and args[:1] == ["-m"]:
        return [sys.executable, *args, "--help"]
    if program == "torchrun":  # its own options: what follows ``-m`` goes to the module
        return [str(VENV_BIN / program), *args[: args.index("-m")], "--help"]
    if program in TOOLS:
        return [str(VENV_BIN / program), *args, "--help"]
    if program == "srun":  # the program it launches
        start = next(i for i, word in enumerate(words) if word in PYTHONS)
        return help_check(words[start:])
    return None


CHECKS = [
    pytest.param(check, id=" ".join(words)[:80])
    for block in readme_blocks()
    for words in block_commands(block)
    if (check := help_check(words)) is not None
]


@pytest.mark.parametrize("block", readme_blocks(), ids=lambda block: block.split("\n")[0][:60])
def test_readme_block_is_valid_shell(block):
    done = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_readme_commands_are_found():
    programs = {Path(check.values[0][0]).name for check in CHECKS}
    assert {"make", "dvc", "mlflow", Path(sys.executable).name} <= programs


@pytest.mark.parametrize("check", CHECKS)
def test_readme_command_parses(check):
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        check, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    assert done.returncode == 0, f"{shlex.join(check)}\n{done.stdout[-1500:]}{done.stderr[-1500:]}"
