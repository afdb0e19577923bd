"""``python -m leukemia_mlops.cli.compare``: CNN and YOLO runs in one table, per dataset.

Reads the MLflow store of ``params.yaml`` and writes the best run of each dataset, family and
backbone (by a validation metric) as Markdown (``--out``) and CSV. Rows are grouped by the
data they were evaluated on, its digest the prepare cache's identity (raw data, prepare and
split settings), never ranked across datasets. ``--register`` registers the champion of one
dataset (``--dataset``, needed when the store holds several) as a version of
``leukemia-cell-classifier`` and points that dataset's alias (``champion-<identity>``) at it;
its model card (rendered from the run's logged evaluation) becomes the version's description,
an artifact of its run and ``model_card.md`` beside ``--out``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from leukemia_mlops.cli.args import run_cli, stage_parser

log = logging.getLogger(__name__)
#: The champion's model card, written beside the comparison (``--out``).
MODEL_CARD = "model_card.md"


def main(argv: Sequence[str] | None = None) -> None:
    from leukemia_mlops.evaluation.compare import SELECTION_METRIC

    parser = stage_parser(__doc__)
    parser.add_argument("--out", default="reports/comparison.md", help="Markdown file to write")
    parser.add_argument(
        "--metric", default=SELECTION_METRIC, help="validation metric (MLflow key) to rank by"
    )
    parser.add_argument("--register", action="store_true", help="register the champion")
    parser.add_argument(
        "--dataset", help="digest (data identity) of the dataset whose champion to register"
    )
    parser.add_argument("--name", help="registered model name (default: the task's name)")
    args = parser.parse_args(argv)

    def body() -> None:
        from leukemia_mlops.config import load_params
        from leukemia_mlops.evaluation.compare import champion, compare_runs, write_comparison
        from leukemia_mlops.tracking.run_files import store_uri

        cfg = load_params(args.params, args.overrides)
        uri = store_uri(cfg)
        table = compare_runs(uri, cfg.logger.mlflow.experiment_name, args.metric)
        markdown, _ = write_comparison(table, args.out)
        print(markdown.read_text(), end="")
        if args.register:
            from leukemia_mlops.tracking.model_card import attach_model_card
            from leukemia_mlops.tracking.registry import (
                REGISTERED_NAME,
                champion_alias,
                register_best,
            )

            best = champion(table, args.dataset)
            name = args.name or REGISTERED_NAME
            version = register_best(uri, best["run_id"], best["digest"], name).version
            card = Path(args.out).with_name(MODEL_CARD)
            attach_model_card(uri, name, version, card)
            log.info(
                "registered run %s (%s %s, dataset %s) as %s v%s, alias %s; model card %s",
                best["run_id"],
                best["family"],
                best["backbone"],
                best["digest"],
                name,
                version,
                champion_alias(best["digest"]),
                card,
            )

    run_cli(body)


if __name__ == "__main__":
    main()
