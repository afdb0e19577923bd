"""Hydra's sweep syntax as Optuna distributions, so search spaces read like any Hydra sweep.

``hydra.sweeper.params`` entries and command-line overrides share one syntax:

- ``choice(a, b, c)`` or ``a,b,c`` (also ``glob(...)`` for config groups): categorical;
- ``interval(a, b)``: uniform float in [a, b]; ``tag(log, interval(a, b))``: log-uniform;
- ``int(interval(a, b))``: integer in [a, b], both ends included (Optuna's convention);
- ``range(start, stop[, step])``: the range's values (stop excluded, as in Python), as an
  integer or a stepped float distribution; ``tag(log, range(...))`` when the step is 1;
- anything else (``key=value``, ``+key=value``, ``~key``): a fixed override of every trial.

A mistake (unknown function, empty choice, low > high, unknown tag, a key that is not in the
config, an option a config group lacks) is a one-line :class:`SearchSpaceError`, a
``ValueError`` naming the key.
"""

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hydra.core.config_loader import ConfigLoader
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    QuotedString,
    RangeSweep,
    Sweep,
    Transformer,
)
from hydra.errors import CompactHydraException, OverrideParseException
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

LOG_TAG = "log"
log = logging.getLogger(__name__)


class SearchSpaceError(ValueError, CompactHydraException):
    """A bad search space; Hydra prints it as one line."""


@dataclass(frozen=True)
class SearchSpace:
    """The fixed overrides of every trial and the distributions its swept keys sample from.

    Distributions are keyed by the override key (``model``, ``+foo.bar``, ...), which is also
    the Optuna parameter name. ``labels`` map a categorical value back to its override text.
    """

    fixed: tuple[str, ...] = ()
    distributions: Mapping[str, "BaseDistribution"] = field(default_factory=dict)
    labels: Mapping[str, Mapping[Any, str]] = field(default_factory=dict)

    @classmethod
    def from_overrides(cls, overrides: Iterable[Override]) -> "SearchSpace":
        fixed, distributions, labels = [], {}, {}
        for override in overrides:
            if not override.is_sweep_override():
                fixed.append(override.input_line)
                continue
            key = override.get_key_element()
            try:
                distributions[key], choice_labels = _distribution(override)
            except ValueError as err:
                raise SearchSpaceError(f"search space {override.input_line}: {err}") from None
            if choice_labels is not None:
                labels[key] = choice_labels
        return cls(tuple(fixed), distributions, labels)

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        """The override strings that set the swept keys to the sampled ``params``."""
        return [f"{key}={self._text(key, value)}" for key, value in params.items()]

    def _text(self, key: str, value: Any) -> str:
        labels = self.labels.get(key)
        return labels[value] if labels is not None else Transformer.str(value)


def parse_overrides(
    lines: Sequence[str], config_loader: ConfigLoader | None = None
) -> list[Override]:
    """Parse ``key=value`` lines; a later line for the same key replaces an earlier one."""
    parser = OverridesParser.create(config_loader=config_loader)
    parsed: dict[tuple[str, str | None], Override] = {}
    for line in lines:
        try:
            (override,) = parser.parse_overrides([line])
        except OverrideParseException as err:
            reason = str(err).splitlines()
            key = line.split("=", 1)[0]
            raise SearchSpaceError(
                f"search space {key}: {reason[1] if len(reason) > 1 else reason[0]}"
            ) from None
        parsed.pop((override.key_or_group, override.package), None)
        parsed[(override.key_or_group, override.package)] = override
    return list(parsed.values())


def check_keys(
    overrides: Iterable[Override],
    config: DictConfig,
    group_options: Callable[[str], Sequence[str]],
) -> None:
    """Fail on a key that is neither in ``config`` nor a config group (``+key`` adds one), and
    on a config-group option that does not exist, before a trial is spent on them."""
    for override in overrides:
        key = override.key_or_group
        options = group_options(key)
        if options:
            unknown = [v for v in _values(override) if isinstance(v, str) and v not in options]
            if unknown:
                raise SearchSpaceError(
                    f"search space {override.input_line}: config group {key} has no option "
                    f"{unknown[0]!r} (options: {', '.join(sorted(options))})"
                )
        elif not (override.is_add() or override.is_force_add()) and not _has_key(config, key):
            raise SearchSpaceError(
                f"search space {override.input_line}: {key} is not in the config "
                f"(misspelt? +{key}=... adds a new key)"
            )


def _distribution(override: Override) -> tuple["BaseDistribution", dict[Any, str] | None]:
    """The Optuna distribution of one sweep, and the labels of a categorical one."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    sweep = override.value()
    if override.is_choice_sweep():
        if isinstance(sweep, Sweep) and sweep.tags:
            raise ValueError("tags apply to interval() and range(), not to choices")
        labels = {_plain(element): Transformer.str(element) for element in _values(override)}
        return CategoricalDistribution(list(labels)), labels
    log = _log_tag(sweep)
    if isinstance(sweep, RangeSweep):
        values = list(sweep.range())
        if not values:
            raise ValueError("the range is empty")
        low, high, step = min(values), max(values), abs(sweep.step)
        if all(isinstance(v, int) for v in (*values, step)):
            return IntDistribution(low, high, log=log, step=step), None
        return FloatDistribution(low, high, log=log, step=float(step)), None
    assert isinstance(sweep, IntervalSweep)
    if isinstance(sweep.start, int) and isinstance(sweep.end, int):
        return IntDistribution(sweep.start, sweep.end, log=log), None
    return FloatDistribution(float(sweep.start), float(sweep.end), log=log), None


def _log_tag(sweep: Sweep) -> bool:
    unknown = sorted(sweep.tags - {LOG_TAG})
    if unknown:
        raise ValueError(f"unknown tag {unknown[0]!r} (only {LOG_TAG!r} is supported)")
    return LOG_TAG in sweep.tags


def _values(override: Override) -> list[Any]:
    """The values an override can take: a choice's elements, a glob's matches or its value."""
    value = override.value()
    if isinstance(value, ChoiceSweep):
        return list(value.list)
    if override.is_choice_sweep():  # a glob over a config group
        return list(override.sweep_iterator())
    if isinstance(value, RangeSweep | IntervalSweep):
        return []
    return [value]


def _plain(element: Any) -> Any:
    """A choice element as an Optuna categorical value (None, bool, int, float or str)."""
    if element is None or isinstance(element, bool | int | float | str):
        return element
    if isinstance(element, QuotedString):
        return element.text
    return Transformer.str(element)  # lists and dicts: their override text


def _has_key(config: DictConfig, key: str) -> bool:
    """Whether ``key`` exists in ``config``, whatever its value (``???`` included)."""
    parent_key, _, leaf = key.rpartition(".")
    parent = (
        OmegaConf.select(config, parent_key, throw_on_resolution_failure=False)
        if parent_key
        else config
    )
    # `leaf in parent` is False for a ??? value, which is still a key of the config.
    return isinstance(parent, DictConfig) and leaf in parent.keys()  # noqa: SIM118


def build_space(lines: Sequence[str], loader: ConfigLoader, config: DictConfig) -> SearchSpace:
    """The search space of ``lines`` (sweep syntax), its keys checked against ``config``."""
    overrides = parse_overrides(lines, loader)
    config_name = config.hydra.job.config_name
    search_path = list(config.hydra.overrides.hydra)  # hydra.searchpath among them

    def group_options(group: str) -> list[str]:
        return loader.get_group_options(group, config_name=config_name, overrides=search_path)

    check_keys(overrides, config, group_options)
    space = SearchSpace.from_overrides(overrides)
    if not space.distributions:
        raise SearchSpaceError("the search space is empty: set hydra.sweeper.params")
    return space


def swept_values(
    loader: ConfigLoader, config: DictConfig, space: SearchSpace, overrides: list[str]
) -> dict[str, Any] | None:
    """The swept keys of the config a trial's ``overrides`` compose, as one nested mapping (a
    swept config group contributes its whole node); None if it no longer composes."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        composed = loader.load_sweep_config(config, [*space.fixed, *overrides])
    except (HydraException, OmegaConfBaseException) as err:
        log.warning("cannot compose the best trial's config: %s", err)
        return None
    nested = OmegaConf.create()
    for override in parse_overrides(overrides):
        value = OmegaConf.select(composed, override.key_or_group)
        if isinstance(value, DictConfig):
            value = OmegaConf.to_container(value, resolve=True)
        OmegaConf.update(nested, override.key_or_group, value, force_add=True)
    return OmegaConf.to_container(nested)
