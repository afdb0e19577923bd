"""One source of truth for configuration.

``conf/`` (Hydra) holds every default and option group. ``params.yaml`` is the config that
the DVC pipeline runs with: ``conf/`` composed and resolved, written by ``lmo-params`` (and by
``dvc exp run``, whose Hydra composition does the same). Stages read ``params.yaml``, so DVC
tracks exactly the values a stage runs with; Hydra entry points compose ``conf/`` directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
PARAMS_FILE = Path("params.yaml")
T = TypeVar("T")


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose ``conf/`` with Hydra overrides, as ``python -m leukemia_mlops.train`` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


PARAMS_HEADER = "# Generated from conf/ by `make params` (lmo-params): edit conf/, not this file.\n"


def to_params_yaml(cfg: DictConfig) -> str:
    """The resolved YAML text of a composed config, as stored in ``params.yaml``."""
    return PARAMS_HEADER + OmegaConf.to_yaml(cfg, resolve=True)


def write_params(cfg: DictConfig, path: str | Path = PARAMS_FILE) -> bool:
    """Write ``params.yaml`` if its content changed; returns whether it was written."""
    path = Path(path)
    text = to_params_yaml(cfg)
    if path.exists() and path.read_text() == text:
        return False
    path.write_text(text)
    return True


def load_params(path: str | Path = PARAMS_FILE, overrides: Sequence[str] = ()) -> DictConfig:
    """Read ``params.yaml`` and apply ``key=value`` overrides on top."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `lmo-params` (or `make params`) first")
    cfg = OmegaConf.load(path)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return cfg


def build_spec(spec_type: type[T], node: DictConfig, key: str) -> T:
    """Build a dataclass spec from a config node; a bad key or value is a one-line ValueError."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(spec_type), node)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        reason = str(err).splitlines()[0]
        field = getattr(err, "full_key", None)
        raise ValueError(
            f"bad config value {key}.{field}: {reason}"
            if field
            else f"bad config value under {key}: {reason}"
        ) from None
    except ValueError as err:
        raise ValueError(f"bad config value under {key}: {err}") from None
