"""The data a run read, logged as MLflow dataset inputs (the UI's Dataset column).

Each split a run reads is one input: named ``<source>-<split>`` (``synthetic-train``), its
digest the prepare cache's data identity (:attr:`CacheIdentity.digest
<leukemia_mlops.data.identity.CacheIdentity.digest>`: the images, the prepare settings and
the split), its source ``data.dvc`` at the git commit (the cache's manifest without a
``data.dvc``), its context tag (``training``, ``validation``, ``test``) and a profile of
images and subjects per class. The split is in the name because MLflow keeps one input per
name and digest in a run, so training and validation of one cache need two names. MLflow
stores a dataset once per experiment, name and digest, with the profile first logged for
them: as the digest covers the split, two splits of one raw set are two datasets, each with
its own counts.

``mlflow.search_runs`` filters on ``dataset.name``, ``dataset.digest`` and ``dataset.context``.

Runs that log a new dataset at the same moment race to store it: the tracking store looks
for the dataset, then inserts it, and the slower insert fails on the unique key. The dataset
is then stored, so logging again links it; ``log_data_inputs`` does that.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pandas as pd

from leukemia_mlops.labels import CLASS_NAMES
from leukemia_mlops.tracking.provenance import git_commit

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput


class DataIdentity(Protocol):
    """What a dataset input takes from the prepare cache's identity (``data.identity``'s
    ``CacheIdentity``, a layer beside this one)."""

    @property
    def source(self) -> str | None: ...

    @property
    def digest(self) -> str: ...


#: What a training run reads, split -> MLflow context.
TRAINING_CONTEXTS = {"train": "training", "val": "validation"}
#: What an evaluation reads.
EVALUATION_CONTEXTS = {"test": "test"}
#: Tries of one ``log_inputs`` call; a retry follows only a lost insert race.
LOG_INPUTS_TRIES = 3


def split_profile(manifest: pd.DataFrame, split: str) -> dict[str, dict[str, int]]:
    """Images and distinct subjects per class of one split of a prepare manifest."""
    rows = manifest[manifest["split"] == split]
    by_class = {name: rows[rows["label"] == label] for label, name in enumerate(CLASS_NAMES)}
    return {
        "images": {name: len(cells) for name, cells in by_class.items()},
        "subjects": {name: int(cells["subject"].nunique()) for name, cells in by_class.items()},
    }


def log_data_inputs(
    uri: str,
    run_id: str,
    manifest_file: str | Path,
    identity: DataIdentity,
    contexts: Mapping[str, str],
    dvc_file: str | Path = "data.dvc",
) -> None:
    """Log one dataset input per split in ``contexts`` (split -> context) into a run.

    ``identity`` is the prepare cache's (the one of ``manifest_file``); without a
    ``dvc_file`` the manifest is the source. Logging twice (a resumed run) adds nothing.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    origin = dvc_file if Path(dvc_file).is_file() else manifest_file
    location = json.dumps({"uri": f"{origin}@{git_commit()}"})  # the UI shows it as "Path"
    manifest = pd.read_parquet(manifest_file, columns=["split", "label", "subject"])
    inputs = [
        DatasetInput(
            Dataset(
                name=f"{identity.source or 'unknown'}-{split}",
                digest=identity.digest,
                source_type="local",
                source=location,
                profile=json.dumps(split_profile(manifest, split)),
            ),
            [InputTag(MLFLOW_DATASET_CONTEXT, context)],
        )
        for split, context in contexts.items()
    ]
    log_inputs_once_stored(MlflowClient(uri), run_id, inputs)


def log_inputs_once_stored(client: MlflowClient, run_id: str, inputs: list[DatasetInput]) -> None:
    """``client.log_inputs``, again when another run stored the same dataset first.

    The store reports a lost race as a unique-key violation (sqlite "UNIQUE constraint
    failed", PostgreSQL "violates unique constraint"); any other error, or the race lost
    ``LOG_INPUTS_TRIES`` times, is raised.
    """
    from mlflow.exceptions import MlflowException

    for attempt in range(1, LOG_INPUTS_TRIES + 1):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as error:
            if "unique constraint" not in str(error).lower() or attempt == LOG_INPUTS_TRIES:
                raise
