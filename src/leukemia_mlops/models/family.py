"""Which :class:`FineTunedModule` class a checkpoint or a config names, read without weights."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import get_class

from leukemia_mlops.errors import ConfigError
from leukemia_mlops.models.base import CLASS_KEY, FineTunedModule
from leukemia_mlops.models.classifier import CellClassifier
from leukemia_mlops.models.detector import YoloDetector


def module_class(target: object, where: str = "model._target_") -> type[FineTunedModule]:
    """The :class:`FineTunedModule` subclass ``target`` (a ``_target_``) names; ``where`` it
    was read from goes into the ConfigError of any other value."""
    try:
        found = get_class(str(target))
    except Exception:  # Hydra raises a bare Exception for a class it cannot import
        raise ConfigError(f"{where} is not a model class: {target!r}") from None
    if not (isinstance(found, type) and issubclass(found, FineTunedModule)):
        raise ConfigError(f"{where} {target!r} is not a FineTunedModule")
    return found


def checkpoint_class(checkpoint: str | Path) -> type[FineTunedModule]:
    """The module class of a Lightning checkpoint: its hyperparameters' ``_target_``, read
    safely (``weights_only``, memory-mapped: the weights are not read)."""
    hparams = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get(
        "hyper_parameters", {}
    )
    if CLASS_KEY not in hparams:  # written before checkpoints named their class
        return YoloDetector if "variant" in hparams else CellClassifier
    return module_class(hparams[CLASS_KEY], f"{checkpoint}'s {CLASS_KEY}")
