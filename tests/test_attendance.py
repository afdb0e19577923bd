"""Roll calls of a job's ranks in one process: each rank an :class:`Attendance` on a real
TCPStore that "rank 0" hosts, its answering thread real. A rank that never starts answering
is one that died without a word (killed, or its host lost)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest
import torch.distributed as dist

from leukemia_mlops.training.attendance import Attendance, JobError, attended
from leukemia_mlops.training.preemption import Preempted

SILENCE_S = 5.0  # bounds the wait for a rank that never answers; live ones answer at once


@pytest.fixture
def job() -> Iterator[list[Attendance]]:
    """Three ranks of one job, all answering, rank 0's store hosting the roll."""
    host = dist.TCPStore("127.0.0.1", 0, 3, is_master=True, wait_for_workers=False)
    ranks = [
        Attendance(dist.TCPStore("127.0.0.1", host.port, 3), rank, 3, SILENCE_S)
        for rank in range(3)
    ]
    for rank in ranks:
        rank.start()
    yield ranks
    for rank in ranks:
        rank.leave()


def test_a_roll_that_every_rank_answers_names_no_one(job):
    assert job[1].lost() == {}
    assert job[2].lost() == {}  # a second call is answered too


def test_a_rank_that_left_with_its_error_is_named_with_it_at_once(job):
    job[2].leave("RuntimeError: out of memory")

    assert job[0].lost() == {2: "RuntimeError: out of memory"}
    assert (
        job[0].causes({2: "RuntimeError: out of memory"}) == "rank 2: RuntimeError: out of memory"
    )


def test_a_rank_that_finished_is_not_named(job):
    job[1].leave()

    assert job[0].lost() == {}


def test_a_rank_that_stops_answering_without_a_word_is_named_silent():
    host = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    alive = Attendance(host, 0, 2, silence_s=1.0)
    Attendance(dist.TCPStore("127.0.0.1", host.port, 2), 1, 2)  # never answers: killed

    assert alive.lost() == {1: ""}
    assert alive.causes({1: ""}) == "rank 1: no word within 1 s (killed, or its host lost)"


def test_a_rank_whose_store_host_ended_names_rank_0():
    host = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    left = Attendance(dist.TCPStore("127.0.0.1", host.port, 2), 1, 2)
    del host  # rank 0's process, and the store it hosted, ended

    assert left.lost() == {0: ""}


def test_a_failure_every_other_rank_answers_is_this_ranks_own_and_raised_as_is(job):
    own = job[1]
    with pytest.raises(RuntimeError, match=r"^a bug$"), attended(own):
        raise RuntimeError("a bug")  # gloo's errors are RuntimeErrors too

    assert job[0].lost() == {1: "RuntimeError: a bug"}  # left for the others to name


def test_a_failure_after_another_rank_left_names_that_rank(job):
    job[2].leave("ValueError: bad batch")
    survivor = job[0]
    with pytest.raises(JobError) as stopped, attended(survivor):
        raise RuntimeError("Connection closed by peer")

    assert str(stopped.value) == (
        "rank 0: rank(s) 2 ended during training (rank 2: ValueError: bad batch; "
        "here: Connection closed by peer)"
    )
    assert job[1].lost() == {2: "ValueError: bad batch"}  # the survivor is not named


def test_a_preempted_rank_leaves_without_a_roll_call_or_an_error_for_the_others(job):
    with pytest.raises(Preempted), attended(job[0]):
        raise Preempted("stopped by SIGUSR1 at epoch 1")  # every rank raises it at one batch

    assert job[0].store.add("calls", 0) == 0
    assert job[1].lost() == {}  # a rank preempted a moment later names no rank


def test_outside_a_joined_job_training_errors_pass_unchanged():
    with pytest.raises(KeyError), attended(None):
        raise KeyError("x")


def test_a_sigterm_while_the_roll_is_called_waits_until_the_lost_rank_is_named():
    host = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    survivor = Attendance(host, 0, 2, silence_s=2.0)
    survivor.start()
    Attendance(dist.TCPStore("127.0.0.1", host.port, 2), 1, 2)  # never answers: killed
    launcher = dist.TCPStore("127.0.0.1", host.port, 2)

    def stop_once_the_roll_is_called() -> None:  # as torchrun's agent stops its node's ranks
        launcher.wait(["here/1/0"])  # roll call 1 made, and answered by the survivor itself
        os.kill(os.getpid(), signal.SIGTERM)

    def terminated(*_: object) -> None:
        raise SystemExit("terminated")

    previous = signal.signal(signal.SIGTERM, terminated)
    stopper = threading.Thread(target=stop_once_the_roll_is_called)
    try:
        stopper.start()
        with (
            pytest.raises(
                JobError, match=r"^rank 0: rank\(s\) 1 ended during training \(rank 1: no word"
            ),
            attended(survivor),
        ):
            raise RuntimeError("Connection closed by peer")
        stopper.join()
        assert signal.getsignal(signal.SIGTERM) is terminated  # held back, then restored
    finally:
        signal.signal(signal.SIGTERM, previous)
