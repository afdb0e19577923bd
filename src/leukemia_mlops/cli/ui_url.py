"""``python -m leukemia_mlops.cli.ui_url``: the link ``make ui`` prints before serving the UI.

It opens the project's experiment in MLflow's model-training view, not the GenAI one.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from leukemia_mlops.cli.args import run_cli


def main(argv: Sequence[str] | None = None) -> None:
    from leukemia_mlops.tracking.store import DEFAULT_EXPERIMENT

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mlruns-dir", default="mlruns", help="the local store's folder")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="experiment name")
    parser.add_argument("--base-url", default="http://127.0.0.1:5000", help="where the UI runs")
    args = parser.parse_args(argv)

    def body() -> None:
        from leukemia_mlops.tracking.store import local_store_uri, ui_url

        uri = local_store_uri(args.mlruns_dir)
        print(ui_url(uri, args.experiment, args.base_url, args.mlruns_dir))

    run_cli(body)


if __name__ == "__main__":
    main()
