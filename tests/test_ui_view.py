"""``make ui``'s link opens the experiment's training runs, not MLflow 3's GenAI view.

A real MLflow server over a local store like ``make ui``'s, the link printed by the command
``make ui`` runs, and the page as headless Chromium renders it (a screenshot is kept in the
test's folder).
"""

from __future__ import annotations

import pytest
from browser import needs_chromium, rendered_dom, screenshot
from mlflow import MlflowClient
from servers import MlflowServer

from leukemia_mlops.cli import ui_url as ui_url_cli
from leukemia_mlops.tracking.store import DEFAULT_EXPERIMENT, local_store_uri

pytestmark = [pytest.mark.slow, needs_chromium]
RUN_NAMES = ("resnet18-ui-check", "yolov3-tiny-ui-check")
#: Side-navigation entries of the GenAI view only.
GENAI_ONLY = ("Judges", "Evaluation runs", "Prompts &amp; versions")


@pytest.fixture
def server(tmp_path):
    mlruns = tmp_path / "mlruns"
    server = MlflowServer(local_store_uri(mlruns), mlruns / "artifacts", tmp_path / "server.log")
    server.start()
    try:
        yield server, mlruns
    finally:
        server.stop()


def test_ui_link_lands_on_the_training_runs(server, tmp_path, capsys):
    server, mlruns = server
    ui_url_cli.main(["--mlruns-dir", str(mlruns), "--base-url", server.url])
    url = capsys.readouterr().out.strip()
    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT).experiment_id
    for name in RUN_NAMES:
        client.set_terminated(client.create_run(experiment, run_name=name).info.run_id)

    dom = rendered_dom(url)
    picture = screenshot(url, tmp_path / "mlflow_ui.png")
    assert all(name in dom for name in RUN_NAMES), f"runs table missing; see {picture}"
    assert "Run Name" in dom
    shown = [item for item in GENAI_ONLY if item in dom]
    assert not shown, f"GenAI view ({', '.join(shown)}); see {picture}"
