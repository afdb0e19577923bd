"""Training speed through the project's Lightning path vs a plain PyTorch loop.

Both run the configured model, loader, precision and memory layout on the same cache; the
difference is the framework's cost. Phase shares come from timing hooks (see ``loops``).
"""

from __future__ import annotations

from bench.loops import compared_rates, layout_name, model_overrides, precision_of
from bench.report import Section, pct, verdict
from bench.timing import Rate
from bench.workspace import Workspace

TITLE = "Training: project (Lightning) vs plain PyTorch loop"
MODELS = ("resnet18", "efficientnet_b0", "yolov3_tiny")
OVERHEAD_TARGET = 5.0  # percent
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
        rates = compared_rates(ws, size, *overrides)
        overhead = 100 * (rates["plain"].per_s / rates["lightning"].per_s - 1)
        for loop, rate in rates.items():
            shown = pct(overhead / 100) if loop == "lightning" else "baseline"
            rows.append(
                [model, loop, precision_of(cfg), layout, rate.per_s, *phase_cells(rate), shown]
            )
        readings.append(
            verdict(f"{model}: Lightning time overhead", overhead, OVERHEAD_TARGET, "%", True)
            + f"; outside forward/backward: {phase_cells(rates['lightning'])[-1]} (Lightning),"
            f" {phase_cells(rates['plain'])[-1]} (plain)"
        )
        raw[model] = {loop: rate.as_dict() for loop, rate in rates.items()}
        raw[model]["overhead_pct"] = overhead
    batch = int(ws.defaults.datamodule.batch_size)
    return Section(
        TITLE,
        f"Training images/s at {size} px, batch {batch}, the configured precision and layout, on "
        f"the prepare cache through the configured loader ({ws.defaults.datamodule.num_workers} "
        "workers, augmentation on). *Lightning*: `Trainer.fit` of the project's module (no "
        "validation, logger or checkpoints); *plain*: a hand-written loop over the same "
        "`module.net`, loader and optimizer. The two alternate in four rounds of a quarter of the "
        "budget each, and each loop's faster round counts. Batches are timed after warm-up; "
        "the phase columns are shares of wall time (timing hooks); *other* is waiting for data, "
        "the loss, metrics and framework code. Overhead = extra wall time per image vs plain.",
        [
            "model",
            "loop",
            "precision",
            "layout",
            "img/s",
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
