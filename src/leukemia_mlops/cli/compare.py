"""``python -m leukemia_mlops.cli.compare``: best run per model family and backbone.

Reads the MLflow store of ``params.yaml`` and writes the table as Markdown (``--out``) and CSV.
``--register`` also registers the best run overall and points the ``champion`` alias at it.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from leukemia_mlops.cli.args import run_cli

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="reports/comparison.md", help="Markdown file to write")
    parser.add_argument("--metric", default="test/f1_weighted", help="MLflow metric to rank by")
    parser.add_argument("--register", action="store_true", help="register the best run")
    parser.add_argument("--name", default="leukemia-cnn", help="registered model name")
    parser.add_argument("--params", default="params.yaml", help="config naming the MLflow store")
    args = parser.parse_args(argv)

    def body() -> None:
        from leukemia_mlops.config import load_params
        from leukemia_mlops.evaluation.compare import compare_runs, write_comparison
        from leukemia_mlops.tracking.store import tracking_uri

        cfg = load_params(args.params)
        uri = tracking_uri(cfg.logger.mlflow.tracking_uri, cfg.paths.mlruns_dir)
        table = compare_runs(uri, cfg.logger.mlflow.experiment_name, args.metric)
        markdown, _ = write_comparison(table, args.out)
        print(markdown.read_text(), end="")
        if args.register:
            from leukemia_mlops.tracking.registry import register_best

            best = table.iloc[0]
            version = register_best(uri, best["run_id"], args.name).version
            log.info("registered run %s as %s v%s (champion)", best["run_id"], args.name, version)

    run_cli(body)


if __name__ == "__main__":
    main()
