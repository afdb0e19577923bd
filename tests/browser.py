"""Headless Chromium for the tests that check what a page draws (Debian's ``chromium``)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

CHROMIUM = next(
    (found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no headless Chromium (.ci/run installs Debian's chromium package)"
)
#: Virtual time a page gets to run its scripts before the DOM is read (not wall-clock time).
SCRIPT_BUDGET_MS = 30_000
RUN_TIMEOUT_S = 180


def _chromium(url: str, output: list[str], offline: bool) -> str:
    """Run Chromium headless on ``url`` with ``output`` flags; its stdout."""
    with tempfile.TemporaryDirectory(prefix="lmo-chromium-") as profile:
        command = [
            CHROMIUM,
            "--headless",
            "--no-sandbox",  # tests run as root in CI
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={SCRIPT_BUDGET_MS}",
            "--window-size=1400,1000",
            *(["--proxy-server=127.0.0.1:9"] if offline else []),  # loopback bypasses it
            *output,
            url,
        ]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
        )
    if done.returncode != 0:
        raise RuntimeError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def rendered_dom(url: str, offline: bool = False) -> str:
    """The page's DOM once its scripts ran; ``offline``: every non-local request fails."""
    return _chromium(url, ["--dump-dom"], offline)


def screenshot(url: str, path: Path, offline: bool = False) -> Path:
    """A PNG of the rendered page at ``path``."""
    _chromium(url, [f"--screenshot={path}"], offline)
    return path
