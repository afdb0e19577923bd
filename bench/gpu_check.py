"""``python -m bench.gpu_check [--quick] [--out DIR] [--json FILE]``: the GPU check, one run.

First the smoke list (does the project run right on this device?): a 2-epoch fit with the
frozen-backbone warm-up, 2-process DDP replica equality, YOLO-tiny's host-device syncs per
training step, and CNN predictions agreeing across ``.ckpt``, ``.onnx`` and MLflow ``runs:/``.
Then speed: the matmul peak of every native precision, resnet18 and efficientnet_b0 through
the project's Lightning path (augmented on CPU workers or on the device, eager or with
``model.compile``) vs a compute-only loop (eager and ``torch.compile``d), the loader with device
augmentation, and YOLOv3 at 416 px, each training rate against the peak of its own precision.

On a CUDA device the results become the GPU section of ``DIR/BENCHMARKS.md`` (sized for at
most 8 minutes on one GPU); elsewhere nothing is written there. ``--quick`` runs tiny sizes
(well under a minute on a CPU) and is what the fast tests run. Each check imports what it
needs when it runs: a package the machine lacks (MLflow, Hydra, albumentations) skips the
checks that need it, with the reason, and every other check still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench.ceiling import PEAK_OF, TRAINING_FACTOR, matmul_gflops, native_precisions, synchronizer
from bench.report import Section, fmt, pct, verdict
from bench.timing import BatchClock

REPO = Path(__file__).resolve().parents[1]
DDP_SCRIPT = REPO / "tests/ddp_run.py"  # the replica-equality run of tests/test_ddp.py
TITLE = "GPU check"
PARITY_TOLERANCE = 1e-4
SYNC_LIMIT = 5  # host-device syncs a YOLO training step may make ("a handful")
ROOFLINE_TARGET = 40.0  # percent of the bf16 matmul peak for resnet18 at 224 px on a GPU
OVERHEAD_TARGET = 5.0  # percent: the project's path against the compute-only loop
FEED_TARGET = 3.0  # the device-augmentation loader against the fastest training rate
CNNS = ("resnet18", "efficientnet_b0")


@dataclass(frozen=True)
class Sizes:
    """How much each check does."""

    quick: bool
    image_size: int  # CNN smoke and speed size
    synthetic: dict[str, int]  # SyntheticSpec fields of the data behind the fit and loader
    smoke_batch: int
    speed_batch: int
    warmup: int  # batches before a clock measures
    budget_s: float  # seconds a clock measures
    yolo: tuple[tuple[str, int], ...]  # (variant, batch) timed at yolo_size
    yolo_size: int
    compile_backend: str  # "eager" captures graphs only: inductor takes minutes on a CPU


FULL = Sizes(
    quick=False,
    image_size=224,
    synthetic={"cells_per_subject": 40},  # about 1,500 images
    smoke_batch=32,
    speed_batch=128,
    warmup=3,
    budget_s=10.0,
    yolo=(("yolov3_tiny", 64), ("yolov3", 16)),
    yolo_size=416,
    compile_backend="inductor",
)
QUICK = Sizes(
    quick=True,
    image_size=32,
    synthetic={"n_train_subjects": 8, "n_prelim_subjects": 4, "cells_per_subject": 3},
    smoke_batch=8,
    speed_batch=4,
    warmup=1,
    budget_s=0.3,
    yolo=(("yolov3_tiny", 2),),
    yolo_size=64,
    compile_backend="eager",
)


@dataclass
class Outcome:
    """One check's result: ``passed`` is None for a measurement or a skipped check."""

    passed: bool | None
    result: str
    raw: dict[str, Any] = field(default_factory=dict)
    name: str = ""  # the check's, set by :func:`attempt`
    seconds: float = 0.0


class Run:
    """The device, sizes and scratch folder of a run, and what one check hands to the next."""

    def __init__(self, sizes: Sizes, root: Path):
        self.sizes, self.root = sizes, root
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.accelerator = "gpu" if self.device == "cuda" else "cpu"
        self.sync = synchronizer(self.device)
        self.shared: dict[str, Any] = {}
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once

    def clock(self) -> BatchClock:
        return BatchClock(self.sizes.warmup, self.sizes.budget_s)

    def workers(self) -> int:
        return 0 if self.sizes.quick else min(8, os.cpu_count() or 1)

    def prepared(self) -> Path:
        """A synthetic C-NMC prepare cache at the run's image size, made once."""
        if "prepared" not in self.shared:
            from leukemia_mlops.data.prepare import PrepareSpec, prepare_dataset
            from leukemia_mlops.data.splits import SplitSpec
            from leukemia_mlops.data.synthetic import SyntheticSpec, generate_cnmc

            raw, out = self.root / "raw", self.root / "prepared"
            spec = replace(SyntheticSpec(n_final_images=0), **self.sizes.synthetic)
            generate_cnmc(raw, spec, workers=max(1, self.workers()))
            prepare = PrepareSpec(image_size=self.sizes.image_size, workers=max(1, self.workers()))
            prepare_dataset(raw, out, prepare, SplitSpec(), progress=False)
            self.shared["prepared"] = out
        return self.shared["prepared"]

    def precision(self) -> str:
        from leukemia_mlops.training.mixed_precision import resolve_precision

        return resolve_precision("auto", self.accelerator)


# --- the smoke list -------------------------------------------------------------------------


def check_fit(run: Run) -> Outcome:
    """2 epochs, the first with the backbone frozen: it must stay put, then move."""
    import pytorch_lightning as pl

    from leukemia_mlops.data.datamodule import CellDataModule
    from leukemia_mlops.models.classifier import CellClassifier
    from leukemia_mlops.training.callbacks import BackboneWarmup, EpochSeed

    class BackboneMoves(pl.Callback):
        """How far the backbone's weights moved from the start, at each epoch end."""

        def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            self.start = [p.detach().clone() for p in module.backbone.parameters()]
            self.moved: list[float] = []

        def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            pairs = zip(module.backbone.parameters(), self.start, strict=True)
            self.moved.append(sum(float((a.detach() - b).abs().sum()) for a, b in pairs))

    pl.seed_everything(0, verbose=False)
    precision = run.precision()
    module = CellClassifier(backbone="resnet18", warmup_epochs=1)
    probe = BackboneMoves()
    trainer = pl.Trainer(
        accelerator=run.accelerator,
        devices=1,
        precision=precision,
        max_epochs=2,
        callbacks=[BackboneWarmup(1), EpochSeed(0), probe],
        **QUIET,
    )
    data = CellDataModule(str(run.prepared()), run.sizes.smoke_batch, num_workers=run.workers())
    trainer.fit(module, datamodule=data)
    checkpoint = run.root / "fit.ckpt"
    trainer.save_checkpoint(checkpoint)
    run.shared["checkpoint"] = checkpoint
    frozen, thawed = probe.moved[0] == 0.0, probe.moved[1] > 0.0
    f1 = float(trainer.callback_metrics.get("val/f1_weighted", float("nan")))
    return Outcome(
        frozen and thawed and trainer.current_epoch == 2,
        f"precision {precision}; backbone {'frozen' if frozen else 'MOVED'} in epoch 0, "
        f"{'moved' if thawed else 'STILL FROZEN'} in epoch 1; val F1 {f1:.3f}",
        raw={"precision": precision, "backbone_moved": probe.moved, "val_f1": f1},
    )


QUIET = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def check_ddp(run: Run) -> Outcome:
    """2 ranks through the warm-up and the thaw: every parameter bit-identical at each epoch."""
    gpus = torch.cuda.device_count() if run.device == "cuda" else 0
    accelerator, how = ("gpu", "2 GPUs (NCCL)") if gpus >= 2 else ("cpu", "2 CPU processes (gloo)")
    out = run.root / "ddp"
    out.mkdir()
    command = [sys.executable, str(DDP_SCRIPT), "fit", f"--prepared={run.prepared()}"]
    command += [f"--out={out}", "--devices=2", "--epochs=2", f"--accelerator={accelerator}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    if done.returncode != 0:
        return Outcome(False, f"{how}: " + done.stderr[-500:])
    records = json.loads((out / "digests.json").read_text())
    unequal = [
        record["when"]
        for record in records
        if record["ranks"][0]["params"] != record["ranks"][1]["params"]
    ]
    moments = ", ".join(record["when"] for record in records)
    return Outcome(
        not unequal and len(records) == 3,
        f"{how}: ranks {'differ at ' + ', '.join(unequal) if unequal else 'bit-identical'} "
        f"({moments})",
        raw={"how": how, "unequal": unequal, "records": len(records)},
    )


def check_train_stage(run: Run) -> Outcome:
    """The DVC ``train`` stage command under DDP: rank 0 writes, every rank exits cleanly."""
    from leukemia_mlops.config import compose, write_params

    gpus = torch.cuda.device_count() if run.device == "cuda" else 0
    trainer, how = ("trainer=ddp", "2 GPUs") if gpus >= 2 else ("trainer=ddp_cpu", "2 CPU ranks")
    stage = run.root / "stage"
    stage.mkdir()
    overrides = [
        trainer,
        "trainer.devices=2",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        f"paths.prepared_dir={run.prepared()}",
        f"paths.mlruns_dir={stage / 'mlruns'}",
        f"paths.models_dir={stage / 'models'}",
        f"paths.reports_dir={stage / 'reports'}",
        f"data.prepare.image_size={run.sizes.image_size}",
        f"datamodule.batch_size={run.sizes.smoke_batch}",
        "datamodule.num_workers=0",
        "logger.mlflow.log_model=false",
    ]
    write_params(compose(overrides), stage / "params.yaml")
    command = [sys.executable, "-m", "leukemia_mlops.cli.train", "--params", "params.yaml"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    done = subprocess.run(command, cwd=stage, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        return Outcome(False, f"{how}: exit {done.returncode}: " + done.stderr[-500:])
    state = json.loads((stage / "models/model/run.json").read_text())
    reported = (stage / "reports/train_model.json").is_file()
    finished = state["status"] == "finished" and reported
    return Outcome(
        finished,
        f"{how}: run.json {state['status']}, reports {'written' if reported else 'MISSING'}",
        raw={"how": how, "status": state["status"], "reports": reported},
    )


def yolo_batch(img_size: int, batch: int, device: str) -> tuple[torch.Tensor, list[dict]]:
    """Images with one ALL cell box each, on ``device``."""
    box = torch.tensor([[0.3, 0.25, 0.7, 0.7]], device=device) * img_size
    target = {"boxes": box, "labels": torch.tensor([1], device=device)}
    return torch.rand(batch, 3, img_size, img_size, device=device), [target] * batch


def check_yolo_syncs(run: Run) -> Outcome:
    """One YOLO-tiny training step on the device; on CUDA, the syncs it makes are counted."""
    from leukemia_mlops.models.yolo import build

    size = run.sizes.yolo_size
    config = {"variant": "yolov3_tiny", "num_classes": 2, "img_size": size}
    model, criterion = build(config)
    model = model.to(run.device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, targets = yolo_batch(size, 2, run.device)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = criterion(model(images.contiguous(memory_format=torch.channels_last)), targets)
        loss.backward()
        optimizer.step()
        return loss

    step()  # first-call setup (cuDNN plans, allocator) is not the step's own
    if run.device != "cuda":
        loss = float(step())
        return Outcome(
            None,
            f"loss {loss:.3f}; syncs not counted without CUDA "
            "(tests/test_yolo_device.py counts the sync ops on a CPU)",
            raw={"loss": loss},
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            loss = step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return Outcome(
        syncs <= SYNC_LIMIT,
        f"{syncs} host-device syncs in one training step at {size} px (limit {SYNC_LIMIT}); "
        f"loss {float(loss):.3f}",
        raw={"syncs": syncs},
    )


def check_parity(run: Run) -> Outcome:
    """The fit's checkpoint scored as ``.ckpt``, ``.onnx`` and ``runs:/``: same probabilities."""
    from leukemia_mlops.inference.export import export_onnx, parity_images
    from leukemia_mlops.inference.loading import load_module, load_scorer

    checkpoint, size = run.shared["checkpoint"], run.sizes.image_size
    images = parity_images(None, size, 16)
    reference = load_scorer(checkpoint)(images)
    onnx = run.root / "model.onnx"
    export_onnx(checkpoint, onnx, size, n_images=4)
    diffs = {".onnx": float(abs(load_scorer(onnx)(images) - reference).max())}
    try:
        uri = mlflow_model(run, load_module(checkpoint).net, size)
    except ModuleNotFoundError as err:
        skipped = f"; runs:/ skipped ({err.name} not importable)"
    else:
        tracking = f"sqlite:///{run.root / 'mlflow.db'}"
        diffs["runs:/"] = float(abs(load_scorer(uri, tracking)(images) - reference).max())
        skipped = ""
    within = all(diff <= PARITY_TOLERANCE for diff in diffs.values())
    shown = ", ".join(f"{name} {diff:.1e}" for name, diff in diffs.items())
    return Outcome(
        within,
        f"largest probability difference from .ckpt on {run.device}: {shown} "
        f"(tolerance {PARITY_TOLERANCE:.0e}){skipped}",
        raw={"max_abs_diff": diffs},
    )


def mlflow_model(run: Run, net: torch.nn.Module, size: int) -> str:
    """``net`` logged as the project logs models, into a store under the run's folder."""
    from mlflow import MlflowClient

    from leukemia_mlops.tracking.model_logging import log_classifier

    uri = f"sqlite:///{run.root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("gpu-check", str(run.root / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow's notes on environments and pickles
        log_classifier(uri, run_id, net, size)
    return f"runs:/{run_id}/model"


SMOKE = {
    "2-epoch fit with warm-up": check_fit,
    "DDP replica equality": check_ddp,
    "DVC train stage under DDP": check_train_stage,
    "YOLO-tiny step syncs": check_yolo_syncs,
    "predictions .ckpt / .onnx / runs:/": check_parity,
}


# --- speed ----------------------------------------------------------------------------------


def check_peaks(run: Run) -> Outcome:
    """``torch.mm`` GFLOP/s in every precision the device runs natively."""
    budget = run.sizes.budget_s / 2
    peaks = {
        p: matmul_gflops(p, run.device, run.sizes.warmup, budget)
        for p in native_precisions(run.device)
    }
    run.shared["peaks"] = peaks
    shown = ", ".join(f"{p} {gflops:,.0f}" for p, gflops in peaks.items())
    return Outcome(None, f"GFLOP/s: {shown}", raw=peaks)


def of_peak(run: Run, precision: str, gflop_per_s: float) -> float | None:
    """Fraction of the matmul peak of ``precision``'s own kind (None: not measured here)."""
    peak = run.shared.get("peaks", {}).get(PEAK_OF.get(precision, precision))
    return gflop_per_s / peak if peak else None


def compute_only_rate(run: Run, backbone: str, precision: str, compiled: bool) -> float:
    """Training images/s with batches already on the device (:mod:`bench.compute_only`)."""
    from bench.compute_only import compute_only_rate as rate

    backend = run.sizes.compile_backend if compiled else None
    size, batch = run.sizes.image_size, run.sizes.speed_batch
    return rate(backbone, precision, run.device, size, batch, run.clock(), run.sync, backend).per_s


def project_rate(
    run: Run, backbone: str, precision: str, augment_on: str = "cpu", compiled: bool = False
) -> float:
    """Training images/s of ``Trainer.fit`` on the prepare cache, augmented on CPU workers or
    on the device, the network eager or compiled (``model.compile``)."""
    import pytorch_lightning as pl

    from bench.clock import ClockCallback
    from leukemia_mlops.data.datamodule import CellDataModule
    from leukemia_mlops.models.classifier import CellClassifier

    clock = run.clock()
    trainer = pl.Trainer(
        accelerator=run.accelerator,
        devices=1,
        precision=precision,
        max_epochs=10**6,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[ClockCallback(clock, run.sync)],
        **QUIET,
    )
    data = CellDataModule(
        str(run.prepared()),
        run.sizes.speed_batch,
        num_workers=run.workers(),
        pin_memory=run.device == "cuda",
        augment_on=augment_on,
    )
    module = CellClassifier(
        backbone=backbone,
        warmup_epochs=0,
        compile=compiled,
        compile_backend=run.sizes.compile_backend,
    )
    trainer.fit(module, datamodule=data)
    return clock.rate().per_s


def check_training(run: Run, backbone: str) -> Outcome:
    """The project's path vs the compute-only loop, eager and compiled, as share of the peak."""
    from leukemia_mlops.models.backbones import build_classifier
    from leukemia_mlops.models.yolo import count_flops

    precision = run.precision()
    size = run.sizes.image_size
    gflop = TRAINING_FACTOR * count_flops(build_classifier(backbone), size) / 1e9
    compiled = f"compiled ({run.sizes.compile_backend})"
    rates = {
        "project": project_rate(run, backbone, precision),
        "project, device augmentation": project_rate(run, backbone, precision, "device"),
        f"project, {compiled}": project_rate(run, backbone, precision, compiled=True),
        "compute-only": compute_only_rate(run, backbone, precision, compiled=False),
        f"compute-only, {compiled}": compute_only_rate(run, backbone, precision, compiled=True),
    }
    shares = {loop: of_peak(run, precision, gflop * rate) for loop, rate in rates.items()}
    run.shared.setdefault("training", {})[backbone] = rates
    shown = "; ".join(
        f"{loop} {fmt(rate)} img/s" + (f" ({pct(shares[loop])} of peak)" if shares[loop] else "")
        for loop, rate in rates.items()
    )
    return Outcome(
        None,
        f"{size} px, {precision}, channels-last, batch {run.sizes.speed_batch}: {shown}",
        raw={
            "precision": precision,
            "peak": PEAK_OF.get(precision, precision),
            "gflop_per_image": gflop,
            "img_per_s": rates,
            "of_peak": shares,
        },
    )


def check_yolo_speed(run: Run) -> Outcome:
    """YOLOv3 training and inference images/s at the YOLO size."""
    from bench.yolo import yolo_rates

    clock = partial(BatchClock, run.sizes.warmup, run.sizes.budget_s)
    rates = {
        variant: yolo_rates(variant, run.sizes.yolo_size, batch, run.device, clock)
        for variant, batch in run.sizes.yolo
    }
    shown = "; ".join(f"{v} train {fmt(t)} / infer {fmt(i)} img/s" for v, (t, i) in rates.items())
    return Outcome(None, f"at {run.sizes.yolo_size} px: {shown}", raw=rates)


def check_feed(run: Run) -> Outcome:
    """The loader shipping uint8 batches for device augmentation, and that augmentation on the
    device, against the fastest project training rate measured before."""
    from bench.feed import augment_rate, loader_capacity

    size, batch = run.sizes.image_size, run.sizes.speed_batch
    loader = loader_capacity(run.prepared(), batch, "device", run.workers(), run.clock()).per_s
    augment = augment_rate(size, batch, run.device, run.clock(), run.sync).per_s
    training = max(
        (rates["project"] for rates in run.shared.get("training", {}).values()), default=None
    )
    versus = f"; {loader / training:.1f}x the fastest training" if training else ""
    return Outcome(
        None,
        f"{size} px, batch {batch}: loader {fmt(loader)} img/s with {run.workers()} workers"
        f"{versus}; augmentation on {run.device} {fmt(augment)} img/s",
        raw={"loader": loader, "augment": augment, "training": training, "workers": run.workers()},
    )


SPEED: dict[str, Callable[[Run], Outcome]] = {
    "matmul peaks": check_peaks,
    **{f"{b} training": partial(check_training, backbone=b) for b in CNNS},
    "loader, device augmentation": check_feed,
    "YOLOv3 speed": check_yolo_speed,
}


# --- running and reporting ------------------------------------------------------------------


def attempt(name: str, check: Callable[[Run], Outcome], run: Run) -> Outcome:
    """``check(run)``, timed; a missing package skips it, any other error fails it."""
    started = time.perf_counter()
    try:
        outcome = check(run)
    except ModuleNotFoundError as err:
        outcome = Outcome(None, f"skipped: {err.name} is not importable here")
    except Exception as err:  # a broken check must not hide the others' results
        traceback.print_exc()
        outcome = Outcome(False, f"error: {type(err).__name__}: {err}"[:500])
    return replace(outcome, name=name, seconds=time.perf_counter() - started)


def verdicts(outcomes: list[Outcome], device: str) -> list[str]:
    """The issue's targets against this run's figures."""
    lines = []
    for outcome in outcomes:
        if outcome.raw.get("training"):
            label = f"{outcome.name}: loader vs the fastest training"
            lines.append(
                verdict(label, outcome.raw["loader"] / outcome.raw["training"], FEED_TARGET)
            )
        rates = outcome.raw.get("img_per_s")
        if not rates:
            continue
        overhead = 100 * (rates["compute-only"] / rates["project"] - 1)
        label = f"{outcome.name}: project's extra time vs compute-only"
        lines.append(verdict(label, overhead, OVERHEAD_TARGET, "%", below=True))
        share = outcome.raw["of_peak"]["project"]
        if device == "cuda" and outcome.name.startswith("resnet18") and share is not None:
            label = f"{outcome.name}: project's share of the {outcome.raw['peak']} peak"
            lines.append(verdict(label, 100 * share, ROOFLINE_TARGET, "%"))
    return lines


def section(outcomes: list[Outcome], run: Run) -> Section:
    name = torch.cuda.get_device_name() if run.device == "cuda" else "CPU"
    return Section(
        f"{TITLE}: {name}",
        f"`python -m bench.gpu_check{' --quick' if run.sizes.quick else ''}` on {name} "
        f"(torch {torch.__version__}). Smoke checks first (a known answer each), then speed: "
        "training rates through the project's Lightning path (prepare cache, augmentation on "
        f"{run.workers()} CPU workers) and a compute-only loop (batches already on the device), "
        "each against the matmul peak of its own precision.",
        ["check", "passed", "result", "seconds"],
        [[o.name, "" if o.passed is None else o.passed, o.result, o.seconds] for o in outcomes],
        verdicts(outcomes, run.device),
        {o.name: o.raw for o in outcomes},
    )


def write_benchmarks(sec: Section, out: Path, quick: bool, seconds: float) -> None:
    """Store the section as ``bench/results/gpu_check.json`` and rebuild ``BENCHMARKS.md``."""
    from bench.machine import describe, load_average
    from bench.report import render
    from bench.run import PROFILING_LOG, RESULTS, now, stored

    results = out / RESULTS
    results.mkdir(parents=True, exist_ok=True)
    machine = describe()
    record = {
        "name": "gpu_check",
        **asdict(sec),
        "date": now(),
        "quick": quick,
        "seconds": seconds,
        "load": load_average(),
        "machine": machine,
    }
    (results / "gpu_check.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    text = render(stored(results), machine, now(), PROFILING_LOG.read_text())
    (out / "BENCHMARKS.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, well under a minute")
    parser.add_argument("--out", type=Path, default=REPO, help="where BENCHMARKS.md goes (CUDA)")
    parser.add_argument("--json", type=Path, help="also write every check's outcome here")
    args = parser.parse_args(argv)
    from bench.run import quiet

    quiet()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmo-gpu-check-") as tmp:
        run = Run(QUICK if args.quick else FULL, Path(tmp))
        outcomes = []
        for name, check in {**SMOKE, **SPEED}.items():
            outcomes.append(attempt(name, check, run))
            last = outcomes[-1]
            print(f"[gpu-check] {last.name}: {last.passed} | {last.result}", flush=True)
    sec = section(outcomes, run)
    if args.json:
        args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=2, default=str))
    if run.device == "cuda":
        write_benchmarks(sec, args.out, args.quick, time.perf_counter() - started)
    return 1 if any(o.passed is False for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
