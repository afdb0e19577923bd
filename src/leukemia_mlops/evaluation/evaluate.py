"""Evaluate a trained model of either family on the held-out subjects of the prepare cache.

Both families go through one protocol: a YOLO detector is scored as an image-level classifier
(its P(ALL) of a single-cell image, as its training validates it) with the CNN's metrics,
intervals, threshold choice and TTA; it also gets box mAP on test scenes (see
:mod:`leukemia_mlops.evaluation.detection`).

The decision threshold is chosen on the validation split only and then applied to the test
split, whose labels never influence any choice. The validation split also chose the checkpoint
and the sweep's best trial, so its scores are reported as selection metrics (``val_selection``),
never as the estimate; the test split is the estimate. Test metrics carry stratified
subject-bootstrap intervals, because the test set samples subjects, not independent cells.

The temperature (``calibration``), the conformal quantiles (``conformal``) and the patient
threshold (``patient``) are fitted on validation too, and graded on test; ``ood`` counts the
test cells the in-distribution rule of ``predict`` flags.

``out_dir`` receives the files :class:`~leukemia_mlops.tracking.run_files.EvalFiles` names:
``metrics.json`` (NaN as null), ``predictions.csv``, ``subjects.csv`` (one row per validation
and test subject) and its figure ``subjects.png``, the report figures as
PNG with their DVC plot tables (``roc.csv``, ``pr.csv``, ``reliability.csv``), and the gallery
``gallery.png``: Grad-CAM of test cells (CNN) or the predicted boxes over test scenes (YOLO),
so that every report has the same files.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from tqdm import tqdm

from leukemia_mlops.data.datamodule import CellDataset
from leukemia_mlops.data.identity import read_identity
from leukemia_mlops.data.prepare import MANIFEST_FILE
from leukemia_mlops.data.scenes import SceneSpec
from leukemia_mlops.errors import ConfigError, InputError, MissingInputError
from leukemia_mlops.evaluation.bootstrap import (
    Cells,
    bootstrap_ci,
    interval_columns,
    subjects_per_class,
    too_few_subjects,
)
from leukemia_mlops.evaluation.calibration import calibration_report, fit_temperature
from leukemia_mlops.evaluation.compare import THROUGHPUT_METRIC, WARNING_TAG
from leukemia_mlops.evaluation.conformal import check_alpha, conformal_report
from leukemia_mlops.evaluation.detection import (
    TestScenes,
    detect_scenes,
    subject_scenes,
    write_overlays,
)
from leukemia_mlops.evaluation.gradcam import gradcam_gallery
from leukemia_mlops.evaluation.metrics import (
    BinaryMetrics,
    binary_metrics,
    choose_threshold,
)
from leukemia_mlops.evaluation.ood_alarms import false_alarm_report
from leukemia_mlops.evaluation.paired import (
    DIFFERENCES,
    Scores,
    aligned_test_cells,
    comparison_report,
)
from leukemia_mlops.evaluation.patient import DEFAULT_RULE, check_rule, patient_report
from leukemia_mlops.evaluation.plots import (
    confusion_matrix_plot,
    pr_curve_plot,
    reliability_plot,
    roc_curve_plot,
    subject_scores_plot,
)
from leukemia_mlops.evaluation.ranking_guard import inverted_ranking
from leukemia_mlops.files import write_json, write_text
from leukemia_mlops.inference.calibrated import calibrate, calibrated_threshold
from leukemia_mlops.inference.loading import (
    CHECKPOINT_DIGEST_KEY,
    Validated,
    file_sha256,
    load_module,
    report_decision,
)
from leukemia_mlops.inference.scorers import Scorer, TorchScorer
from leukemia_mlops.inference.serving import ServedModel, log_image_model
from leukemia_mlops.labels import CLASS_NAMES
from leukemia_mlops.models.base import CELL_LOGIT, DETECTIONS, FineTunedModule
from leukemia_mlops.models.detector import YoloDetector
from leukemia_mlops.tracking.datasets import EVALUATION_CONTEXTS, log_data_inputs
from leukemia_mlops.tracking.run_files import EvalFiles
from leukemia_mlops.tracking.store import tracking_uri

log = logging.getLogger(__name__)

CONFIDENCE = 0.95
GALLERY_PER_GROUP = 4
PLOTS = {"roc": roc_curve_plot, "pr": pr_curve_plot, "reliability": reliability_plot}
ROLES = {
    "val_selection": "selection metric, optimistic: the validation split chose the checkpoint, "
    "the sweep's best trial and the threshold",
    "test": "the estimate: held-out test subjects at the validation-chosen threshold, with "
    "stratified subject-bootstrap 95% intervals (percentile and BCa) and valid-resample counts",
    "test_default": "test split at threshold 0.5: what the threshold choice is worth",
    "calibration": "temperature scaling fitted on validation; test top-label ECE and Brier "
    "score before and after, with stratified subject-bootstrap 95% intervals",
    "conformal": "Mondrian split-conformal sets calibrated on validation cells; test coverage "
    "per class and abstention rate, with stratified subject-bootstrap 95% intervals",
    "patient": "test subjects diagnosed from their cells' calibrated scores at a threshold "
    "chosen on validation subjects, with exact (Clopper-Pearson) 95% intervals",
    "ood": "share of test cells (all in distribution) that predict's in-distribution rule flags",
    "detection": "YOLO only: box mAP (COCO) on test scenes, each composed from the cells of one "
    "test subject, with stratified subject-bootstrap 95% intervals",
}


@dataclass(frozen=True)
class EvaluateSpec:
    """The ``evaluate`` config group (defaults in ``conf/evaluate/``), checked when read."""

    n_resamples: int
    min_subjects: int
    tta: bool
    seed: int
    batch_size: int
    scenes_per_subject: int = 3  # YOLO test scenes composed from each test subject's cells
    mixed_precision: bool = False  # score under a GPU's autocast instead of fp32
    alpha: float = 0.1  # the conformal sets' error level
    patient_rule: str = DEFAULT_RULE  # how a subject's cells make its score (patient.RULES)

    def __post_init__(self) -> None:
        check_alpha(self.alpha)
        check_rule(self.patient_rule)
        if self.n_resamples < 1:
            raise ConfigError(f"evaluate.n_resamples must be >= 1, got {self.n_resamples}")
        if self.min_subjects < 2:
            raise ConfigError(f"evaluate.min_subjects must be >= 2, got {self.min_subjects}")
        if self.batch_size < 1:
            raise ConfigError(f"evaluate.batch_size must be >= 1, got {self.batch_size}")
        if self.scenes_per_subject < 1:
            raise ConfigError(
                f"evaluate.scenes_per_subject must be >= 1, got {self.scenes_per_subject}"
            )

    def bootstrap(self) -> dict[str, Any]:
        """The keyword arguments of the subject bootstrap."""
        return {
            "n_resamples": self.n_resamples,
            "confidence": CONFIDENCE,
            "seed": self.seed,
            "min_subjects": self.min_subjects,
        }


class Scored(NamedTuple):
    """One split's cells and the model's probabilities of ALL for them."""

    split: str
    data: CellDataset
    probs: np.ndarray

    @property
    def cells(self) -> Cells:
        return Cells(self.probs, self.data.labels, self.data.subjects)


def score_split(scorer: Scorer, split: str, data: CellDataset, batch_size: int) -> Scored:
    """Score a split of the cache batch by batch (the memory map is read one batch at a time)."""
    starts = range(0, len(data), batch_size)
    batches = (data.images[data.rows[s : s + batch_size]] for s in starts)
    bar = tqdm(batches, total=len(starts), desc=f"score {split}", unit="batch")
    return Scored(split, data, np.concatenate([scorer(batch) for batch in bar]))


def _with_intervals(test: Scored, threshold: float, spec: EvaluateSpec) -> dict[str, float]:
    """Every binary metric as ``name`` beside ``name_pct_low``, ``name_pct_high`` (percentile
    interval), ``name_bca_low``, ``name_bca_high`` (BCa) and ``name_n_valid`` (resamples behind
    both); see :func:`interval_columns`."""
    intervals = bootstrap_ci(
        test.probs,
        test.data.labels,
        test.data.subjects,
        BinaryMetrics(threshold),
        **spec.bootstrap(),
    )
    return interval_columns(intervals)


def threshold_report(
    val: Scored, test: Scored, spec: EvaluateSpec
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Metrics of one set of probabilities and the per-subject table of both splits.

    The threshold maximising validation weighted F1 is applied to the test split; the test
    metrics at the default threshold 0.5 (``test_default``) show what that choice is worth.
    The temperature is fitted on validation too; it is monotone, so the same threshold choice
    made on calibrated validation probabilities is ``calibrated_threshold(threshold, T)``:
    ``threshold`` stays on the raw P(ALL) that ``predictions.csv`` holds. The conformal sets
    and the patient diagnosis use calibrated probabilities.
    """
    threshold = choose_threshold(val.probs, val.data.labels)
    temperature = fit_temperature(val.probs, val.data.labels)
    calibrated = [s.cells._replace(probs=calibrate(s.probs, temperature)) for s in (val, test)]
    cell_threshold = calibrated_threshold(threshold, temperature)
    patient, subjects = patient_report(*calibrated, spec.patient_rule, cell_threshold)
    metrics = {
        "threshold": threshold,
        "temperature": temperature,
        "val_selection": binary_metrics(val.probs, val.data.labels, threshold),
        "test": _with_intervals(test, threshold, spec),
        "test_default": _with_intervals(test, 0.5, spec),
        "calibration": calibration_report(temperature, test.cells, spec.bootstrap()),
        "conformal": conformal_report(*calibrated, spec.alpha, spec.bootstrap()),
        "patient": patient,
    }
    return metrics, subjects


def bootstrap_report(test: Scored, spec: EvaluateSpec) -> dict[str, Any]:
    """How the intervals were made, and whether the test split allowed any at all."""
    counts = subjects_per_class(test.data.labels, np.asarray(test.data.subjects))
    reason = too_few_subjects(counts, spec.min_subjects)
    return {
        "method": "subject bootstrap stratified by class (percentile and BCa)",
        "intervals": f"none, {reason}" if reason else "percentile and BCa",
        "test_subjects": counts,
        "min_subjects": spec.min_subjects,
        "n_resamples": spec.n_resamples,
        "confidence": CONFIDENCE,
        "seed": spec.seed,
    }


def evaluate_model(
    checkpoint: str | Path,
    prepared_dir: str | Path,
    out_dir: str | Path,
    spec: EvaluateSpec,
    *,
    scene_spec: SceneSpec | None = None,
    device: str | None = None,
    mlflow_run_id: str | None = None,
    mlflow_uri: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` (of the module class it names) on the val and test splits;
    returns what ``metrics.json`` holds.

    ``spec.tta`` adds a ``tta`` section: the same report for probabilities averaged over the 8
    dihedral views. The class's :data:`REPORT_SECTIONS` draw the gallery and add their
    sections: a detector's ``detection``, its test scenes laid out by ``scene_spec`` (default:
    the composer's defaults). With ``mlflow_run_id`` the metrics and
    every file of ``out_dir`` are logged into that run (``mlflow_uri`` defaults to
    :func:`tracking_uri`).
    """
    data = _eval_splits(Path(prepared_dir))
    model = load_module(checkpoint)
    scorer = TorchScorer(
        model.cell_logit_network(), device=device, mixed_precision=spec.mixed_precision
    )
    model.to(scorer.device)
    started = time.perf_counter()
    val, test = (score_split(scorer, *item, spec.batch_size) for item in data.items())
    images_per_s = (len(val.data) + len(test.data)) / (time.perf_counter() - started)
    metrics, subjects = threshold_report(val, test, spec)
    predictions = _predictions([val, test], metrics["threshold"], "")
    if spec.tta:
        views = TorchScorer(
            scorer.net, tta=True, device=device, mixed_precision=spec.mixed_precision
        )
        tta_val, tta_test = (score_split(views, *item, spec.batch_size) for item in data.items())
        metrics["tta"], _ = threshold_report(tta_val, tta_test, spec)
        tta_columns = _predictions([tta_val, tta_test], metrics["tta"]["threshold"], "_tta")
        predictions = predictions.join(tta_columns[["prob_all_tta", "pred_tta"]])
    metrics["counts"] = {
        f"{s.split}_{unit}": count
        for s in (val, test)
        for unit, count in (("cells", len(s.data)), ("subjects", len(set(s.data.subjects))))
    }
    metrics["ood"] = false_alarm_report(test.data, read_identity(prepared_dir).window)
    metrics["bootstrap"] = bootstrap_report(test, spec)
    metrics["roles"] = ROLES
    metrics[CHECKPOINT_DIGEST_KEY] = file_sha256(checkpoint)  # whose threshold it is
    metrics["scoring"] = scoring_record(scorer)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = EvalFiles(out_dir)
    report = Report(
        model, scorer, test, metrics["threshold"], Path(prepared_dir), scene_spec, spec, files
    )
    metrics.update(REPORT_SECTIONS[model.served_output](report))
    metrics = _json_ready(metrics)
    metrics["warnings"] = inverted_ranking(metrics)
    for warning in metrics["warnings"]:
        log.warning("%s: %s", checkpoint, warning)
    write_text(files.predictions, predictions.to_csv(index=False))
    write_text(files.subjects, subjects.to_csv(index=False))
    _write_plots(test, metrics["threshold"], files)
    subject_scores_plot(
        subjects, metrics["patient"]["threshold"], spec.patient_rule, files.plot("subjects", ".png")
    )
    write_json(files.metrics, metrics)
    if mlflow_run_id:
        uri = mlflow_uri or tracking_uri(None)
        # The speed goes to MLflow only: a report file must not change with the machine's load.
        speed = {THROUGHPUT_METRIC: images_per_s}
        log_evaluation(uri, mlflow_run_id, metrics, out_dir, prepared_dir, extra=speed)
        # The model that takes image files, now that its validated threshold is known.
        decision = report_decision(metrics, files.metrics)
        _log_served_model(uri, mlflow_run_id, model, prepared_dir, decision)
    return metrics


def compare_models(
    out_dirs: dict[str, Path], reports: dict[str, dict[str, Any]], spec: EvaluateSpec
) -> dict[str, Any]:
    """The paired comparison of two evaluated models (name -> its report folder and its
    ``metrics.json``), first minus second, on the test cells both ``predictions.csv`` hold."""
    (name_a, dir_a), (name_b, dir_b) = out_dirs.items()
    cells = aligned_test_cells(
        pd.read_csv(EvalFiles(dir_a).predictions), pd.read_csv(EvalFiles(dir_b).predictions)
    )
    a = Scores(name_a, cells["prob_a"].to_numpy(), reports[name_a]["threshold"])
    b = Scores(name_b, cells["prob_b"].to_numpy(), reports[name_b]["threshold"])
    return _json_ready(comparison_report(a, b, cells, spec.bootstrap()))


#: The libraries whose versions can change a score.
SCORING_LIBRARIES = ("torch", "torchvision", "timm", "torchmetrics", "numpy", "leukemia-mlops")


def scoring_record(scorer: TorchScorer) -> dict[str, Any]:
    """What the scores were computed with: the device, the precision and library versions."""
    from importlib.metadata import version

    return {
        "device": str(scorer.device),
        "precision": scorer.precision,
        "versions": {name: version(name) for name in SCORING_LIBRARIES},
    }


def _log_served_model(
    uri: str,
    run_id: str,
    model: FineTunedModule,
    prepared_dir: str | Path,
    decision: Validated,
) -> None:
    """Log the model as the MLflow model that takes image files (``inference.serving``), with
    the threshold and calibration validated for it."""
    identity = read_identity(prepared_dir)
    served = ServedModel.of(
        model,
        identity.image_size,
        identity.window,
        identity.fit,
        decision.threshold,
        calibration=decision.calibration,
    )
    log_image_model(uri, run_id, model.net.cpu(), served)


@dataclass(frozen=True)
class Report:
    """What a family's report sections read: the trained module, the scorer of its cells, the
    scored test split and the validated threshold, the cache, the test scenes' layout (None:
    the composer's defaults), the evaluate settings and the report's files."""

    model: FineTunedModule
    scorer: TorchScorer
    test: Scored
    threshold: float
    prepared_dir: Path
    scene_spec: SceneSpec | None
    spec: EvaluateSpec
    files: EvalFiles


def cell_sections(report: Report) -> dict[str, Any]:
    """A cell classifier's report: no section besides the protocol's; Grad-CAM as the gallery."""
    _write_gallery(report.scorer, report.test, report.threshold, report.files.gallery)
    return {}


def detection_sections(report: Report) -> dict[str, Any]:
    """A detector's report: box mAP on test scenes (``detection``), drawn as the gallery."""
    scenes = subject_scenes(
        report.prepared_dir,
        report.model.hparams.img_size,
        report.scene_spec or SceneSpec(),
        report.spec.scenes_per_subject,
        report.spec.seed,
    )
    return {"detection": detection_report(report.model, scenes, report.spec, report.files.root)}


#: A report's family-dependent gallery and sections, by the class's ``served_output``.
REPORT_SECTIONS: dict[str, Callable[[Report], dict[str, Any]]] = {
    CELL_LOGIT: cell_sections,
    DETECTIONS: detection_sections,
}


def detection_report(
    detector: YoloDetector, scenes: TestScenes, spec: EvaluateSpec, out_dir: Path
) -> dict[str, Any]:
    """Box mAP of the test scenes with subject intervals; draws the scenes' detections as the
    report's gallery."""
    intervals = detect_scenes(detector, scenes, spec.batch_size, spec.bootstrap())
    write_overlays(detector, scenes, EvalFiles(out_dir).gallery)
    return {
        **interval_columns(intervals),
        "scenes": len(scenes.samples),
        "scenes_per_subject": spec.scenes_per_subject,
        "boxes": sum(len(target["boxes"]) for _, target in scenes.samples),
    }


def _eval_splits(prepared_dir: Path) -> dict[str, CellDataset]:
    """The val and test splits of the cache, each required to hold cells."""
    if not (prepared_dir / MANIFEST_FILE).is_file():
        raise MissingInputError(f"no prepared data in {prepared_dir}: run the prepare stage")
    data = {split: CellDataset(prepared_dir, split) for split in ("val", "test")}
    for split, cells in data.items():
        if len(cells) == 0:
            raise InputError(f"the {split} split of {prepared_dir} is empty")
    return data


def _predictions(scored: list[Scored], threshold: float, suffix: str) -> pd.DataFrame:
    """One row per val and test cell: what it is and what the model called it."""
    return pd.concat(
        [
            pd.DataFrame(
                {
                    "path": s.data.paths,
                    "subject": s.data.subjects,
                    "split": s.split,
                    "label": s.data.labels,
                    f"prob_all{suffix}": s.probs,
                    f"pred{suffix}": (s.probs > threshold).astype(np.int64),
                }
            )
            for s in scored
        ],
        ignore_index=True,
    )


def _write_plots(test: Scored, threshold: float, files: EvalFiles) -> None:
    """Test-split figures; their tables lose NaN rows (empty bins, PR's closing point) for DVC."""
    labels = test.data.labels
    preds = (test.probs > threshold).astype(np.int64)
    confusion_matrix_plot(labels, preds, files.confusion_matrix)
    for name, plot in PLOTS.items():
        table = plot(test.probs, labels, files.plot(name, ".png"))
        write_text(files.plot(name, ".csv"), table.dropna().to_csv(index=False))


def gallery_rows(
    probs: np.ndarray, labels: np.ndarray, threshold: float, per_group: int
) -> np.ndarray:
    """The most confident right calls, then the most confidently wrong ones."""
    order = np.argsort(-np.abs(probs - threshold), kind="stable")
    right = (probs[order] > threshold) == labels[order].astype(bool)
    return np.concatenate([order[right][:per_group], order[~right][:per_group]])


def _write_gallery(scorer: TorchScorer, test: Scored, threshold: float, path: Path) -> None:
    """Grad-CAM of the class the model called, for its surest right and wrong test calls."""
    rows = gallery_rows(test.probs, test.data.labels, threshold, GALLERY_PER_GROUP)
    images = np.stack([test.data.images[test.data.rows[i]] for i in rows])
    called = (test.probs[rows] > threshold).astype(np.int64)
    titles = [
        f"{'right' if call == label else 'WRONG'}: {CLASS_NAMES[label]} called "
        f"{CLASS_NAMES[call]}, p(ALL)={prob:.2f}"
        for call, label, prob in zip(called, test.data.labels[rows], test.probs[rows], strict=True)
    ]
    gradcam_gallery(scorer, images, called, titles, path)


def _json_ready(value: Any) -> Any:
    """Plain floats with NaN and infinities as None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


def mlflow_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """``metrics.json``'s numbers as MLflow metric keys, nulls and descriptions left out.

    Test scores become ``test/<metric>``; everything else ``eval/<path>``, which keeps the
    evaluation's validation scores apart from training's per-epoch ``val/`` history.
    """
    flat: dict[str, float] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}/")
            elif isinstance(value, int | float):
                flat[prefix + key] = float(value)

    walk(metrics, "")
    return {key if key.startswith("test/") else f"eval/{key}": v for key, v in flat.items()}


def log_evaluation(
    uri: str,
    run_id: str,
    metrics: dict[str, Any],
    out_dir: str | Path,
    prepared_dir: str | Path | None = None,
    extra: dict[str, float] | None = None,
) -> None:
    """Log the evaluation metrics (and ``extra`` ones) and every file of ``out_dir`` (under
    ``evaluation/``), and the test split of ``prepared_dir`` (the cache evaluated) as the run's
    ``test`` dataset."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    if prepared_dir is not None:
        identity = read_identity(prepared_dir)
        manifest = Path(prepared_dir) / MANIFEST_FILE
        log_data_inputs(uri, run_id, manifest, identity, EVALUATION_CONTEXTS)

    client = MlflowClient(uri)
    now = int(time.time() * 1000)
    values = {**mlflow_metrics(metrics), **(extra or {})}
    logged = [Metric(key, value, now, 0) for key, value in values.items()]
    client.log_batch(run_id, metrics=logged)
    client.set_tag(run_id, WARNING_TAG, "; ".join(metrics.get("warnings", [])))
    client.log_artifacts(run_id, str(out_dir), "evaluation")


def log_comparison(uri: str, run_ids: list[str], comparison: dict[str, Any]) -> None:
    """Log a paired comparison into each compared model's run: its numbers as
    ``comparison/<metric>/<part>``, its verdict as the ``comparison_verdict`` tag and how both
    were tuned as ``comparison_tuning``."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    client = MlflowClient(uri)
    now = int(time.time() * 1000)
    logged = [
        Metric(f"comparison/{name}/{part}", value, now, 0)
        for name in DIFFERENCES
        for part, value in comparison[name].items()
        if value is not None
    ]
    tags = [
        RunTag("comparison_verdict", comparison["verdict"]),
        RunTag("comparison", comparison["difference"]),
    ]
    if "tuning" in comparison:
        tags.append(RunTag("comparison_tuning", comparison["tuning"]["note"]))
    for run_id in run_ids:
        client.log_batch(run_id, metrics=logged, tags=tags)
