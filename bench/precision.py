"""resnet18 training speed by precision and memory layout, and what the project picks.

bf16 only pays where the CPU computes it natively (AVX512-BF16, AMX); elsewhere it is
emulated and slow, which is why ``precision: auto`` resolves per machine.
"""

from __future__ import annotations

from bench.loops import layout_name, model_overrides, train_rate
from bench.machine import cpu_flags
from bench.report import Section, fmt, verdict
from bench.timing import Rate
from bench.workspace import Workspace
from leukemia_mlops.training.mixed_precision import cpu_has_bf16, resolve_precision

TITLE = "Training precision and layout: resnet18"
SPEEDUP_TARGET = 3.0
#: Percent: the project's extra time per image against the fastest plain variant.
OVERHEAD_TARGET = 5.0
#: (precision, channels_last) of the plain-loop rows, the first being the baseline.
VARIANTS = (("32-true", False), ("32-true", True), ("bf16-mixed", False), ("bf16-mixed", True))


def sweep_overrides(ws: Workspace) -> list[str]:
    """resnet18 at the sweep's size and batch."""
    size = ws.sizes.sweep_size
    return [*model_overrides("resnet18", size), f"datamodule.batch_size={ws.sizes.sweep_batch}"]


def project_sweep_rate(ws: Workspace) -> Rate:
    """The project's resnet18 speed (Lightning, ``auto`` precision) at the sweep's size."""
    return train_rate(ws, "lightning", ws.sizes.sweep_size, *sweep_overrides(ws))


def run(ws: Workspace) -> Section:
    size, batch = ws.sizes.sweep_size, ws.sizes.sweep_batch
    plain = {
        (precision, cl): train_rate(
            ws,
            "plain",
            size,
            *sweep_overrides(ws),
            f"trainer.precision={precision}",
            f"model.channels_last={str(cl).lower()}",
        )
        for precision, cl in VARIANTS
    }
    baseline = plain[VARIANTS[0]].per_s
    rows = [
        ["plain", precision, layout_name(cl), rate.per_s, rate.per_s / baseline]
        for (precision, cl), rate in plain.items()
    ]
    auto = resolve_precision("auto", "cpu")
    project = project_sweep_rate(ws)
    ratio = project.per_s / baseline
    rows.append(
        [
            "Lightning (project)",
            f"auto: {auto}",
            layout_name(ws.defaults.model.channels_last),
            project.per_s,
            ratio,
        ]
    )
    best = max(plain, key=lambda key: plain[key].per_s)
    readings = [
        f"native bf16 on this CPU: {'yes' if cpu_has_bf16() else 'no'} (CPU flags: {cpu_flags()}); "
        f"`resolve_precision('auto', 'cpu')` picks **{auto}**; the fastest plain row is "
        f"{best[0]} {layout_name(best[1])}.",
        verdict("project vs plain fp32", ratio, SPEEDUP_TARGET)
        if cpu_has_bf16()
        else f"project vs plain fp32: {fmt(ratio)}x; the 3x target applies only where bf16 "
        "is native, so it does not apply here (emulated bf16 would be slower, as the bf16 "
        "rows show, and `auto` rightly keeps fp32).",
        verdict(
            f"project's extra time per image vs the fastest plain variant ({best[0]} "
            f"{layout_name(best[1])}, the same loader)",
            100 * (plain[best].per_s / project.per_s - 1),
            OVERHEAD_TARGET,
            unit="%",
            below=True,
        ),
    ]
    raw = {f"plain {p} cl={cl}": rate.as_dict() for (p, cl), rate in plain.items()}
    raw["lightning auto"] = {**project.as_dict(), "precision": auto}
    return Section(
        TITLE,
        f"resnet18 training images/s at {size} px, batch {batch}, through the plain loop in "
        "each precision and layout (bf16-mixed = `torch.autocast` bf16 around forward and "
        "loss, as Lightning's `bf16-mixed` does), and through the project's Lightning path "
        "with `precision: auto`. Same loader, cache and timing as the training benchmark.",
        ["loop", "precision", "layout", "img/s", "vs plain fp32"],
        rows,
        readings,
        raw,
    )
