"""The model card of a registered version, rendered from its run's own record.

Every number on the card comes from what the run logged: the evaluate stage's
``evaluation/metrics.json`` artifact (threshold, test metrics and intervals, calibration,
conformal coverage and abstention, patient-level results, the OOD check), its tags (family,
backbone, data identity, commit) and its dataset inputs (images and subjects per split and
class). The template (``model_card.md.j2``) types no number; a section the run did not measure
reads "not measured". The card becomes the version's description and an artifact of its run.
"""

from __future__ import annotations

import json
import tempfile
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leukemia_mlops.files import write_text

if TYPE_CHECKING:
    from mlflow import MlflowClient

TEMPLATE = "model_card.md.j2"
#: The evaluate stage's report among the run's artifacts (``log_evaluation`` puts it there).
METRICS_ARTIFACT = "evaluation/metrics.json"
#: The card among the run's artifacts.
CARD_ARTIFACT = "model_card.md"
NOT_MEASURED = "not measured"
#: Significant decimals of a rendered fraction.
DIGITS = 4


def number(value: Any) -> str:
    """A logged number as the card shows it (whole numbers whole, others to :data:`DIGITS`
    decimals); a missing one as :data:`NOT_MEASURED`."""
    from jinja2 import Undefined

    if value is None or isinstance(value, Undefined):
        return NOT_MEASURED
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return str(value) if isinstance(value, int) else f"{value:.{DIGITS}f}"


def text(value: Any) -> str:
    """A logged description, or :data:`NOT_MEASURED`."""
    from jinja2 import Undefined

    return NOT_MEASURED if value is None or isinstance(value, Undefined) else str(value)


def render_card(context: dict[str, Any]) -> str:
    """The card's Markdown for a record (see :func:`run_record`)."""
    from jinja2 import ChainableUndefined, Environment

    environment = Environment(
        undefined=ChainableUndefined, keep_trailing_newline=True, autoescape=False
    )
    environment.filters.update(num=number, text=text)
    source = files("leukemia_mlops.tracking").joinpath(TEMPLATE).read_text()
    return environment.from_string(source).render(**context)


def run_record(client: MlflowClient, run_id: str) -> dict[str, Any]:
    """What the card shows of a run: its tags, data identity, the splits of its dataset
    inputs (context, images and subjects per class) and its ``metrics.json`` (``m``; empty
    when the run logged none)."""
    run = client.get_run(run_id)
    splits = [
        {"context": tag.value, **json.loads(item.dataset.profile or "{}")}
        for item in run.inputs.dataset_inputs
        for tag in item.tags
        if tag.key == "mlflow.data.context"
    ]
    return {
        "run_id": run_id,
        "tags": run.data.tags,
        "data_identity": run.data.tags.get("data_identity", NOT_MEASURED),
        "splits": splits,
        "m": _logged_metrics(client, run_id),
    }


def _logged_metrics(client: MlflowClient, run_id: str) -> dict[str, Any]:
    """The run's ``evaluation/metrics.json``, or an empty record if it logged none."""
    names = {item.path for item in client.list_artifacts(run_id, Path(METRICS_ARTIFACT).parent)}
    if METRICS_ARTIFACT not in names:
        return {}
    with tempfile.TemporaryDirectory() as folder:
        path = client.download_artifacts(run_id, METRICS_ARTIFACT, folder)
        return json.loads(Path(path).read_text())


def attach_model_card(uri: str, name: str, version: str, out: str | Path) -> str:
    """Render the card of registered ``name`` ``version`` from its run, set it as the
    version's description, log it into the run (:data:`CARD_ARTIFACT`) and write it to
    ``out``; returns the card."""
    from mlflow import MlflowClient

    client = MlflowClient(uri, registry_uri=uri)
    model_version = client.get_model_version(name, version)
    record = run_record(client, model_version.run_id)
    card = render_card({"name": name, "version": version, **record})
    client.update_model_version(name, version, description=card)
    client.log_text(model_version.run_id, card, CARD_ARTIFACT)
    write_text(out, card)
    return card
