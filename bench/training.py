"""Training speed through the project's Lightning path (stripped, and as a user runs it) vs a
plain PyTorch loop.

All run the configured model, loader, precision and memory layout on the same cache; the
difference is the framework's cost. Phase shares come from timing hooks (see ``loops``).
"""

from __future__ import annotations

from bench.loops import (
    compared_rates,
    layout_name,
    median_per_s,
    median_round,
    model_overrides,
    paired_overhead,
    precision_of,
)
from bench.report import Section, pct, spread, verdict
from bench.timing import Rate
from bench.workspace import Workspace

TITLE = "Training: project (Lightning) vs plain PyTorch loop"
#: resnet18 only: five 20 s rounds of three loops fill five minutes of the run (the other
#: models' speeds are in the precision, ceiling and YOLO sections).
MODELS = ("resnet18",)
OVERHEAD_TARGET = 5.0  # percent, of the stripped path
LOOP_NAMES = {
    "plain": "plain loop",
    "lightning": "Lightning, stripped",
    "lightning_full": "Lightning, as run (val, checkpoints, MLflow)",
}
PHASES = ("forward", "backward", "optimizer")


def phase_cells(rate: Rate) -> list[str]:
    """Shares of wall time: forward, backward, optimizer step, everything else, outside f/b."""
    shares = [rate.share(phase) for phase in PHASES]
    return [pct(s) for s in shares] + [pct(1 - sum(shares)), pct(1 - sum(shares[:2]))]


def run(ws: Workspace) -> Section:
    size = ws.image_size
    prepared = ws.prepared(ws.train_spec, size)
    rows, readings, raw = [], [], {}
    for model in MODELS:
        overrides = model_overrides(model, size)
        cfg = ws.config(prepared, size, *overrides)
        layout = layout_name(cfg.model.get("channels_last", False))
        rounds = compared_rates(ws, size, *overrides)
        overheads = {loop: paired_overhead(r, rounds["plain"]) for loop, r in rounds.items()}
        for loop, rates in rounds.items():
            per_s = [rate.per_s for rate in rates]
            rows.append(
                [
                    model,
                    LOOP_NAMES[loop],
                    precision_of(cfg),
                    layout,
                    spread(median_per_s(rates), min(per_s), max(per_s)),
                    *phase_cells(median_round(rates)),
                    "baseline" if loop == "plain" else pct(overheads[loop] / 100),
                ]
            )
        readings += [
            verdict(
                f"{model}: stripped Lightning time overhead",
                overheads["lightning"],
                OVERHEAD_TARGET,
                "%",
                True,
            ),
            f"{model}: Lightning as a user runs it costs {pct(overheads['lightning_full'] / 100)} "
            "more time per image than the plain loop (validation, checkpoints and logging "
            "included; no target).",
        ]
        raw[model] = {
            loop: {"rounds": [rate.as_dict() for rate in rates]} for loop, rates in rounds.items()
        }
        raw[model]["overhead_pct"] = overheads
    batch = int(ws.defaults.datamodule.batch_size)
    return Section(
        TITLE,
        f"Training images/s at {size} px, batch {batch}, the configured precision and layout, on "
        f"the prepare cache through the configured loader ({ws.defaults.datamodule.num_workers} "
        "workers, augmentation on), all in one process. *plain*: a hand-written loop over the "
        "same `module.net`, loader and optimizer; *Lightning, stripped*: `Trainer.fit` of the "
        "project's module with no validation, logger or checkpoints; *Lightning, as run*: the "
        "same with a validation after every epoch, best and last checkpoints and metrics "
        f"logged to MLflow. The three alternate in {ws.sizes.loop_rounds} rounds of at least "
        f"{ws.sizes.loop_round_s:g} s each (a round of the full path also spans a whole epoch "
        "and its validation); img/s is the median round (lowest-highest). Batches are timed "
        "after warm-up; the phase columns (median round) are shares of wall time (timing "
        "hooks); *other* is waiting for data, the loss, metrics, validation and framework "
        "code. Overhead = extra wall time per image vs plain: the median over rounds of each "
        "round's ratio (the loops of a round run back to back).",
        [
            "model",
            "loop",
            "precision",
            "layout",
            "img/s median (min-max)",
            "forward",
            "backward",
            "optimizer step",
            "other",
            "outside fwd/bwd",
            "overhead",
        ],
        rows,
        readings,
        raw,
    )
