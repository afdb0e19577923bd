"""``python -m leukemia_mlops.cli.export``: a checkpoint to ONNX, checked against PyTorch.

The model's class (a cell classifier or a detector) is read from the checkpoint. The ONNX
file goes to ``exports/<run>.onnx`` by default (``exports/model.onnx`` for
``models/model/checkpoints/best.ckpt``): never into a run directory, which is a DVC output
that a new file there would mark changed. The validated threshold of whichever pipeline
evaluation (``<paths.reports_dir>/eval/<key>/metrics.json``) scored this very checkpoint goes
into the ONNX metadata.
"""

from __future__ import annotations

import argparse
import json
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
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _arguments(argv)

    def body() -> None:
        from leukemia_mlops.config import load_params
        from leukemia_mlops.errors import MissingInputError
        from leukemia_mlops.inference.export import export_onnx
        from leukemia_mlops.inference.loading import evaluation_threshold
        from leukemia_mlops.tracking.run_files import evaluation_reports, model_run

        cfg: DictConfig | None = None
        if Path(args.params).is_file() or args.overrides:
            cfg = load_params(args.params, args.overrides)
        elif args.checkpoint is None or args.out is None:
            raise MissingInputError(f"{args.params} not found: give --checkpoint and --out")
        checkpoint = Path(args.checkpoint or model_run(cfg, "model").best_checkpoint)
        out = args.out or default_export_path(checkpoint)
        prepared_dir, metrics, default_size = args.prepared_dir, args.metrics, None
        if cfg is not None:
            default_size = cfg.data.prepare.image_size
            if prepared_dir is None and Path(cfg.paths.prepared_dir).is_dir():
                prepared_dir = cfg.paths.prepared_dir
            metrics = metrics or evaluation_reports(cfg)
        threshold = None if metrics is None else evaluation_threshold(metrics, checkpoint)
        report = export_onnx(
            checkpoint,
            out,
            args.image_size,
            prepared_dir,
            threshold=threshold,
            default_size=default_size,
        )
        print(json.dumps(report, indent=2))

    run_cli(body)


EXPORTS_DIR = Path("exports")


def default_export_path(checkpoint: Path) -> Path:
    """``exports/<run>.onnx``: the run directory's name for a run's checkpoint
    (``<run>/checkpoints/<name>.ckpt``), else the checkpoint's own name."""
    parent = checkpoint.parent
    name = parent.parent.name if parent.name == "checkpoints" and parent.parent.name else None
    return EXPORTS_DIR / f"{name or checkpoint.stem}.onnx"


if __name__ == "__main__":
    main()
