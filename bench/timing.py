"""Shared timing: a batch clock that skips warm-up, stops on a time budget and splits phases.

Every speed figure in the benchmarks comes from :class:`BatchClock`, so warm-up, stopping and
the images/s arithmetic are the same for the measured stage and its baseline.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Rate:
    """Items processed in a measured window, and the seconds spent in named phases of it."""

    items: int
    seconds: float
    batches: int
    phases: dict[str, float] = field(default_factory=dict)
    first_s: float = 0.0  # the first (warm-up) batch: compilation, caches, workers starting

    @property
    def per_s(self) -> float:
        return self.items / self.seconds

    def share(self, *names: str) -> float:
        """Fraction of the window's wall time spent in the named phases."""
        return sum(self.phases.get(name, 0.0) for name in names) / self.seconds

    def as_dict(self) -> dict:
        return {
            "items": self.items,
            "seconds": self.seconds,
            "batches": self.batches,
            "per_s": self.per_s,
            "phases": self.phases,
            "first_s": self.first_s,
        }


class BatchClock:
    """Times batches after ``warmup`` ones, until ``budget_s`` seconds have been measured.

    ``tick(items)`` ends a batch and says whether to stop. The window runs from the end of the
    last warm-up batch to the end of the last batch, so waiting for data counts. The first
    batch is never measured (``torch.compile`` compiles in it, loader workers start); a later
    warm-up batch slower than the budget itself is measured instead, since another such batch
    would only double a long run.
    ``enter``/``exit`` time phases inside a batch (forward, backward, ...).
    """

    def __init__(self, warmup: int, budget_s: float, min_batches: int = 1):
        self.warmup, self.budget_s, self.min_batches = warmup, budget_s, min_batches
        self._seen = 0
        self._started = 0.0
        self._first_s = 0.0
        self._last = 0.0
        self._window_start: float | None = None
        self._items = 0
        self._batches = 0
        self._open: dict[str, float] = {}
        self._pending: dict[str, float] = defaultdict(float)
        self._phases: dict[str, float] = defaultdict(float)

    def start(self) -> None:
        """Call just before the first batch is requested."""
        self._started = self._last = time.perf_counter()

    def enter(self, phase: str) -> None:
        self._open[phase] = time.perf_counter()

    def exit(self, phase: str) -> None:
        self._pending[phase] += time.perf_counter() - self._open.pop(phase)

    def tick(self, items: int) -> bool:
        """End a batch of ``items``; True once enough has been measured."""
        now = time.perf_counter()
        self._seen += 1
        if self._seen == 1:
            self._first_s = now - self._started
        if self._window_start is None and (
            self._seen > max(1, self.warmup)
            or (self._seen > 1 and now - self._last > self.budget_s)
        ):
            self._window_start = self._last
        self._last = now
        if self._window_start is not None:
            self._items += items
            self._batches += 1
            for phase, seconds in self._pending.items():
                self._phases[phase] += seconds
        self._pending.clear()
        if self._window_start is None:
            return False
        return self._batches >= self.min_batches and now - self._window_start >= self.budget_s

    def rate(self) -> Rate:
        if self._window_start is None or self._batches == 0:
            raise RuntimeError("nothing was measured: the run ended during warm-up")
        seconds = self._last - self._window_start
        return Rate(self._items, seconds, self._batches, dict(self._phases), self._first_s)


def endless(batches: Iterable[T]) -> Iterator[T]:
    """Iterate ``batches`` (a DataLoader) again and again, for clocks that outlast an epoch."""
    while True:
        yield from batches


def rate_of(call: Callable[[], int], clock: BatchClock) -> Rate:
    """Call ``call`` (which returns the items it processed) until ``clock`` has measured enough."""
    clock.start()
    while not clock.tick(call()):
        pass
    return clock.rate()


@dataclass(frozen=True)
class Spread:
    """A figure measured in several rounds: its median, lowest and highest value."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def as_dict(self) -> dict:
        return {"median": self.median, "min": self.low, "max": self.high, "values": self.values}


def alternating_rounds(
    calls: dict[str, Callable[[], int]], rounds: int, round_s: float
) -> dict[str, Spread]:
    """Items/s of each call in each of ``rounds`` rounds, the calls taking turns.

    Every call (which returns the items it processed) runs once to warm up; then, round after
    round, each one runs again and again for at least ``round_s`` seconds, so that a passing
    slowdown of a shared machine cannot fall on one of them alone.
    """
    for call in calls.values():
        call()
    rates: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            items, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < round_s or not items:
                items += call()
            rates[name].append(items / elapsed)
    return {name: Spread(tuple(values)) for name, values in rates.items()}


def stopwatch(call: Callable[[], T]) -> tuple[T, float]:
    """``call()``'s result and its wall time in seconds, for one-pass stages."""
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start
