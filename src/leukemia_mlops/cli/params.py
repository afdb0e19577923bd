"""``lmo-params [override ...]``: compose ``conf/`` into ``params.yaml`` for the DVC pipeline.

The result is the file ``dvc exp run`` writes for the same overrides (DVC's Hydra composition).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from leukemia_mlops.cli.args import run_cli
from leukemia_mlops.config import CONF_DIR, PARAMS_FILE, compose, write_params


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(PARAMS_FILE))
    parser.add_argument("--config-dir", default=str(CONF_DIR), help="the conf/ folder to compose")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=resnet50")
    args = parser.parse_args(argv)

    def body() -> None:
        changed = write_params(compose(args.overrides, config_dir=args.config_dir), args.out)
        print(f"{args.out} {'updated' if changed else 'unchanged'}")

    run_cli(body)


if __name__ == "__main__":
    main()
