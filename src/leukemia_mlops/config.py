"""One source of truth for configuration.

``conf/`` (Hydra) holds every default and option group. ``params.yaml`` is the config that
the DVC pipeline runs with: ``conf/`` composed and resolved, written by ``lmo-params`` and by
``dvc exp run`` (DVC's Hydra composition, enabled in ``.dvc/config``), byte for byte alike.
Stages read ``params.yaml``, so DVC tracks exactly the values a stage runs with; Hydra entry
points compose ``conf/`` directly. Under ``dvc repro`` a stage sees only the params keys its
``dvc.yaml`` entry declares: reading any other key fails, so the declared keys are complete.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf

from leukemia_mlops.errors import ConfigError, MissingInputError
from leukemia_mlops.files import write_text

REPO_DIR = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_DIR / "conf"
PARAMS_FILE = Path("params.yaml")
DVC_FILE = Path("dvc.yaml")
_MISSING = object()
T = TypeVar("T")


def compose(
    overrides: Sequence[str] = (), config_name: str = "config", config_dir: str | Path = CONF_DIR
) -> DictConfig:
    """Compose ``conf/`` with Hydra overrides, as ``python -m leukemia_mlops.train`` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def to_params_yaml(cfg: DictConfig) -> str:
    """The resolved YAML text of a composed config, as ``dvc exp run`` writes ``params.yaml``."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def write_params(cfg: DictConfig, path: str | Path = PARAMS_FILE) -> bool:
    """Write ``params.yaml`` if its content changed; returns whether it was written."""
    path = Path(path)
    text = to_params_yaml(cfg)
    if path.exists() and path.read_text() == text:
        return False
    write_text(path, text)
    return True


def load_params(
    path: str | Path = PARAMS_FILE, overrides: Sequence[str] = (), stage: str | None = None
) -> DictConfig:
    """Read ``params.yaml`` and apply ``key=value`` overrides on top.

    ``stage`` (default: ``$DVC_STAGE``, which ``dvc repro`` sets) keeps only the keys that
    stage declares in ``dvc.yaml``, closed (struct mode): a stage that reads an undeclared key
    fails at once instead of running with a value DVC does not track.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path} not found: run `lmo-params` (or `make params`) first")
    cfg = OmegaConf.load(path)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    stage = stage or os.environ.get("DVC_STAGE")
    if stage and DVC_FILE.is_file():
        cfg = select_keys(cfg, stage_params(stage))
    return cfg


def dvc_stage(stage: str, dvc_file: str | Path = DVC_FILE) -> dict:
    """A stage's entry in ``dvc.yaml``."""
    stages = yaml.safe_load(Path(dvc_file).read_text()).get("stages", {})
    if stage not in stages:
        raise ConfigError(f"no stage {stage!r} in {dvc_file}")
    return stages[stage]


def stage_deps(stage: str, dvc_file: str | Path = DVC_FILE) -> list[str]:
    """The paths a stage of ``dvc.yaml`` depends on."""
    return [str(dep) for dep in dvc_stage(stage, dvc_file).get("deps", [])]


def stage_outs(stage: str, dvc_file: str | Path = DVC_FILE) -> list[str]:
    """The paths a stage of ``dvc.yaml`` writes (an entry with settings is named by its key)."""
    outs = dvc_stage(stage, dvc_file).get("outs", [])
    return [out if isinstance(out, str) else next(iter(out)) for out in outs]


def stage_params(stage: str, dvc_file: str | Path = DVC_FILE) -> list[str]:
    """The ``params.yaml`` keys that a stage of ``dvc.yaml`` declares."""
    keys: list[str] = []
    for entry in dvc_stage(stage, dvc_file).get("params", []):
        if isinstance(entry, str):
            keys.append(entry)
        else:  # {other_file: [keys]}: only params.yaml feeds the stage config
            keys.extend(entry.get(str(PARAMS_FILE), []))
    return keys


def select_keys(cfg: DictConfig, keys: Sequence[str]) -> DictConfig:
    """A closed (struct) config holding only the dotted ``keys`` of ``cfg``."""
    selected = OmegaConf.create()
    for key in keys:
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is _MISSING:
            raise ConfigError(
                f"params key {key!r} is declared in {DVC_FILE} but not in params.yaml"
            )
        OmegaConf.update(selected, key, value, force_add=True)
    OmegaConf.set_struct(selected, True)
    return selected


def build_spec(spec_type: type[T], node: DictConfig, key: str) -> T:
    """Build a dataclass spec from a config node; a bad key or value is a one-line ValueError."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(spec_type), node)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        reason = str(err).splitlines()[0]
        field = getattr(err, "full_key", None)
        raise ConfigError(
            f"bad config value {key}.{field}: {reason}"
            if field
            else f"bad config value under {key}: {reason}"
        ) from None
    except ValueError as err:
        raise ConfigError(f"bad config value under {key}: {err}") from None
