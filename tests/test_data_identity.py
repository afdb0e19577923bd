"""Like with like: two splits of one raw set are two data identities, in MLflow and in
``compare``, against real prepare caches and a real sqlite store."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_SIZE
from mlflow import MlflowClient

from leukemia_mlops.config import compose
from leukemia_mlops.data.identity import IDENTITY_FILE, cache_identity, read_identity
from leukemia_mlops.data.prepare import MANIFEST_FILE, PrepareSpec, prepare_dataset
from leukemia_mlops.data.splits import SplitSpec
from leukemia_mlops.errors import ConfigError, InputError
from leukemia_mlops.evaluation.compare import champion, compare_runs
from leukemia_mlops.evaluation.evaluate import log_evaluation
from leukemia_mlops.tracking.datasets import TRAINING_CONTEXTS, log_data_inputs, split_profile
from leukemia_mlops.tracking.registry import champion_alias
from leukemia_mlops.tracking.run_files import store_uri
from leukemia_mlops.tracking.store import ensure_experiment, local_store_uri
from leukemia_mlops.training.run import run_training

EXPERIMENT = "identity"
#: The split of ``fold_prepared`` (``tiny_prepared`` has the default: val by subjects), as a
#: spec and as overrides.
FOLD_SPEC = SplitSpec(val="fold", val_fold=1)
FOLD_SPLIT = ("data.split.val=fold", "data.split.val_fold=1")
FAMILY = {"family": "cnn", "backbone": "resnet18"}


@pytest.fixture(scope="module")
def fold_prepared(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The raw set of ``tiny_prepared`` prepared alike but validated on official fold 1."""
    out = tmp_path_factory.mktemp("fold_prepared") / "prepared"
    spec = PrepareSpec(image_size=TINY_SIZE, workers=1)
    prepare_dataset(tiny_raw, out, spec, FOLD_SPEC, progress=False, source="synthetic")
    return out


def store(folder: Path) -> str:
    """A fresh local store with the experiment the runs go to."""
    uri = local_store_uri(folder / "mlruns")
    ensure_experiment(uri, EXPERIMENT, folder / "mlruns")
    return uri


def evaluate_by_hand(uri: str, run_id: str, val_auroc: float, prepared: Path) -> None:
    """Log hand-made evaluation metrics (``val_auroc``: the selection metric) and the test
    data of ``prepared`` into a run, as ``evaluate`` does."""
    metrics = {
        "threshold": 0.5,
        "val_selection": {"auroc": val_auroc},
        "test": {"f1_weighted": 0.7},
    }
    with tempfile.TemporaryDirectory() as report:
        log_evaluation(uri, run_id, metrics, report, prepared_dir=prepared)


def val_dataset(uri: str, run_id: str) -> tuple[str, dict]:
    """A run's validation input: its digest and profile."""
    (dataset,) = (
        entry.dataset
        for entry in MlflowClient(uri).get_run(run_id).inputs.dataset_inputs
        if any(tag.value == "validation" for tag in entry.tags)
    )
    return dataset.digest, json.loads(dataset.profile)


def test_two_splits_of_one_raw_set_are_two_identities(tiny_prepared, fold_prepared, tmp_path):
    subjects, fold = read_identity(tiny_prepared), read_identity(fold_prepared)
    assert subjects.data_hash == fold.data_hash  # the same images...
    assert (subjects.split, fold.split) == (asdict(SplitSpec()), asdict(FOLD_SPEC))
    assert subjects.digest != fold.digest  # ...split two ways
    # The assignment itself counts too: the same settings, other images in val.
    manifest = pd.read_parquet(fold_prepared / MANIFEST_FILE)
    settings = ("synthetic", TINY_SIZE, fold.window, fold.fit, FOLD_SPEC)
    assert cache_identity(manifest, *settings) == fold
    moved = manifest.assign(split=manifest["split"].replace({"val": "train"}))
    assert cache_identity(moved, *settings).digest != fold.digest

    # A config asking for the other split is refused, as one asking for another image size.
    size = f"data.prepare.image_size={TINY_SIZE}"
    fold.check(compose([size, *FOLD_SPLIT]).data, fold_prepared)
    with pytest.raises(ConfigError, match=r"data split\.val=subjects but .* holds split\.val=fold"):
        fold.check(compose([size]).data, fold_prepared)

    # A cache whose identity predates the split is rebuilt, never read as covering it.
    older = tmp_path / "older"
    shutil.copytree(fold_prepared, older)
    held = json.loads((older / IDENTITY_FILE).read_text())
    del held["split"], held["digest"]
    (older / IDENTITY_FILE).write_text(json.dumps(held))
    with pytest.raises(InputError, match="identity of an older prepare: rebuild it"):
        read_identity(older)


def test_compare_ranks_within_one_data_identity(tiny_prepared, fold_prepared, tmp_path):
    uri = store(tmp_path)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs: dict[str, tuple[str, Path]] = {}  # data identity -> run, cache
    # The fold run scores higher on its own validation set: ranked with the other split's
    # run, it would hide it.
    for prepared, val_auroc in ((tiny_prepared, 0.8), (fold_prepared, 0.9)):
        identity = read_identity(prepared)
        run_id = client.create_run(experiment, tags=FAMILY).info.run_id
        log_data_inputs(uri, run_id, prepared / MANIFEST_FILE, identity, TRAINING_CONTEXTS)
        evaluate_by_hand(uri, run_id, val_auroc, prepared)
        runs[identity.digest] = (run_id, prepared)

    table = compare_runs(uri, EXPERIMENT)
    assert sorted(table["digest"]) == sorted(runs)  # one group per identity
    for digest, (run_id, _) in runs.items():
        assert champion(table, digest)["run_id"] == run_id
    with pytest.raises(InputError, match="runs of 2 datasets"):
        champion(table)
    assert len({champion_alias(digest) for digest in runs}) == 2

    # Two validation datasets in MLflow, each with its own split's counts.
    for digest, (run_id, prepared) in runs.items():
        query = f"dataset.name = 'synthetic-val' AND dataset.digest = '{digest}'"
        assert [r.info.run_id for r in client.search_runs([experiment], query)] == [run_id]
        counts = split_profile(pd.read_parquet(prepared / MANIFEST_FILE), "val")
        assert val_dataset(uri, run_id) == (digest, counts)
    assert len({json.dumps(val_dataset(uri, run_id)[1]) for run_id, _ in runs.values()}) == 2


@pytest.mark.slow
def test_runs_trained_on_two_splits_are_two_groups(tiny_config, fold_prepared, tmp_path):
    cfg = tiny_config("trainer.max_epochs=1")
    fold_cfg = tiny_config("trainer.max_epochs=1", f"paths.prepared_dir={fold_prepared}")
    with pytest.raises(ConfigError, match=r"split\.val=subjects"):  # not the cache's split
        run_training(fold_cfg, tmp_path / "refused")
    fold_cfg = tiny_config(
        "trainer.max_epochs=1", f"paths.prepared_dir={fold_prepared}", *FOLD_SPLIT
    )
    uri = store_uri(cfg)
    runs: dict[str, str] = {}  # data identity -> run
    for name, config in (("subjects", cfg), ("fold", fold_cfg)):
        run_training(config, tmp_path / name)
        run_id = json.loads((tmp_path / name / "run.json").read_text())["mlflow_run_id"]
        prepared = Path(config.datamodule.prepared_dir)
        evaluate_by_hand(uri, run_id, 0.5, prepared)
        runs[read_identity(prepared).digest] = run_id

    assert len(runs) == 2
    client = MlflowClient(uri)
    for digest, run_id in runs.items():
        assert client.get_run(run_id).data.tags["data_identity"] == digest
        assert val_dataset(uri, run_id)[0] == digest
    table = compare_runs(uri, cfg.logger.mlflow.experiment_name)
    assert dict(zip(table["digest"], table["run_id"], strict=True)) == runs
