"""One source of truth: params.yaml is conf/ composed and resolved."""

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from leukemia_mlops.config import build_spec, compose, to_params_yaml, write_params
from leukemia_mlops.data.prepare import PrepareSpec

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
