"""``python -m leukemia_mlops.cli.export``: a checkpoint to ONNX, checked against PyTorch.

The checkpoint's validated threshold goes into the ONNX metadata when the evaluation
(``<paths.reports_dir>/eval/metrics.json``) scored this very checkpoint.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from leukemia_mlops.cli.args import run_cli


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default="models/cnn/checkpoints/best.ckpt")
    parser.add_argument("--out", default="models/cnn/model.onnx", help="ONNX file to write")
    parser.add_argument(
        "--image-size", type=int, help="input size in pixels (default: data.prepare.image_size)"
    )
    parser.add_argument(
        "--prepared-dir",
        help="prepare cache whose cells the parity check scores (default: paths.prepared_dir "
        "when it exists, else random images)",
    )
    parser.add_argument(
        "--metrics",
        help="evaluation metrics.json of this checkpoint, whose threshold the model carries "
        "(default: paths.reports_dir/eval/metrics.json)",
    )
    parser.add_argument("--params", default="params.yaml", help="config for the defaults")
    args = parser.parse_args(argv)

    def body() -> None:
        from pathlib import Path

        from leukemia_mlops.config import load_params
        from leukemia_mlops.inference.export import export_onnx
        from leukemia_mlops.inference.loading import evaluation_threshold

        image_size, prepared_dir, metrics = args.image_size, args.prepared_dir, args.metrics
        if image_size is None or (
            Path(args.params).is_file() and (prepared_dir is None or metrics is None)
        ):
            cfg = load_params(args.params)
            image_size = cfg.data.prepare.image_size if image_size is None else image_size
            if prepared_dir is None and Path(cfg.paths.prepared_dir).is_dir():
                prepared_dir = cfg.paths.prepared_dir
            metrics = metrics or Path(cfg.paths.reports_dir) / "eval" / "metrics.json"
        threshold = None if metrics is None else evaluation_threshold(metrics, args.checkpoint)
        report = export_onnx(
            args.checkpoint, args.out, image_size, prepared_dir, threshold=threshold
        )
        print(json.dumps(report, indent=2))

    run_cli(body)


if __name__ == "__main__":
    main()
