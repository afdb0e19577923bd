"""``python -m bench.run [--quick] [--only NAME ...] [--out DIR]``: run the benchmarks.

Each benchmark's result goes to ``DIR/bench/results/NAME.json`` as soon as it is measured, and
``DIR/BENCHMARKS.md`` is rebuilt from every stored result (so ``--only`` updates its sections
and keeps the others), followed by the profiling log ``bench/profiling.md``. ``DIR`` defaults
to the repository root.

Benchmark modules are imported only when run: worker processes started with ``spawn`` import
this module again, and should not pay for torch and ONNX Runtime on the way.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import tempfile
import warnings
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

#: Benchmark modules under ``bench/``, in the order they run and appear in BENCHMARKS.md.
BENCHMARKS = (
    "preprocessing",
    "loading",
    "training",
    "capacity",
    "precision",
    "inference",
    "int8",
    "predict_throughput",
    "ceiling",
    "accuracy",
    "trial",
    "sweep_disk",
    "memory",
    "yolo",
    "serving",
    "repro",
)
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path("bench/results")
#: Hand-kept: targets missed, what profiling showed, what changed (before/after figures).
PROFILING_LOG = REPO / "bench/profiling.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description="Run the benchmarks; rewrite BENCHMARKS.md."
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (about a minute)")
    parser.add_argument(
        "--only", nargs="+", choices=BENCHMARKS, metavar="NAME", help=", ".join(BENCHMARKS)
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO,
        metavar="DIR",
        help="where BENCHMARKS.md and bench/results/ go (default: the repository root)",
    )
    return parser.parse_args(argv)


def quiet() -> None:
    """Keep the console to one line per benchmark: the frameworks report every fit."""
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning|lightning_fabric|torch")


def now() -> str:
    return datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def stored(results: Path) -> list[dict]:
    """Every stored result, in the benchmarks' order, then the GPU check's (``bench.gpu_check``)."""
    files = [results / f"{name}.json" for name in (*BENCHMARKS, "gpu_check")]
    return [json.loads(f.read_text()) for f in files if f.is_file()]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from bench.machine import describe, load_average
    from bench.report import render
    from bench.timing import stopwatch
    from bench.workspace import FULL, QUICK, Workspace

    quiet()
    sizes = QUICK if args.quick else FULL
    results = args.out / RESULTS
    results.mkdir(parents=True, exist_ok=True)
    machine, started = describe(), now()
    with tempfile.TemporaryDirectory(prefix="lmo-bench-") as tmp:
        workspace = Workspace(sizes, Path(tmp))
        for name in args.only or BENCHMARKS:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            load = load_average()
            module = importlib.import_module(f"bench.{name}")
            section, seconds = stopwatch(lambda module=module: module.run(workspace))
            record = {
                "name": name,
                **asdict(section),
                "date": now(),
                "run": started,
                "quick": sizes.quick,
                "seconds": seconds,
                "load": load,
                "machine": machine,
            }
            (results / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
            text = render(stored(results), machine, started, PROFILING_LOG.read_text())
            (args.out / "BENCHMARKS.md").write_text(text)
            print(f"[bench] {name}: {seconds:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
