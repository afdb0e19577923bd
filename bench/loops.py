"""Training through the project's Lightning path and through a plain PyTorch loop, timed alike.

Both build the datamodule and module the way ``run_training`` does (same loader, network,
optimizer, precision and memory layout); the plain loop then drives ``module.net`` itself, so
the difference between the two is what Lightning and the module's extras (metrics, hooks) cost.
Lightning runs stripped (no validation, logger or checkpoints) and as a user runs it (a
validation every epoch, best and last checkpoints, MLflow logging).
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import MLFlowLogger

from bench.clock import ClockCallback
from bench.timing import BatchClock, Rate, endless
from bench.workspace import Workspace
from leukemia_mlops.models.detector import YoloDetector
from leukemia_mlops.models.metrics import MONITOR
from leukemia_mlops.training.mixed_precision import resolve_precision
from leukemia_mlops.training.run import build_data_and_module

PRECISIONS = ("32-true", "bf16-mixed")
#: Trainer settings of the stripped Lightning path: training steps only.
STRIPPED = {
    "logger": False,
    "enable_checkpointing": False,
    "limit_val_batches": 0,
    "num_sanity_val_steps": 0,
}


def model_overrides(model: str, image_size: int) -> list[str]:
    """Select ``model`` at ``image_size`` (the YOLO input size is a model setting)."""
    family = "yolo" if model.startswith("yolo") else "cnn"
    return [f"model={model}"] + ([f"model.img_size={image_size}"] if family == "yolo" else [])


def layout_name(channels_last: bool) -> str:
    return "channels-last" if channels_last else "NCHW"


def precision_of(cfg: DictConfig) -> str:
    precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    if precision not in PRECISIONS:
        raise ValueError(f"the benchmarks time {PRECISIONS} on the CPU, not {precision!r}")
    return precision


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule]:
    """Seeded datamodule and module, exactly as ``run_training`` builds them."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    return build_data_and_module(cfg, OmegaConf.to_container(cfg, resolve=True))


def fit_lightning(cfg: DictConfig, callbacks: list[pl.Callback], **trainer_args: Any) -> None:
    """``Trainer.fit`` as the project configures it, minus validation, logger and checkpoints."""
    datamodule, module = build(cfg)
    settings = {
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        "precision": precision_of(cfg),
        **STRIPPED,
        **trainer_args,
    }
    trainer = instantiate(settings, callbacks=callbacks)
    trainer.fit(module, datamodule=datamodule)


def lightning_rate(cfg: DictConfig, clock: BatchClock) -> Rate:
    """Training images/s through ``Trainer.fit``, for as many epochs as the clock needs."""
    fit_lightning(cfg, [ClockCallback(clock)], max_epochs=10**6, min_epochs=None)
    return clock.rate()


def lightning_full_rate(cfg: DictConfig, clock: BatchClock) -> Rate:
    """Training images/s through ``Trainer.fit`` as a user runs it: validation after every
    epoch, best and last checkpoints, metrics logged to MLflow (all inside the timed window)."""
    datamodule, module = build(cfg)
    settings = {
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        "precision": precision_of(cfg),
        "max_epochs": 10**6,
        "min_epochs": None,
    }
    with tempfile.TemporaryDirectory(prefix="lmo-bench-ckpt-") as run_dir:
        checkpoint = ModelCheckpoint(run_dir, monitor=MONITOR, mode="max", save_last=True)
        logger = MLFlowLogger("bench-loops", tracking_uri=cfg.logger.mlflow.tracking_uri)
        trainer = instantiate(settings, callbacks=[ClockCallback(clock), checkpoint], logger=logger)
        trainer.fit(module, datamodule=datamodule)
    return clock.rate()


def epoch_batches(cfg: DictConfig) -> int:
    """Training batches in one epoch of ``cfg``'s loader."""
    datamodule, _ = build(cfg)
    datamodule.setup("fit")
    return len(datamodule.train_dataloader())


def _loss_of(module: pl.LightningModule) -> Callable[[Any, Any], torch.Tensor]:
    if isinstance(module, YoloDetector):
        return lambda outputs, targets: module.criterion(outputs, targets)[0]
    return lambda logits, labels: module.loss(logits.float(), labels)


def plain_rate(cfg: DictConfig, clock: BatchClock) -> Rate:
    """Training images/s of a hand-written loop over the same loader, network and optimizer."""
    datamodule, module = build(cfg)
    datamodule.setup("fit")
    net, loss_of = module.net.train(), _loss_of(module)
    optimizer = instantiate(cfg.model.optimizer, net.parameters())
    bf16 = precision_of(cfg) == "bf16-mixed"
    batches = endless(datamodule.train_dataloader())
    clock.start()
    while True:
        inputs, targets = module.on_after_batch_transfer(next(batches), 0)  # to float, layout
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            clock.enter("forward")
            outputs = net(inputs)
            clock.exit("forward")
            loss = loss_of(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        clock.enter("backward")
        loss.backward()
        clock.exit("backward")
        clock.enter("optimizer")
        optimizer.step()
        clock.exit("optimizer")
        if clock.tick(len(inputs)):
            return clock.rate()


LOOPS = {"plain": plain_rate, "lightning": lightning_rate, "lightning_full": lightning_full_rate}


def train_rate(ws: Workspace, loop: str, image_size: int, *overrides: str) -> Rate:
    """Images/s of ``loop`` on the training data at ``image_size``; measured once per run."""

    def measure() -> Rate:
        prepared = ws.prepared(ws.train_spec, image_size)
        cfg = ws.config(prepared, image_size, *overrides)
        return LOOPS[loop](cfg, BatchClock(ws.sizes.warmup, ws.sizes.budget_s))

    return ws.memo(("train", loop, image_size, overrides), measure)


def median_round(rates: list[Rate]) -> Rate:
    """The round whose images/s is the median (the upper one of an even count)."""
    return sorted(rates, key=lambda rate: rate.per_s)[len(rates) // 2]


def compared_rates(ws: Workspace, image_size: int, *overrides: str) -> dict[str, list[Rate]]:
    """Every loop of :data:`LOOPS` timed in alternating rounds (plain, Lightning, Lightning as
    a user runs it, plain, ...), each round for ``loop_round_s`` seconds at least, so that a
    passing slowdown of a shared machine cannot fall on one loop alone; a round of the full
    Lightning path also spans a whole epoch and its validation. Measured once per run, and
    answers :func:`train_rate` for the same settings afterwards (the median round)."""
    sizes = ws.sizes

    def measure() -> dict[str, list[Rate]]:
        prepared = ws.prepared(ws.train_spec, image_size)
        cfg = ws.config(prepared, image_size, *overrides)
        whole_epoch = epoch_batches(cfg) + 1
        rounds: dict[str, list[Rate]] = {loop: [] for loop in LOOPS}
        for _ in range(sizes.loop_rounds):
            for loop, rate_of_loop in LOOPS.items():
                least = whole_epoch if loop == "lightning_full" else 1
                clock = BatchClock(sizes.warmup, sizes.loop_round_s, min_batches=least)
                rounds[loop].append(rate_of_loop(cfg, clock))
        return rounds

    rounds = ws.memo(("compare", image_size, overrides), measure)
    for loop, rates in rounds.items():
        ws.memo(("train", loop, image_size, overrides), lambda rates=rates: median_round(rates))
    return rounds


def median_per_s(rates: list[Rate]) -> float:
    return statistics.median(rate.per_s for rate in rates)


def paired_overhead(rates: list[Rate], baseline: list[Rate]) -> float:
    """Percent extra time per image of ``rates`` against ``baseline``, alternated rounds of
    both: the median of each round's own ratio, so that the machine's drift between rounds
    cancels (a ratio of medians may pair a fast round of one with a slow round of the other)."""
    ratios = (base.per_s / rate.per_s for rate, base in zip(rates, baseline, strict=True))
    return 100 * (statistics.median(ratios) - 1)


def project_rate(ws: Workspace, model: str, image_size: int) -> Rate:
    """The project's own training speed: Lightning, configured precision and layout."""
    return train_rate(ws, "lightning", image_size, *model_overrides(model, image_size))
