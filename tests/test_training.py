"""CNN training on tiny synthetic data: real Lightning, real MLflow store."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from mlflow import MlflowClient
from omegaconf import OmegaConf
from quiet_trainer import quiet_trainer

from leukemia_mlops.cli.sweep import write_base_config
from leukemia_mlops.config import compose
from leukemia_mlops.data.datamodule import CellDataModule
from leukemia_mlops.errors import ConfigError
from leukemia_mlops.models.backbones import HEADS, WeightsError, build_classifier
from leukemia_mlops.models.classifier import CellClassifier
from leukemia_mlops.tracking.store import tracking_uri
from leukemia_mlops.training.callbacks import TIMING_COLUMNS, BackboneWarmup
from leukemia_mlops.training.mixed_precision import (
    choose_precision,
    cpu_flags_have_bf16,
    resolve_precision,
)
from leukemia_mlops.training.run import (
    RUN_STATE_ENV,
    _handed_to_launched_ranks,
    _inherited_start,
    _Start,
    run_training,
)


def finished_run(cfg, run_dir):
    run = json.loads((run_dir / "run.json").read_text())
    client = MlflowClient(tracking_uri(None, cfg.paths.mlruns_dir))
    return client, client.get_run(run["mlflow_run_id"])


def test_fit_lowers_the_loss_and_records_everything(tiny_config, tmp_path):
    cfg = tiny_config(
        "trainer.max_epochs=4",
        "model.warmup_epochs=0",
        "model.optimizer.lr=3e-3",
        "datamodule.augment_strength=0",
        "logger.mlflow.log_model=true",
    )
    run_dir = tmp_path / "run"
    best = run_training(cfg, run_dir)

    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["epoch"]) == [0, 1, 2, 3]
    assert history["train/loss"].iloc[-1] < history["train/loss"].iloc[0]
    assert (run_dir / "checkpoints/best.ckpt").is_file()
    assert (run_dir / "checkpoints/last.ckpt").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val_auroc"] == pytest.approx(best)  # the monitored metric
    assert 0 <= metrics["val_f1_weighted"] <= 1

    client, run = finished_run(cfg, run_dir)
    assert run.data.tags["backbone"] == "resnet18"
    identity = json.loads((cfg.paths.prepared_dir / Path("identity.json")).read_text())
    assert run.data.tags["data_identity"] == identity["digest"]  # the cache's data identity
    assert "data_hash" not in run.data.tags  # one identity, under one name
    assert run.data.tags["image_size"] == str(identity["image_size"])
    assert run.data.tags["git_commit"]
    assert run.data.params["model.optimizer.lr"] == "0.003"
    for key in (
        "train/loss",
        "val/f1_weighted",
        "val/auroc",
        "val/sensitivity",
        "val/specificity",
        "val/balanced_accuracy",
        "val/accuracy",
    ):
        assert len(client.get_metric_history(run.info.run_id, key)) == 4, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints"} <= artifacts
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert any(m.source_run_id == run.info.run_id for m in models)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"


@pytest.mark.parametrize(
    "override", ["data.prepare.image_size=64", "data.source=cnmc", "data.prepare.fit=box"]
)
def test_a_run_whose_config_describes_another_cache_stops_with_one_line(
    tiny_config, tmp_path, override
):
    key = override.split("=")[0].rsplit(".", 1)[-1]
    with pytest.raises(ConfigError, match=f"the config asks for data {key}=") as error:
        run_training(tiny_config(override), tmp_path / "run")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()  # stopped before anything was written


def test_same_seed_gives_the_same_metrics(tiny_config, tmp_path):
    cfg = tiny_config("trainer.max_epochs=1", "datamodule.balance=sampler")
    first = run_training(cfg, tmp_path / "a")
    second = run_training(cfg, tmp_path / "b")
    assert first == second
    a, b = (pd.read_csv(tmp_path / run / "history.csv") for run in ("a", "b"))
    assert a["time_s"].iloc[-1] > 0  # training time is recorded, and only it differs
    pd.testing.assert_frame_equal(*(h.drop(columns=list(TIMING_COLUMNS)) for h in (a, b)))


def test_a_sweep_trial_is_the_first_epochs_of_the_run_it_tunes(tiny_config, tmp_path):
    """The trial keeps the run's learning-rate schedule: a cosine annealed over the trial's
    own epochs would train another model from its second epoch on."""
    cfg = tiny_config("trainer.max_epochs=3", "sweep.max_epochs=2", "datamodule.balance=sampler")
    write_base_config(cfg, "model", tmp_path / "trial_base.yaml")
    run_training(OmegaConf.load(tmp_path / "trial_base.yaml"), tmp_path / "trial")
    run_training(cfg, tmp_path / "run")
    run_training(
        tiny_config("trainer.max_epochs=2", "datamodule.balance=sampler"), tmp_path / "short"
    )
    trial, run, short = (
        pd.read_csv(tmp_path / name / "history.csv").drop(columns=list(TIMING_COLUMNS))
        for name in ("trial", "run", "short")
    )
    assert list(trial["epoch"]) == [0, 1]
    pd.testing.assert_frame_equal(trial, run.iloc[:2])
    assert short["train/loss"].iloc[1] != run["train/loss"].iloc[1]  # a 2-epoch schedule


class BatchNormModes(pl.Callback):
    """Whether the backbone's batch-norm layers trained in each epoch's batches."""

    def __init__(self):
        self.training: dict[int, set[bool]] = {}

    def on_train_batch_end(self, trainer, pl_module, *_):
        layers = [m for m in pl_module.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        self.training.setdefault(trainer.current_epoch, set()).update(m.training for m in layers)


def test_the_warm_up_trains_the_head_on_the_features_validation_sees(tiny_prepared):
    """During the warm-up the frozen backbone normalises with its running statistics, as in
    validation; after it, with batch statistics again."""
    module = CellClassifier(backbone="resnet18", channels_last=False)
    modes = BatchNormModes()
    trainer = quiet_trainer(max_epochs=2, callbacks=[BackboneWarmup(1), modes])
    trainer.fit(module, datamodule=CellDataModule(str(tiny_prepared), 16, num_workers=0))
    assert modes.training == {0: {False}, 1: {True}}


def test_a_checkpoint_does_not_depend_on_its_run_directory(tiny_config, tmp_path):
    """DVC hashes models/: the same training in another clone must write the same bytes."""
    cfg = tiny_config("trainer.max_epochs=1", "datamodule.balance=sampler")
    run_training(cfg, tmp_path / "a")
    run_training(cfg, tmp_path / "elsewhere/b")
    for name in ("best.ckpt", "last.ckpt"):
        first, second = (tmp_path / d / "checkpoints" / name for d in ("a", "elsewhere/b"))
        assert first.read_bytes() == second.read_bytes(), name


def test_checkpoints_load_with_weights_only(tiny_config, tmp_path):
    run_training(tiny_config("trainer.max_epochs=1"), tmp_path / "run")
    module = CellClassifier.load_from_checkpoint(
        tmp_path / "run/checkpoints/best.ckpt", map_location="cpu", weights_only=True
    )
    assert module.hparams.backbone == "resnet18"


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_backbone_builds_and_runs(name):
    net = build_classifier(name).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, 64, 64))
    assert out.shape == (2,)
    assert torch.isfinite(out).all()


def test_weights_from_a_local_file(tmp_path):
    source = build_classifier("resnet18")
    path = tmp_path / "backbone.pth"
    torch.save(source.backbone.state_dict(), path)
    loaded = build_classifier("resnet18", weights=str(path))
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(loaded.backbone.state_dict()[key], value)
    # A Lightning-style checkpoint of the whole module works too.
    ckpt = tmp_path / "module.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in source.state_dict().items()}}, ckpt)
    again = build_classifier("resnet18", weights=str(ckpt))
    assert torch.equal(again.backbone.conv1.weight, source.backbone.conv1.weight)


def test_weights_errors_are_clear(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        build_classifier("resnet18", weights=str(tmp_path / "missing.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save(build_classifier("mobilenet_v3_large").backbone.state_dict(), wrong)
    with pytest.raises(WeightsError, match="does not fit this backbone"):
        build_classifier("resnet18", weights=str(wrong))


def test_imagenet_weights_offline_name_the_file_to_place(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match=r"place resnet18-.*\.pth at"):
        build_classifier("resnet18", weights="imagenet")


def test_malicious_pickle_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": Exploit()}, path)
    with pytest.raises(WeightsError, match=r"cannot load .* safely"):
        build_classifier("resnet18", weights=str(path))


@pytest.mark.parametrize(
    ("gpu", "capability", "expected"),
    [
        ("A100", (8, 0), "bf16-mixed"),
        ("H100", (9, 0), "bf16-mixed"),
        ("T4", (7, 5), "16-mixed"),
        ("V100", (7, 0), "16-mixed"),
    ],
)
def test_auto_precision_of_a_gpu_reads_only_its_own_device(monkeypatch, gpu, capability, expected):
    # This rank (local rank 1) has the GPU under test; device 0 is another kind, never read.
    devices = {0: (12, 0) if capability < (8, 0) else (6, 1), 1: capability}
    read: list[int] = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda index: read.append(index) or devices[index]
    )
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", pytest.fail)  # counts emulation
    assert resolve_precision("auto", "gpu") == expected, gpu
    assert read == [1]
    assert resolve_precision("16-mixed", "gpu") == "16-mixed"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu sse2 avx2 avx512f avx512_bf16 amx_tile", "bf16-mixed"),  # Xeon with AVX512-BF16
        ("fpu sse2 avx2 amx_bf16", "bf16-mixed"),
        ("fpu sse2 avx2 avx512f avx512_vnni", "32-true"),  # bf16 emulated: slower than fp32
        ("fpu sse2 avx2", "32-true"),  # EPYC with AVX2 only
    ],
)
def test_auto_precision_of_a_cpu_follows_its_bf16_flags(flags, expected):
    cpuinfo = f"processor\t: 0\nmodel name\t: some cpu\nflags\t\t: {flags}\nbogomips\t: 1\n"
    assert choose_precision(None, cpu_flags_have_bf16(cpuinfo)) == expected


@pytest.mark.parametrize("trainer", ["gpu", "ddp"])
def test_gpu_trainers_bring_gpu_input_settings(trainer):
    cpu = compose(["trainer=cpu"])
    gpu = compose([f"trainer={trainer}"])
    assert gpu.datamodule.pin_memory and not cpu.datamodule.pin_memory
    assert gpu.datamodule.num_workers == "auto"
    assert gpu.datamodule.batch_size > cpu.datamodule.batch_size
    assert gpu.trainer.benchmark and "benchmark" not in cpu.trainer
    assert compose([f"trainer={trainer}", "datamodule.batch_size=8"]).datamodule.batch_size == 8


def test_auto_loader_workers_share_the_cpus_among_the_ranks(tiny_prepared):
    cpus = len(os.sched_getaffinity(0))
    loaders = CellDataModule(str(tiny_prepared), 4, num_workers="auto").loaders
    assert loaders.workers(None) == max(cpus - 1, 0)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    assert loaders.workers(trainer) == max(cpus // 2 - 1, 0)
    assert CellDataModule(str(tiny_prepared), 4, num_workers=3).loaders.workers(None) == 3
    with pytest.raises(ConfigError, match="num_workers"):
        CellDataModule(str(tiny_prepared), 4, num_workers="many")


def test_rank_zero_hands_its_run_state_to_the_ranks_it_launches():
    # Lightning's DDP launcher re-runs the command: those ranks must not read run.json nor
    # open the store.
    state = {"config_hash": "abc", "mlflow_run_id": "r1", "status": "running"}
    start = _Start(Path("/runs/a"), state, True, "sqlite:////runs/mlflow.db")
    probe = "from leukemia_mlops.training.run import _inherited_start; print(_inherited_start())"
    with _handed_to_launched_ranks(start):
        child = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True
        )
        assert _inherited_start() is None  # rank 0 decides for itself
    assert child.stdout.splitlines()[-1] == str(start)
    assert RUN_STATE_ENV not in os.environ


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+model.dropuot=0.5", r"model: .*unexpected keyword argument 'dropuot'"),
        ("model._target_=torch.nn.Linear", r"model\._target_ 'torch\.nn\.Linear' is not a"),
        ("model._target_=no.such.Model", r"model\._target_ is not a model class"),
    ],
)
def test_a_model_config_the_class_does_not_take_is_one_clear_error(
    tiny_config, tmp_path, override, message
):
    with pytest.raises(ConfigError, match=message):
        run_training(tiny_config("trainer.max_epochs=1", override), tmp_path / "run")
