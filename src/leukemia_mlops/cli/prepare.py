"""``lmo-prepare``: the DVC ``prepare`` stage (raw images -> training cache + data report)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from leukemia_mlops.cli.args import run_cli, stage_config
from leukemia_mlops.config import build_spec

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    def body() -> None:
        cfg = stage_config(__doc__, argv)
        from leukemia_mlops.data.prepare import PrepareSpec, prepare_dataset
        from leukemia_mlops.data.splits import SplitSpec
        from leukemia_mlops.files import write_json
        from leukemia_mlops.tracking.run_files import data_report

        report = prepare_dataset(
            cfg.paths.raw_dir,
            cfg.paths.prepared_dir,
            build_spec(PrepareSpec, cfg.data.prepare, "data.prepare"),
            build_spec(SplitSpec, cfg.data.split, "data.split"),
            source=cfg.data.source,
        )
        write_json(data_report(cfg), report)
        log.info("prepared %d images (%d skipped)", report["images"], report["skipped"])

    run_cli(body)


if __name__ == "__main__":
    main()
