"""One source of truth: params.yaml is conf/ composed and resolved."""

import inspect
import shutil
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError

from hydra_plugins.leukemia_optuna_sweeper.optuna_sweeper import LeukemiaOptunaSweeperConf
from leukemia_mlops.config import (
    CONF_DIR,
    build_spec,
    compose,
    load_params,
    to_params_yaml,
    write_params,
)
from leukemia_mlops.data.datamodule import CellDataModule
from leukemia_mlops.data.detection import DetectionDataModule
from leukemia_mlops.data.prepare import PrepareSpec
from leukemia_mlops.data.scenes import SceneSpec
from leukemia_mlops.data.splits import SplitSpec
from leukemia_mlops.data.synthetic import SyntheticSpec
from leukemia_mlops.errors import ConfigError
from leukemia_mlops.evaluation.evaluate import EvaluateSpec
from leukemia_mlops.evaluation.label_audit import AuditSpec
from leukemia_mlops.models.classifier import CellClassifier
from leukemia_mlops.models.detector import YoloDetector
from leukemia_mlops.models.yolo.build import YoloConfig

REPO = Path(__file__).resolve().parents[1]


def test_committed_params_yaml_matches_conf():
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    assert committed == yaml.safe_load(to_params_yaml(compose()))


def test_write_params_only_rewrites_on_change(tmp_path):
    path = tmp_path / "params.yaml"
    assert write_params(compose(), path)
    assert not write_params(compose(), path)
    assert write_params(compose(["seed=7"]), path)
    assert yaml.safe_load(path.read_text())["seed"] == 7


@pytest.mark.parametrize(
    "group",
    [
        "model=resnet50",
        "model=vgg16",
        "model=yolov3",
        "data=cnmc",
        "trainer=ddp_cpu",
        "trainer=gpu",
        "experiment=cnmc_efficientnet",
        "experiment=smoke",
    ],
)
def test_groups_compose(group):
    cfg = compose([group])
    assert OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize(
    ("values", "match"),
    [({"image_size": "big"}, "image_size"), ({"colour": 1}, "colour"), ({"fit": "zoom"}, "fit")],
)
def test_bad_values_are_one_line_errors(values, match):
    with pytest.raises(ValueError, match=match) as error:
        build_spec(PrepareSpec, OmegaConf.create(values), "data.prepare")
    assert "\n" not in str(error.value)


def _conf_node(key: str) -> dict:
    """A config section as conf/ defines it (the sweeper's: in the CNN search space)."""
    if key == "hydra.sweeper":
        return OmegaConf.to_container(
            OmegaConf.load(CONF_DIR / "hparams_search/_optuna.yaml").hydra.sweeper
        )
    return OmegaConf.to_container(OmegaConf.select(compose(), key), resolve=True)


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        (PrepareSpec, "data.prepare"),
        (SplitSpec, "data.split"),
        (SyntheticSpec, "data.synthetic"),
        (EvaluateSpec, "evaluate"),
        (AuditSpec, "audit"),
        (LeukemiaOptunaSweeperConf, "hydra.sweeper"),
    ],
)
def test_code_defaults_are_the_defaults_of_conf(spec, key):
    """conf/ is the one place a default lives: a default restated in code must agree with it."""
    node = _conf_node(key)
    restated = {
        f.name: f.default
        for f in fields(spec)
        if f.default not in (MISSING, "???") and f.name in node  # "???": conf/ must set it
    }
    assert {name: node[name] for name in restated} == restated


def _constructor_defaults(target: Any) -> dict[str, Any]:
    """The keyword defaults of a dataclass or a constructor, but ``None``: no value, the
    documented fallback (COCO anchors, the variant's loss, the built-in optimizer)."""
    if is_dataclass(target):
        pairs = [(f.name, f.default) for f in fields(target) if f.default is not MISSING]
    else:
        parameters = inspect.signature(target).parameters.values()
        pairs = [(p.name, p.default) for p in parameters if p.default is not p.empty]
    return {name: default for name, default in pairs if default is not None}


def _own_values(cfg: Any, key: str) -> dict[str, Any]:
    """A config section's values that conf/ sets there, not by interpolating another key
    (``datamodule.seed: ${seed}``: the run's seed, which no constructor can restate)."""
    node = OmegaConf.select(cfg, key)
    return {
        name: OmegaConf.to_container(node, resolve=True)[name]
        for name in node
        if not OmegaConf.is_interpolation(node, name)
    }


@pytest.mark.parametrize(
    ("target", "model", "keys"),
    [
        (SceneSpec, "yolov3_tiny", ["model.scenes"]),
        (YoloConfig, "yolov3_tiny", ["model.loss"]),
        (YoloConfig, "yolov3", ["model"]),
        (CellDataModule, "resnet18", ["datamodule"]),
        (DetectionDataModule, "yolov3_tiny", ["datamodule", "model", "model.scenes"]),
        (CellClassifier, "resnet18", ["model"]),
        (YoloDetector, "yolov3_tiny", ["model"]),
    ],
)
def test_constructor_defaults_are_the_defaults_of_conf(target, model, keys):
    """Defaults that exist only in code (specs and the modules Hydra instantiates) agree
    with the conf/ sections they are built from."""
    cfg = compose([f"model={model}"])
    node = {name: value for key in keys for name, value in _own_values(cfg, key).items()}
    restated = {name: v for name, v in _constructor_defaults(target).items() if name in node}
    assert len(restated) >= 3, "the scan compares nothing"
    assert {name: node[name] for name in restated} == restated


def test_local_choices_are_composed_last(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf, ignore=shutil.ignore_patterns("local"))
    assert compose(config_dir=conf).data.source == "synthetic"
    (conf / "local").mkdir()
    (conf / "local/default.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /data: cnmc\nseed: 7\n"
    )
    cfg = compose(["seed=8"], config_dir=conf)
    assert (cfg.data.source, cfg.seed) == ("cnmc", 8)  # the command line still wins


def test_a_stage_sees_only_the_params_it_declares(tmp_path, monkeypatch):
    params = tmp_path / "params.yaml"
    write_params(compose(), params)
    monkeypatch.chdir(REPO)
    cfg = load_params(params, stage="prepare")
    assert cfg.data.prepare.image_size == compose().data.prepare.image_size
    with pytest.raises(ConfigAttributeError, match="model"):
        _ = cfg.model  # not declared by prepare in dvc.yaml
    with pytest.raises(ConfigError, match="no stage 'nope'"):
        load_params(params, stage="nope")


def test_the_pipeline_sweep_prunes_within_its_trials_and_tolerates_a_failure():
    """The sweep stage's own sweeper settings, over the search space's shared defaults: the
    pruner starts before the last trial, and one failed trial does not abort the stage."""
    params = compose()
    overrides = [f"hydra.sweeper.{key}={value}" for key, value in params.sweep.sweeper.items()]
    swept = hydra_compose_sweeper(
        [
            "hparams_search=cnn_optuna",
            f"hydra.sweeper.n_trials={params.sweep.n_trials}",
            *overrides,
        ]
    )
    assert swept.pruner.n_startup_trials < swept.n_trials
    assert swept.pruner.n_warmup_steps < params.sweep.max_epochs - 1
    assert swept.max_failure_rate * swept.n_trials >= 1  # the study allows int(rate * n) failures


def hydra_compose_sweeper(overrides: list[str]):
    """``hydra.sweeper`` as a multirun with ``overrides`` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR.resolve()), version_base="1.3"):
        return hydra_compose("config", overrides=overrides, return_hydra_config=True).hydra.sweeper
