"""timm backbones (``model=timm model.name=...``) and the published recipes in conf/experiment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import save_file
from torch import nn

from leukemia_mlops.config import compose
from leukemia_mlops.errors import ConfigError
from leukemia_mlops.inference.loading import load_module
from leukemia_mlops.models.backbones import WeightsError, _missing_timm_weights, build_classifier
from leukemia_mlops.models.classifier import CellClassifier
from leukemia_mlops.tracking.store import tracking_uri
from leukemia_mlops.training.run import run_training

EXPERIMENTS = Path(__file__).resolve().parents[1] / "conf" / "experiment"
#: Published recipes: file -> (backbone, the score its header reports).
RECIPES = {
    "cnmc_seresnext50_tta": ("timm/seresnext50_32x4d", "0.8891"),
    "cnmc_efficientnet_b3": ("timm/efficientnet_b3", "0.9430"),
}


@pytest.mark.parametrize(
    ("name", "mean"),
    [
        ("resnet18", 0.485),
        ("convnext_atto", 0.485),  # LayerNorm head
        ("mobilenetv4_conv_small_050", 0.5),  # a pre-logits layer widens the features
    ],
)
def test_timm_models_get_the_binary_head_on_their_features(name, mean):
    net = build_classifier(f"timm/{name}").eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = net.backbone(images)
        logits = net(images)
    linear = net.head[-1]
    assert isinstance(linear, nn.Linear)
    assert (linear.in_features, linear.out_features) == (features.shape[1], 1)
    assert features.shape[0] == 2 and features.ndim == 2
    assert logits.shape == (2,) and torch.isfinite(logits).all()
    # The backbone keeps no classifier of its own: the head is the only new layer.
    assert not any(p.shape[0] == 1000 for p in net.backbone.parameters())
    assert net.mean[0, 0, 0, 0].item() == pytest.approx(mean)  # timm's normalisation


def test_timm_backbone_gets_the_backbone_learning_rate_and_channels_last():
    module = CellClassifier(backbone="timm/resnet18", backbone_lr_ratio=0.1, scheduler="none")
    groups = {g["name"]: g for g in module.configure_optimizers()["optimizer"].param_groups}
    assert groups["backbone"]["lr"] == pytest.approx(1e-4)
    assert groups["head"]["lr"] == pytest.approx(1e-3)
    assert len(groups["backbone"]["params"]) == len(list(module.net.backbone.parameters()))
    assert [p.shape for p in groups["head"]["params"]] == [(1, 512), (1,)]
    assert module.net.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_unknown_timm_model_is_a_config_error():
    with pytest.raises(ConfigError, match=r"timm has no model 'resnet18x'.*did you mean.*resnet18"):
        build_classifier("timm/resnet18x")


def test_timm_weights_from_local_files(tmp_path):
    source = build_classifier("timm/resnet18")
    state = source.backbone.state_dict()
    torch.save(state, tmp_path / "backbone.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "backbone.safetensors")
    module_state = {f"net.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": module_state}, tmp_path / "m.ckpt")
    for file in ("backbone.pth", "backbone.safetensors", "m.ckpt"):
        loaded = build_classifier("timm/resnet18", weights=str(tmp_path / file))
        for key, value in state.items():
            assert torch.equal(loaded.backbone.state_dict()[key], value), (file, key)


def test_timm_weights_errors_are_clear(tmp_path):
    wrong = tmp_path / "wrong.safetensors"
    save_file(build_classifier("timm/convnext_atto").backbone.state_dict(), wrong)
    with pytest.raises(WeightsError, match="does not fit this backbone"):
        build_classifier("timm/resnet18", weights=str(wrong))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match=r"cannot load .*broken\.safetensors safely"):
        build_classifier("timm/resnet18", weights=str(broken))
    with pytest.raises(WeightsError, match="timm has no ImageNet weights for nf_resnet26"):
        build_classifier("timm/nf_resnet26", weights="imagenet")


def test_timm_imagenet_offline_and_uncached_names_the_cache_folder(tmp_path):
    """In a fresh process, as a user runs it: the hub is offline, its cache and torch's empty."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "TORCH_HOME": str(tmp_path / "torch"),
    }
    code = (
        "from leukemia_mlops.models.backbones import build_classifier\n"
        "build_classifier('timm/resnet18', weights='imagenet')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    folder = tmp_path / "hf" / "hub" / "models--timm--resnet18.a1_in1k"
    assert last.startswith("leukemia_mlops.models.backbones.WeightsError: ImageNet weights for")
    assert f"at {folder}," in last
    assert "model.weights=/path/to/model.safetensors" in last
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing was downloaded


def test_timm_weights_from_a_url_name_the_torch_cache_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    message = _missing_timm_weights("legacy_seresnext50_32x4d", OSError("offline"))
    file = "legacy_se_resnext50_32x4d-f3651bad.pth"
    assert f"place {file} at {tmp_path / 'hub' / 'checkpoints' / file}" in message


def test_timm_config_names_the_backbone():
    cfg = compose(["model=timm", "model.name=convnext_tiny"])
    assert cfg.model.backbone == "timm/convnext_tiny"
    assert cfg.model.family == "cnn"


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.stem)
def test_experiments_compose_as_global_packages(path):
    assert path.read_text().startswith("# @package _global_\n")
    cfg = compose([f"experiment={path.stem}"])
    assert "experiment" not in cfg  # its keys landed at the top, not under experiment.*
    if path.stem in RECIPES:
        backbone, score = RECIPES[path.stem]
        assert cfg.model.backbone == backbone
        assert cfg.model.weights == "imagenet"
        assert cfg.data.source == "cnmc"
        assert cfg.sweep.enabled is False  # `dvc exp run` trains it as published, untuned
        header = path.read_text().split("\ndefaults:")[0]
        assert "as reported by" in header and score in header


def test_seresnext_recipe_keeps_its_published_settings():
    cfg = compose(["experiment=cnmc_seresnext50_tta"])
    assert (cfg.data.prepare.image_size, cfg.data.prepare.window) == (300, 300)
    assert cfg.evaluate.tta is True
    assert cfg.trainer.max_epochs == 6
    assert cfg.datamodule.batch_size == 16
    assert cfg.model.optimizer.lr * cfg.model.backbone_lr_ratio == pytest.approx(1e-4)


def _trained(cfg, run_dir: Path) -> pd.DataFrame:
    """Train ``cfg``; returns its history after checking the run's files and MLflow tag."""
    run_training(cfg, run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished"
    client = MlflowClient(tracking_uri(None, cfg.paths.mlruns_dir))
    assert client.get_run(run["mlflow_run_id"]).data.tags["backbone"] == cfg.model.backbone
    return pd.read_csv(run_dir / "history.csv")


@pytest.mark.slow
def test_a_timm_model_trains_one_epoch(tiny_config, tmp_path):
    cfg = tiny_config("model=timm", "model.name=mobilenetv4_conv_small_050", "trainer.max_epochs=1")
    history = _trained(cfg, tmp_path / "run")
    assert list(history["epoch"]) == [0]
    module = load_module(tmp_path / "run/checkpoints/best.ckpt")
    assert module.hparams.backbone == "timm/mobilenetv4_conv_small_050"
    with torch.no_grad():
        assert torch.isfinite(module.eval()(torch.rand(2, 3, 48, 48))).all()


@pytest.mark.slow
def test_the_seresnext_recipe_runs_shortened_on_the_tiny_data(tiny_config, tmp_path):
    cfg = tiny_config(
        "experiment=cnmc_seresnext50_tta",
        "data=synthetic",
        "data.prepare.window=450",
        "model.weights=none",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
    )
    history = _trained(cfg, tmp_path / "run")
    assert list(history["epoch"]) == [0]
    assert cfg.model.backbone == "timm/seresnext50_32x4d"
