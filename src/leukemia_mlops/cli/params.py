"""``lmo-params [override ...]``: compose ``conf/`` into ``params.yaml`` for the DVC pipeline."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from leukemia_mlops.cli.args import run_cli
from leukemia_mlops.config import PARAMS_FILE, compose, write_params


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(PARAMS_FILE))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=resnet50")
    args = parser.parse_args(argv)

    def body() -> None:
        changed = write_params(compose(args.overrides), args.out)
        print(f"{args.out} {'updated' if changed else 'unchanged'}")

    run_cli(body)


if __name__ == "__main__":
    main()
