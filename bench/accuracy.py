"""Does bf16 mixed precision cost accuracy? A short resnet18 training in bf16 vs fp32."""

from __future__ import annotations

import pandas as pd

from bench.report import Section, fmt
from bench.timing import stopwatch
from bench.workspace import Workspace
from leukemia_mlops.data.prepare import MANIFEST_FILE
from leukemia_mlops.models.metrics import MONITOR
from leukemia_mlops.training.mixed_precision import cpu_has_bf16
from leukemia_mlops.training.run import run_training

TITLE = "bf16 vs fp32: validation weighted F1"
PRECISIONS = ("32-true", "bf16-mixed")


def run(ws: Workspace) -> Section:
    size, epochs = ws.sizes.accuracy_size, ws.sizes.accuracy_epochs
    prepared = ws.prepared(ws.synthetic_spec(ws.sizes.accuracy_images), size)
    splits = pd.read_parquet(prepared / MANIFEST_FILE)["split"].value_counts()
    rows, scores = [], {}
    for precision in PRECISIONS:
        run_dir = ws.root / f"accuracy-{precision}"
        cfg = ws.config(
            prepared,
            size,
            f"trainer.precision={precision}",
            f"trainer.max_epochs={epochs}",
            "model.warmup_epochs=0",
            "logger.mlflow.log_model=false",
        )
        best, seconds = stopwatch(lambda cfg=cfg, run_dir=run_dir: run_training(cfg, run_dir))
        last = float(pd.read_csv(run_dir / "history.csv")[MONITOR].iloc[-1])
        scores[precision] = {"best": best, "last": last, "seconds": seconds}
        rows.append([precision, best, last, seconds])
    diff = scores["bf16-mixed"]["best"] - scores["32-true"]["best"]
    one_image = 1 / max(int(splits.get("val", 0)), 1)
    return Section(
        TITLE,
        f"resnet18 from scratch, {epochs} epochs (backbone never frozen) on "
        f"{splits.get('train', 0)} training / {splits.get('val', 0)} validation synthetic "
        f"images at {size} px, same data, seed and config except `trainer.precision`, through "
        "`run_training`.",
        ["precision", "best val F1 (weighted)", "last-epoch val F1", "seconds"],
        rows,
        [
            f"bf16 - fp32 best val F1: {diff:+.3f} (no target; one validation image moves F1 by "
            f"about {fmt(one_image)}, so differences of that order are noise).",
            f"bf16 took {fmt(scores['bf16-mixed']['seconds'] / scores['32-true']['seconds'])}x "
            f"the fp32 time (native bf16: {'yes' if cpu_has_bf16() else 'no, emulated'}).",
        ],
        scores,
    )
