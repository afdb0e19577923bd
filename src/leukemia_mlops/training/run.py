"""Train one model from a resolved config: the body of ``train`` and of the DVC stage.

``model.family`` picks the model and its data: ``cnn`` (a torchvision classifier over single
cells) or ``yolo`` (a YOLOv3 detector over single cells and composed scenes); both are scored
with the same classification metrics and share the logger, checkpoints and resume logic.

A run directory (its files named in :mod:`leukemia_mlops.tracking.run_files`) holds the
checkpoints, ``run.json`` (the MLflow run id, the config hash and the status) and, when
finished, the metrics and curves. A run that stopped before finishing resumes from its last
checkpoint into the same MLflow run when it is started again with the same config.

Under DDP only rank 0 reads and writes the run directory: it decides whether to resume and
hands its directory and decision to the other ranks (started by Lightning's launcher, which
re-runs the command, or by torchrun), and every rank waits until rank 0 has written the
finished run's files. Files are replaced atomically.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch.distributed as dist
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers.logger import DummyLogger, Logger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from leukemia_mlops.data.identity import read_identity
from leukemia_mlops.data.prepare import MANIFEST_FILE
from leukemia_mlops.errors import ConfigError, ProjectError, first_line
from leukemia_mlops.files import write_json, write_text
from leukemia_mlops.models import family
from leukemia_mlops.models.base import FineTunedModule
from leukemia_mlops.models.metrics import MONITOR
from leukemia_mlops.owned import remove_owned
from leukemia_mlops.redaction import redact
from leukemia_mlops.tracking.datasets import TRAINING_CONTEXTS, log_data_inputs
from leukemia_mlops.tracking.logger import ResumableMLFlowLogger
from leukemia_mlops.tracking.provenance import config_hash, flatten, git_commit
from leukemia_mlops.tracking.run_files import CHECKPOINTS, RunFiles, store_uri
from leukemia_mlops.tracking.store import ensure_experiment
from leukemia_mlops.training.attendance import Attendance, JobError, attended
from leukemia_mlops.training.callbacks import BackboneWarmup, EpochHistory, EpochSeed
from leukemia_mlops.training.cluster import (
    PROJECT_TRAINER_KEYS,
    TIMEOUT_KEY,
    check_launch,
    external_environment,
    join_group,
)
from leukemia_mlops.training.mixed_precision import resolve_precision
from leukemia_mlops.training.preemption import Preemption
from leukemia_mlops.tuning.runs import trial_tags

log = logging.getLogger(__name__)
# Notices that are expected here: batches are normalised by the module on purpose, and the
# pytree deprecation is Lightning's own.
warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
# The model summary does not know the mixed precisions and says so once per training.
warnings.filterwarnings("ignore", message="Precision .* is not supported by the model summary")
# Keys a family does not log are left out of its rows (the mAPs are the detectors').
HISTORY_KEYS = (
    "train/loss",
    "val/loss",
    "train/f1_weighted",
    "val/f1_weighted",
    MONITOR,
    "val/map_50",
    "val/map",
)
#: Keys of a ``model`` config that are not constructor arguments: the family label, the
#: detector's scene settings (its datamodule's) and a timm model's name (in ``backbone``).
NOT_MODEL_ARGUMENTS = ("family", "scenes", "name")
#: Rank 0's start of the run, handed to the ranks that Lightning's launcher starts as children.
RUN_STATE_ENV = "LEUKEMIA_MLOPS_RUN_STATE"


def run_training(cfg: DictConfig, run_dir: str | Path) -> float:
    """Fit the configured model; returns the best value of the monitored metric (val AUROC)."""
    run_dir = Path(run_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    check_launch(config["trainer"])
    pl.seed_everything(cfg.seed, workers=True)
    identity = read_identity(cfg.datamodule.prepared_dir)
    identity.check(cfg.get("data"), cfg.datamodule.prepared_dir)
    datamodule, module = build_data_and_module(cfg, config)

    start, attendance = _shared_start(cfg, run_dir, config_hash(config))
    run_dir, state, uri = start.run_dir, start.state, start.uri
    trial = config.get("optuna_trial")  # set by the Optuna sweeper on its trials
    # Ranks other than 0 log nothing (Lightning logs on rank 0) and never open the store,
    # which Lightning's MLflow logger does when it is built.
    logger: Logger = DummyLogger()
    if rank_zero_only.rank == 0:
        logger = ResumableMLFlowLogger(
            experiment_name=cfg.logger.mlflow.experiment_name,
            tracking_uri=uri,
            run_name=cfg.logger.mlflow.run_name or module.architecture,
            run_id=state.get("mlflow_run_id"),
            tags={
                "backbone": module.architecture,
                "family": cfg.model.family,
                "git_commit": git_commit(),
                "data_source": str(identity.source),
                "data_identity": identity.digest,
                "image_size": str(identity.image_size),
                **trial_tags(trial),
            },
        )
        _start_run(run_dir, logger, config, state)
        manifest = Path(cfg.datamodule.prepared_dir) / MANIFEST_FILE
        log_data_inputs(uri, logger.run_id, manifest, identity, TRAINING_CONTEXTS)

    history = EpochHistory(HISTORY_KEYS)
    checkpoint = instantiate(
        cfg.callbacks.checkpoint,
        dirpath=RunFiles(run_dir).checkpoints,
        filename=RunFiles(run_dir).best_checkpoint.stem,
        monitor=MONITOR,
        mode="max",
    )
    callbacks = [
        checkpoint,
        instantiate(cfg.callbacks.early_stopping, monitor=MONITOR, mode="max"),
        *(instantiate(node) for node in cfg.callbacks.get("extra", {}).values()),
        BackboneWarmup(cfg.model.warmup_epochs),
        EpochSeed(cfg.seed),
        history,
        Preemption(RunFiles(run_dir).last_checkpoint),
    ]
    if trial:
        from leukemia_mlops.tuning.pruning import OptunaPruning

        callbacks.append(OptunaPruning(trial, MONITOR))
    _check_trainer_keys(config["trainer"])
    trainer_cfg = {
        **{k: v for k, v in config["trainer"].items() if k not in PROJECT_TRAINER_KEYS},
        "precision": resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator),
    }
    # Partial: objects are passed after instantiation, not wrapped into the config.
    trainer = instantiate(trainer_cfg, _partial_=True)(
        callbacks=callbacks, logger=logger, default_root_dir=str(run_dir)
    )
    with _handed_to_launched_ranks(start), attended(attendance):
        trainer.fit(
            module,
            datamodule=datamodule,
            ckpt_path=str(RunFiles(run_dir).last_checkpoint) if start.resume else None,
            weights_only=True,
        )
    best = float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else 0.0
    if trainer.is_global_zero:
        finished = _TrainedRun(module, datamodule, checkpoint, history, identity.image_size)
        _finish_run(run_dir, cfg, logger, finished, trainer_cfg["precision"])
    trainer.strategy.barrier("run finished")  # the other ranks leave once rank 0's files exist
    return best


def build_data_and_module(
    cfg: DictConfig, config: dict[str, Any]
) -> tuple[pl.LightningDataModule, FineTunedModule]:
    """The datamodule and the module of ``model._target_`` (a :class:`FineTunedModule`)."""
    module_class = family.module_class(cfg.model.get("_target_"))
    datamodule = module_class.datamodule_from_config(config)
    arguments = {k: v for k, v in config["model"].items() if k not in NOT_MODEL_ARGUMENTS}
    try:
        # Plain values (checkpoints load with weights_only); the optimizer stays a mapping,
        # which the module instantiates with its parameter groups.
        module = instantiate(
            arguments,
            **module_class.data_arguments(datamodule),
            _recursive_=False,
            _convert_="all",
        )
    except InstantiationException as err:
        if isinstance(err.__cause__, ProjectError):  # the module's own one-line error
            raise err.__cause__ from None
        # A key the constructor does not take, or a value of the wrong type.
        raise ConfigError(f"model: {first_line(err.__cause__ or err)}") from None
    return datamodule, module


#: Trainer arguments that must be whole numbers (or null), checked before Lightning sees them.
_INTEGER_TRAINER_KEYS = (
    "max_epochs",
    "min_epochs",
    "accumulate_grad_batches",
    "log_every_n_steps",
    "num_nodes",
)


def _check_trainer_keys(trainer: dict[str, Any]) -> None:
    """Name an unknown or mistyped ``trainer.*`` key instead of failing inside Lightning."""
    known = set(inspect.signature(pl.Trainer.__init__).parameters)
    unknown = sorted(set(trainer) - known - {"_target_", *PROJECT_TRAINER_KEYS})
    if unknown:
        raise ConfigError(f"unknown key trainer.{unknown[0]} (not a Lightning Trainer argument)")
    for key in _INTEGER_TRAINER_KEYS:
        value = trainer.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"trainer.{key} must be a whole number, got {value!r}")


class _Start(NamedTuple):
    """Rank 0's decisions at the start of a run, the same on every rank."""

    run_dir: Path
    state: dict[str, Any]
    resume: bool
    uri: str  # the MLflow store, created (and its experiment) by rank 0


@contextmanager
def _handed_to_launched_ranks(start: _Start) -> Iterator[None]:
    """Hand rank 0's start to the ranks that Lightning's DDP launcher starts meanwhile."""
    handed = {"launcher_pid": os.getpid(), **start._asdict(), "run_dir": str(start.run_dir)}
    os.environ[RUN_STATE_ENV] = json.dumps(handed)
    try:
        yield
    finally:
        os.environ.pop(RUN_STATE_ENV, None)


def _shared_start(cfg: DictConfig, run_dir: Path, digest: str) -> tuple[_Start, Attendance | None]:
    """Rank 0's start of the run (:func:`_rank_zero_start`), the same on every rank, and this
    rank's part in the roll calls of ranks that joined the job's group (else None).

    Ranks that Lightning's launcher starts inherit it. Ranks that torchrun or srun start
    together (each may have resolved its own ``${now}`` run directory) join the process group
    at once (:func:`~leukemia_mlops.training.cluster.join_group`) to receive it, or rank 0's
    one-line error when it could not start.
    """
    inherited = _inherited_start()
    if inherited is not None:
        return inherited, None
    environment = external_environment()
    if environment is None:
        return _rank_zero_start(cfg, run_dir, digest), None
    attendance = join_group(environment, cfg.trainer.get(TIMEOUT_KEY))
    shared: list[_Start | str | None] = [None]
    if dist.get_rank() == 0:
        try:
            shared = [_rank_zero_start(cfg, run_dir, digest)]
        except Exception as err:  # the other ranks stop too, with its line
            shared = [first_line(err)]
            dist.broadcast_object_list(shared, src=0)
            raise
    dist.broadcast_object_list(shared, src=0)
    if isinstance(shared[0], str):
        raise JobError(f"rank 0 could not start the run: {shared[0]}")
    return shared[0], attendance


def _rank_zero_start(cfg: DictConfig, run_dir: Path, digest: str) -> _Start:
    """Open the MLflow store (created if new) and its experiment, and decide whether to resume:
    only rank 0 touches shared state, before any other rank knows the run."""
    uri = store_uri(cfg)
    ensure_experiment(uri, cfg.logger.mlflow.experiment_name, cfg.paths.mlruns_dir)
    return _Start(run_dir, *_resume_state(run_dir, digest), uri)


def _inherited_start() -> _Start | None:
    """Rank 0's start of the run, in a rank its DDP launcher started."""
    handed = json.loads(os.environ.get(RUN_STATE_ENV, "{}"))
    if handed.pop("launcher_pid", None) != os.getppid():
        return None
    return _Start(**{**handed, "run_dir": Path(handed["run_dir"])})


def _resume_state(run_dir: Path, digest: str) -> tuple[dict[str, Any], bool]:
    """The unfinished run of this same config and whether to resume it from ``last.ckpt``,
    or a clean run directory."""
    files = RunFiles(run_dir)
    state = files.read_state()
    if state.get("config_hash") == digest and state.get("status") == "running":
        log.info("resuming MLflow run %s from %s", state["mlflow_run_id"], run_dir)
        return state, files.last_checkpoint.is_file()
    # run.json proves the checkpoints are this project's: a folder that merely happens to
    # hold a checkpoints/ (paths.models_dir=~ ...) is refused, never wiped.
    remove_owned(files.checkpoints, files.state)
    files.state.unlink(missing_ok=True)
    return {"config_hash": digest}, False


def _start_run(run_dir: Path, logger: ResumableMLFlowLogger, config: dict, state: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    logger.log_hyperparams(flatten(config))
    files = RunFiles(run_dir)
    config_file = files.config
    write_text(config_file, redact(OmegaConf.to_yaml(OmegaConf.create(config))))
    logger.experiment.log_artifact(logger.run_id, str(config_file))
    state.update(mlflow_run_id=logger.run_id, status="running")
    write_json(files.state, state, sort_keys=False)


class _TrainedRun(NamedTuple):
    """What a finished fit leaves for the run's files and its MLflow run."""

    module: FineTunedModule
    datamodule: pl.LightningDataModule
    checkpoint: ModelCheckpoint
    history: EpochHistory
    image_size: int  # of the prepare cache


def _finish_run(
    run_dir: Path,
    cfg: DictConfig,
    logger: ResumableMLFlowLogger,
    run: _TrainedRun,
    precision: str,
) -> None:
    """Write metrics and curves, and log the best checkpoint and model to the MLflow run."""
    files = RunFiles(run_dir)
    history, checkpoint = run.history, run.checkpoint
    write_text(files.history, history.table().to_csv(index=False))
    best_row = max(history.rows, key=lambda r: r.get(MONITOR, float("-inf")), default={})
    metrics = {
        "best_epoch": best_row.get("epoch", -1),
        **{k.replace("/", "_"): v for k, v in best_row.items() if k != "epoch"},
    }
    metrics["precision"] = precision
    write_json(files.metrics, metrics)
    log.info("finished %s: %s", run_dir, metrics_line(metrics))
    if checkpoint.best_model_path:
        logger.experiment.log_artifact(logger.run_id, checkpoint.best_model_path, CHECKPOINTS)
        best = type(run.module).load_trained(checkpoint.best_model_path)
        _log_best_model(best, cfg, logger, run.datamodule, run.image_size)
    best_score = checkpoint.best_model_score
    logger.experiment.log_metric(
        logger.run_id, "best/" + MONITOR, float(best_score) if best_score is not None else 0.0
    )
    state = files.read_state()
    state["status"] = "finished"
    write_json(files.state, state, sort_keys=False)


def metrics_line(metrics: dict[str, Any]) -> str:
    """The final metrics on one line, ``name=value`` sorted by name."""
    return " ".join(
        f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}"
        for key, value in sorted(metrics.items())
    )


def _log_best_model(
    best: FineTunedModule,
    cfg: DictConfig,
    logger: ResumableMLFlowLogger,
    datamodule: pl.LightningDataModule,
    image_size: int,
) -> None:
    """Log the best network as an MLflow model, and its validation overlays (if any)."""
    from leukemia_mlops.tracking.model_logging import log_classifier

    for i, overlay in enumerate(best.validation_overlays(datamodule)):
        logger.experiment.log_image(logger.run_id, overlay, f"overlays/val_scene_{i}.png")
    if cfg.logger.mlflow.log_model:
        size = best.input_size(image_size)
        log_classifier(store_uri(cfg), logger.run_id, best.serving_network(), size)
