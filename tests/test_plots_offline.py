"""``dvc plots show`` draws every report figure with no network: the page inlines vega.

The project's top-level ``plots:`` section runs in a throwaway DVC repository on tiny tables
and images written at the paths it names, with the template ``make setup`` builds.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from browser import needs_chromium, rendered_dom

REPO = Path(__file__).resolve().parents[1]
TEMPLATE_DIR = REPO / "dvc_template"
DVC = str(Path(sys.executable).with_name("dvc"))
#: A ``<script>`` that loads its code from elsewhere (dvc-render's own page: a CDN).
REMOTE_SCRIPT = re.compile(r"<script[^>]*\bsrc\s*=", re.IGNORECASE)


def project_plots() -> list:
    """The top-level ``plots:`` section of the project's ``dvc.yaml``."""
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]


def _vega_plots(plots: list) -> dict[str, dict]:
    return {
        name: props for entry in plots if isinstance(entry, dict) for name, props in entry.items()
    }


def _image_plots(plots: list) -> list[str]:
    return [entry for entry in plots if isinstance(entry, str)]


def test_every_picture_of_the_evaluate_stage_is_a_plot():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["evaluate"]
    declared = [
        next(iter(e)) if isinstance(e, dict) else e
        for k in ("outs", "plots")
        for e in stage.get(k, [])
    ]
    pictures = {path for path in declared if path.endswith(".png")}
    assert pictures and pictures <= set(_image_plots(project_plots()))


def _write_tables_and_images(root: Path, plots: list) -> None:
    """Three rows for each table a plot reads (its x and y columns), a PNG per image plot."""
    columns: dict[str, set[str]] = {}
    for props in _vega_plots(plots).values():
        for path, ys in props["y"].items():
            columns.setdefault(path, {props["x"]}).update([ys] if isinstance(ys, str) else ys)
    for path, names in columns.items():
        table = pd.DataFrame({name: [0.0, 0.5, 1.0] for name in sorted(names)})
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(root / path, index=False)
    for path in _image_plots(plots):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / path), np.full((24, 32, 3), 128, np.uint8))


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    """``dvc plots show``'s page for the project's plots, with the offline template."""
    sys.path.insert(0, str(TEMPLATE_DIR))
    try:
        from build_template import build
    finally:
        sys.path.remove(str(TEMPLATE_DIR))
    root = tmp_path_factory.mktemp("dvc_repo")
    template = build(TEMPLATE_DIR / "node_modules", root / "offline.html")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=root, check=True)
    with (root / ".dvc" / "config").open("a") as config:
        config.write(f"[plots]\n    html_template = {template}\n")
    plots = project_plots()
    (root / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}, sort_keys=False))
    _write_tables_and_images(root, plots)
    subprocess.run([DVC, "plots", "show", "-q"], cwd=root, check=True, capture_output=True)
    return root / "dvc_plots" / "index.html"


def test_plots_page_loads_nothing_from_the_network(page):
    html = page.read_text()
    assert not REMOTE_SCRIPT.search(html)
    for library in ("vega", "vega-lite", "vega-embed"):
        assert f"<script>/* {library} */" in html
    assert html.count("vegaEmbed('#") == len(_vega_plots(project_plots()))
    images = re.findall(r'<img src="(static/[^"]+)"', html)
    assert len(images) == len(_image_plots(project_plots()))
    assert all((page.parent / image).is_file() for image in images)


@pytest.mark.slow
@needs_chromium
def test_every_plot_draws_offline_in_headless_chromium(page):
    """With every non-local request refused, each vega plot draws its marks."""
    dom = rendered_dom(page.as_uri(), offline=True)
    drawn = re.findall(r'<(?:canvas|svg)[^>]*class="marks"', dom)
    assert len(drawn) == len(_vega_plots(project_plots()))
