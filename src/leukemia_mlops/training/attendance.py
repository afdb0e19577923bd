"""Which ranks of a running job are still there, wherever their hosts are.

A collective that fails tells a rank only that some peer is gone: gloo's error reads the same
whether a peer was killed, lost its host or failed with a bug, and a rank that fails with a bug
cannot tell either whether its error is its own. So while a job trains (:func:`attended`), each
rank answers roll calls from a thread of its own (:class:`Attendance`), also while its training
waits in a collective, and a rank that leaves training says why in the job's store.

A rank whose training fails calls the roll. If every other rank answers, the failure is its
own: it leaves its error there for the others and raises it. Otherwise it stops with a
:class:`JobError` that names the ranks that left an error of their own and those that said
nothing within :data:`SILENCE_S` (killed, or their host lost). Rank 0 hosts the store the roll
is called in: a rank that finds it gone names rank 0. A preempted job calls no roll: every rank
stops at the same batch (:mod:`~leukemia_mlops.training.preemption`).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta

import torch.distributed as dist

from leukemia_mlops.errors import ProjectError, first_line
from leukemia_mlops.training.preemption import Preempted

#: How long a rank that calls the roll waits for a rank that neither answers nor said why it
#: left. A live rank answers within :data:`POLL_S` (its thread runs while training waits).
SILENCE_S = 10.0
POLL_S = 0.1
_CALLS = "calls"  # how many roll calls were made; call N's answers are "here/N/<rank>"


class JobError(ProjectError):
    """A rank of a multi-process job that never joined or that ended: the job stops."""


class Attendance:
    """One rank's part in its job's roll calls, kept in ``store`` (rank 0 hosts it)."""

    def __init__(
        self, store: dist.Store, rank: int, world: int, silence_s: float = SILENCE_S
    ) -> None:
        self.store, self.rank, self.world, self.silence_s = store, rank, world, silence_s
        self._stop = threading.Event()
        self._answering = threading.Thread(target=self._answer, name="roll-call", daemon=True)

    def start(self) -> None:
        """Answer every roll call from now until :meth:`leave`."""
        self._answering.start()

    def leave(self, why: str = "") -> None:
        """Stop answering and tell the others why this rank left (``""``: not for an error of
        its own: it finished, or another rank ended)."""
        self._stop.set()
        self._answering.join()
        with suppress(dist.DistError):  # rank 0 and its store are gone: no one is left to read
            self.store.set(f"left/{self.rank}", why)

    def _answer(self) -> None:
        answered = 0
        while not self._stop.wait(POLL_S):
            try:
                called = self.store.add(_CALLS, 0)
                for call in range(answered + 1, called + 1):
                    self.store.set(f"here/{call}/{self.rank}", "")
            except dist.DistError:
                return  # rank 0 ended, and its store with it
            answered = called

    def lost(self) -> dict[int, str]:
        """The other ranks that left, each with its own error (``""``: it said nothing)."""
        others = set(range(self.world)) - {self.rank}
        lost: dict[int, str] = {}
        try:
            call = self.store.add(_CALLS, 1)
            deadline = time.monotonic() + self.silence_s
            while others and time.monotonic() < deadline:
                for rank in sorted(others):
                    if self.store.check([f"here/{call}/{rank}"]):
                        others.discard(rank)
                    elif self.store.check([f"left/{rank}"]):
                        others.discard(rank)
                        why = self.store.get(f"left/{rank}").decode()
                        lost.update({rank: why} if why else {})
                if others:
                    time.sleep(POLL_S)
        except dist.DistError:
            return {**lost, 0: ""}  # rank 0 ended, and the store it hosted with it
        return {**lost, **dict.fromkeys(others, "")}

    def causes(self, lost: dict[int, str]) -> str:
        """What :meth:`lost` knows of each rank that left."""
        silent = f"no word within {self.silence_s:g} s (killed, or its host lost)"
        return "; ".join(f"rank {rank}: {why or silent}" for rank, why in sorted(lost.items()))

    def await_others(self, named: dict[int, str]) -> None:
        """Keep rank 0's store up until the ranks it did not name have left (at most
        ``silence_s``), so that each can still call the roll."""
        if self.rank != 0:
            return
        staying = [f"left/{r}" for r in range(1, self.world) if r not in named]
        with suppress(dist.DistError):  # a rank that neither left nor answered: its peers name it
            self.store.wait(staying, timedelta(seconds=self.silence_s))


@contextmanager
def attended(attendance: Attendance | None) -> Iterator[None]:
    """Train under roll calls (none outside a job whose ranks joined), and leave them after:
    a failure that a rank which left caused stops this rank with a :class:`JobError` naming
    that rank. ``attendance`` has started answering."""
    if attendance is None:
        yield
        return
    try:
        yield
    except Preempted:  # every rank stops at the same batch: no rank was lost
        attendance.leave()
        raise
    except Exception as err:
        with _sigterm_held():
            lost = attendance.lost()
        if not lost:  # every other rank answered: the failure is this rank's own
            attendance.leave(f"{type(err).__name__}: {first_line(err)}")
            raise
        attendance.leave()
        attendance.await_others(lost)
        raise JobError(
            f"rank {attendance.rank}: rank(s) {', '.join(map(str, sorted(lost)))} ended during "
            f"training ({attendance.causes(lost)}; here: {first_line(err)})"
        ) from err
    attendance.leave()


@contextmanager
def _sigterm_held() -> Iterator[None]:
    """Hold SIGTERM back while the roll is called (at most ``silence_s``): a launcher that learned
    of the same loss (torchrun's agent, whose node lost its store) stops this rank with it, and
    would before it names the rank that ended. The rank ends right after, signalled or not."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
