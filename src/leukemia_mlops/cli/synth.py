"""``lmo-synth``: write the synthetic C-NMC dataset to ``paths.raw_dir`` unless data is there.

Existing data is never touched: with real data in place (``data=cnmc``) this only checks it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from leukemia_mlops.cli.args import run_cli, stage_config
from leukemia_mlops.config import build_spec
from leukemia_mlops.errors import MissingInputError

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    def body() -> None:
        cfg = stage_config(__doc__, argv)
        from leukemia_mlops.data.synthetic import SyntheticSpec, generate_cnmc

        raw_dir = Path(cfg.paths.raw_dir)
        # Hidden entries (an interrupted generator's partial folder) do not count as data.
        if raw_dir.exists() and any(not p.name.startswith(".") for p in raw_dir.iterdir()):
            log.info("%s already holds data: left as it is", raw_dir)
            return
        if cfg.data.source != "synthetic":
            raise MissingInputError(
                f"{raw_dir} is empty: place the C-NMC dataset there (see README, 'Real data')"
            )
        spec = build_spec(SyntheticSpec, cfg.data.synthetic, "data.synthetic")
        table = generate_cnmc(raw_dir, spec, workers=cfg.data.prepare.workers or 0, progress=True)
        log.info("wrote %d synthetic images to %s", len(table), raw_dir)

    run_cli(body)


if __name__ == "__main__":
    main()
