"""``python -m leukemia_mlops.cli.predict MODEL INPUT... --out predictions.csv``.

MODEL is a classifier or a detector (told apart by the model itself): a Lightning checkpoint,
an ONNX file or an MLflow model URI (``runs:/<id>/model``, ``models:/<name>@<alias>``); INPUT
are image files or folders (searched recursively). Images are preprocessed as ``prepare``
does, with the settings the model declares, else those of ``params.yaml``; a detector sees
each whole image, letterboxed. ALL is called above --threshold, else above the model's
validated threshold (a checkpoint's from the pipeline's evaluation of it,
``paths.reports_dir/eval/<key>/metrics.json``, an ONNX file's from its metadata, an MLflow
model's from its run), else above 0.5, with a notice; every row names that threshold and its
source (``given``, ``validation``, ``default``). Every row says whether its image is like the
training images (``in_distribution``, with the reason). A detector also writes one row per
detected cell (--boxes, scoring above --min-score) and, with --overlays, each image with its
boxes drawn; a single-cell image gets a label only where a box found its cell (``status``).
Where the model's validated temperature is known, P(ALL) is calibrated (``calibrated``) and
every cell gets its conformal set (``conformal_set``); --by-subject also writes one row per
subject that C-NMC file names carry.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from leukemia_mlops.cli.args import run_cli
from leukemia_mlops.errors import InputError, MissingInputError

if TYPE_CHECKING:
    import pandas as pd

    from leukemia_mlops.inference.predict import Threshold


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help=".ckpt or .onnx file, or runs:/ or models:/ URI")
    parser.add_argument("inputs", nargs="+", help="image files and/or folders")
    parser.add_argument("--out", default="predictions.csv", help="CSV to write")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--workers", type=int, default=1, help="image-decoding processes (0: none, in this one)"
    )
    decision = parser.add_mutually_exclusive_group()
    decision.add_argument("--threshold", type=float, help="call ALL above this probability")
    decision.add_argument(
        "--metrics", help="the model's evaluation metrics.json, whose threshold to use"
    )
    parser.add_argument("--params", default="params.yaml", help="config for missing settings")
    parser.add_argument(
        "--by-subject",
        nargs="?",
        const="",
        metavar="CSV",
        help="also write one row per subject that C-NMC file names (UID_<subject>_...) carry: "
        "its cells' score and, where the model's evaluation is known, its diagnosis at the "
        "patient threshold chosen on validation subjects (default: <out stem>_subjects.csv)",
    )
    detector = parser.add_argument_group("detector models (YOLO)")
    detector.add_argument(
        "--boxes", help="CSV of one row per detected cell (default: <out stem>_boxes.csv)"
    )
    detector.add_argument("--overlays", help="folder for each image with its boxes drawn (PNG)")
    detector.add_argument(
        "--min-score",
        type=float,
        help="a box scoring above this is a cell found: written, drawn, and needed for a label "
        "(default: the floor of the detector's own overlays, MIN_BOX_SCORE)",
    )
    return parser


def _explicit_threshold(args: argparse.Namespace) -> Threshold | None:
    """--threshold (``given``), else that of the --metrics file (``validation``; it must have
    evaluated this very checkpoint), else None (the model's own then)."""
    from leukemia_mlops.inference.predict import GIVEN, Threshold

    if args.threshold is not None:
        return Threshold(args.threshold, GIVEN)
    if args.metrics is None:
        return None
    from leukemia_mlops.inference.loading import (
        CHECKPOINT_DIGEST_KEY,
        file_sha256,
        report_decision,
    )

    report = json.loads(Path(args.metrics).read_text())
    if not isinstance(report.get("threshold"), int | float):
        raise InputError(f"{args.metrics} holds no decision threshold")
    if Path(args.model).suffix != ".ckpt":
        raise InputError(
            "--metrics takes a checkpoint's evaluation report: an ONNX or MLflow model carries "
            "its own validated threshold (or give --threshold)"
        )
    if report.get(CHECKPOINT_DIGEST_KEY) != file_sha256(args.model):
        raise InputError(
            f"{args.metrics} is the evaluation of another model, not of {args.model} (its "
            f"{CHECKPOINT_DIGEST_KEY} differs): give that model's report, or --threshold"
        )
    return Threshold.validated(report_decision(report, args.metrics))


def _write_by_subject(
    args: argparse.Namespace,
    table: pd.DataFrame,
    cell_threshold: float,
    evaluation: Sequence[Path] | None,
) -> None:
    """The per-subject file of ``--by-subject``: the evaluation's patient rule and threshold
    where the model's report is known (``--metrics``, or a checkpoint's pipeline report)."""
    from leukemia_mlops.evaluation.patient import diagnose_files
    from leukemia_mlops.inference.loading import evaluation_report

    reports = [Path(args.metrics)] if args.metrics else evaluation
    found = None
    if reports is not None and Path(args.model).suffix == ".ckpt":
        found = evaluation_report(reports, args.model)
    patient = None if found is None else found[0].get("patient")
    out = Path(args.by_subject or Path(args.out).with_name(f"{Path(args.out).stem}_subjects.csv"))
    files = table["file"].astype(str).tolist()
    subjects = diagnose_files(files, table["prob_all"].to_numpy(float), cell_threshold, patient)
    out.parent.mkdir(parents=True, exist_ok=True)
    subjects.to_csv(out, index=False)
    how = "diagnosed at the validated patient threshold" if patient else "scores only: no "
    how += "" if patient else "patient threshold is known for this model"
    print(f"{len(subjects)} subjects into {out} ({how})")


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)

    def body() -> None:
        from leukemia_mlops.config import load_params
        from leukemia_mlops.inference.detection import YoloScorer
        from leukemia_mlops.inference.loading import PREPROCESSING_KEYS, is_mlflow_uri, load_scorer
        from leukemia_mlops.inference.predict import (
            NO_CELL_FOUND,
            decision_threshold,
            predict_paths,
        )
        from leukemia_mlops.models.detector import MIN_BOX_SCORE
        from leukemia_mlops.tracking.run_files import evaluation_reports, store_uri
        from leukemia_mlops.tracking.store import tracking_uri

        params = load_params(args.params) if Path(args.params).is_file() else None
        uri = None
        if is_mlflow_uri(args.model):
            uri = store_uri(params) if params else tracking_uri(None, "mlruns")
        scorer = load_scorer(args.model, uri)
        missing = [key for key in PREPROCESSING_KEYS if key not in scorer.preprocessing]
        if missing and params is None:
            raise MissingInputError(
                f"{args.params} not found: it must give {', '.join(missing)} "
                "(the model does not declare them)"
            )
        settings = {**{k: params.data.prepare[k] for k in missing}, **scorer.preprocessing}
        detector = isinstance(scorer, YoloScorer)
        evaluation = evaluation_reports(params) if params else None
        threshold = decision_threshold(args.model, _explicit_threshold(args), evaluation, uri)
        if args.by_subject is not None:
            from leukemia_mlops.evaluation.patient import file_subjects
            from leukemia_mlops.inference.predict import list_inputs

            file_subjects([str(path) for path in list_inputs(args.inputs)])  # fail before scoring
        table = predict_paths(
            scorer,
            args.inputs,
            args.out,
            **settings,
            batch_size=args.batch_size,
            workers=args.workers,
            threshold=threshold,
            boxes_csv=args.boxes,
            overlays=args.overlays,
            min_score=MIN_BOX_SCORE if args.min_score is None else args.min_score,
        )
        failed = int((table["error"] != "").sum())
        foreign = int((~table["in_distribution"] & (table["error"] == "")).sum())
        cells = ""
        if detector:
            missed = int((table["status"] == NO_CELL_FOUND).sum())
            cells = f", {int(table['cells'].sum())} cells found, {missed} single cells not found"
        calibration = threshold.calibration
        calibrated = (
            "" if calibration is None else f", P(ALL) calibrated (T={calibration.temperature:.3g})"
        )
        print(
            f"{len(table)} files scored into {args.out} at threshold {threshold.value:.4g}, "
            f"source {threshold.source}{calibrated} ({failed} could not be read, "
            f"{foreign} unlike the training images{cells})"
        )
        if args.by_subject is not None:
            _write_by_subject(args, table, threshold.value, evaluation)

    run_cli(body)


if __name__ == "__main__":
    main()
