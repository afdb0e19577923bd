"""``python -m leukemia_mlops.cli.export``: a checkpoint to ONNX, checked against PyTorch.

The model's class (a cell classifier or a detector) is read from the checkpoint. The ONNX
file goes to ``exports/<run>.onnx`` by default (``exports/model.onnx`` for
``models/model/checkpoints/best.ckpt``): never into a run directory, which is a DVC output
that a new file there would mark changed. The validated threshold of whichever pipeline
evaluation (``<paths.reports_dir>/eval/<key>/metrics.json``) scored this very checkpoint goes
into the ONNX metadata.

``--int8`` writes a statically quantized model instead (``exports/<run>.int8.onnx``; see
``inference.quantize`` and ``evaluation.int8_parity``): the fp32 export, checked as above, is
calibrated on the prepare cache's training cells and compared with the INT8 model on its test
cells.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from leukemia_mlops.cli.args import run_cli, stage_parser


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = stage_parser(__doc__)
    parser.add_argument(
        "--checkpoint",
        help="Lightning checkpoint (default: the pipeline model's best, "
        "paths.models_dir/model/checkpoints/best.ckpt)",
    )
    parser.add_argument("--out", help="ONNX file to write (default: exports/<run>.onnx)")
    parser.add_argument(
        "--image-size",
        type=int,
        help="classifier input size in pixels (default: data.prepare.image_size; a detector "
        "declares its own)",
    )
    parser.add_argument(
        "--prepared-dir",
        help="prepare cache whose cells the parity check scores (default: paths.prepared_dir "
        "when it exists, else random images)",
    )
    parser.add_argument(
        "--metrics",
        help="evaluation metrics.json of this checkpoint, whose threshold the model carries "
        "(default: whichever of paths.reports_dir/eval/<key>/metrics.json scored it)",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="write the INT8 model (QDQ, calibrated on the prepare cache's training cells, "
        "checked against fp32 on its test cells; default out: exports/<run>.int8.onnx)",
    )
    parser.add_argument(
        "--calibration-cells",
        type=int,
        help="training cells the INT8 model is calibrated on, spread over the split (default 256)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _arguments(argv)

    def body() -> None:
        from leukemia_mlops.config import load_params
        from leukemia_mlops.errors import MissingInputError
        from leukemia_mlops.inference.export import export_onnx
        from leukemia_mlops.inference.loading import evaluation_decision
        from leukemia_mlops.tracking.run_files import evaluation_reports, model_run

        cfg: DictConfig | None = None
        if Path(args.params).is_file() or args.overrides:
            cfg = load_params(args.params, args.overrides)
        elif args.checkpoint is None or args.out is None:
            raise MissingInputError(f"{args.params} not found: give --checkpoint and --out")
        checkpoint = Path(args.checkpoint or model_run(cfg, "model").best_checkpoint)
        out = args.out or default_export_path(checkpoint, INT8_SUFFIX if args.int8 else "")
        prepared_dir, metrics, default_size = args.prepared_dir, args.metrics, None
        if cfg is not None:
            default_size = cfg.data.prepare.image_size
            if prepared_dir is None and Path(cfg.paths.prepared_dir).is_dir():
                prepared_dir = cfg.paths.prepared_dir
            metrics = metrics or evaluation_reports(cfg)
        validated = None if metrics is None else evaluation_decision(metrics, checkpoint)
        if args.int8 and prepared_dir is None:
            raise MissingInputError("--int8 calibrates on a prepare cache: give --prepared-dir")
        with tempfile.TemporaryDirectory(prefix="lmo-export-") as scratch:
            fp32 = Path(scratch) / "fp32.onnx" if args.int8 else out
            report = export_onnx(
                checkpoint,
                fp32,
                args.image_size,
                prepared_dir,
                threshold=None if validated is None else validated.threshold,
                default_size=default_size,
                calibration=None if validated is None else validated.calibration,
            )
            if args.int8:
                from leukemia_mlops.evaluation.int8_parity import export_int8

                int8 = export_int8(fp32, out, prepared_dir, args.calibration_cells)
                report = {**report, **int8, "fp32": "checked, not kept"}
        print(json.dumps(report, indent=2))

    run_cli(body)


EXPORTS_DIR = Path("exports")
INT8_SUFFIX = ".int8"


def default_export_path(checkpoint: Path, suffix: str = "") -> Path:
    """``exports/<run><suffix>.onnx``: the run directory's name for a run's checkpoint
    (``<run>/checkpoints/<name>.ckpt``), else the checkpoint's own name."""
    parent = checkpoint.parent
    name = parent.parent.name if parent.name == "checkpoints" and parent.parent.name else None
    return EXPORTS_DIR / f"{name or checkpoint.stem}{suffix}.onnx"


if __name__ == "__main__":
    main()
