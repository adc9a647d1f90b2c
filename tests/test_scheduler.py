"""The sweep and retry scheduler on its own (pgpubsub.scheduler): what becomes wanted when, what
the listener's wait is told, and the waits of a database that lacks pgpubsub's migrations. A
clock the test moves stands for time.monotonic(); no database, no threads."""

from __future__ import annotations

import itertools

import pytest

from pgpubsub.scheduler import (
    MAX_SCHEMA_RETRY_DELAY,
    MIN_SCHEMA_RETRY_DELAY,
    RETRY_MARGIN,
    Scheduler,
)


class A:  # stand-ins for channel classes: the scheduler only keeps and returns them
    pass


class B:
    pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def wakes():
    return []


def scheduler(clock, wakes, lockable=(A, B), interval=10.0) -> Scheduler:
    return Scheduler(lockable, interval, lambda: wakes.append(clock.now), clock)


def taken(sched: Scheduler, room: int = 100) -> list:
    started = []

    def offer(channel):
        if len(started) >= room:
            return False
        started.append(channel)
        return True

    sched.take(offer)
    return started


def test_a_look_for_due_rows_is_wanted_each_interval_with_jitter(clock, wakes):
    sched = scheduler(clock, wakes)
    first = sched.tick()
    assert clock.now + 8.0 <= first <= clock.now + 10.0  # 0.8 to 1 interval
    assert not sched.take_look()
    clock.now = first
    following = sched.tick()
    assert sched.take_look()  # the listener looks which channels have due rows
    assert not sched.take_look()  # once
    assert taken(sched) == []  # and sweeps only those
    assert clock.now + 8.0 <= following <= clock.now + 10.0


def test_wanting_every_channel_swept_asks_for_a_look_and_wakes_the_listener(clock, wakes):
    sched = scheduler(clock, wakes)
    sched.want_all()
    assert wakes == [clock.now]
    assert sched.take_look()
    assert taken(sched) == []
    assert not sched.take_look()
    scheduler(clock, wakes, lockable=()).want_all()  # nothing lockable: nothing to look for
    assert wakes == [clock.now]


def test_without_lockable_channels_nothing_is_ever_due(clock, wakes):
    sched = scheduler(clock, wakes, lockable=())
    assert sched.tick() == float("inf")
    clock.now += 10_000
    sched.tick()
    assert taken(sched) == []
    assert not sched.take_look()


def test_a_wanted_sweep_wakes_the_listener_and_starts_once(clock, wakes):
    sched = scheduler(clock, wakes)
    sched.want_sweep([A])
    assert wakes == [clock.now]
    assert sched.is_wanted(A) and sched.waiting()
    assert taken(sched) == [A]
    assert not sched.is_wanted(A) and not sched.waiting()
    # Wanted again while it runs: it waits for the running one to end.
    sched.want_sweep([A])
    assert sched.is_wanted(A) and not sched.waiting()
    assert taken(sched) == []
    sched.sweep_ended(A)
    assert sched.waiting()
    assert taken(sched) == [A]


def test_sweeps_without_room_stay_wanted(clock, wakes):
    sched = scheduler(clock, wakes)
    sched.want_sweep([A, B])
    assert len(taken(sched, room=1)) == 1
    assert sched.waiting()
    assert len(taken(sched, room=1)) == 1
    assert not sched.waiting()


def test_a_retry_sweeps_its_channel_when_it_is_due(clock, wakes):
    sched = scheduler(clock, wakes)
    periodic = sched.tick()
    sched.retry_in(A, 2.0)
    assert wakes == [clock.now]  # sooner than anything the listener waits for
    assert sched.tick() == pytest.approx(clock.now + 2.0 + RETRY_MARGIN)
    clock.now += 2.0
    sched.tick()
    assert taken(sched) == []  # the margin: the row must be due when swept
    clock.now += RETRY_MARGIN
    assert sched.tick() == periodic
    assert taken(sched) == [A]


def test_a_later_retry_does_not_wake_the_listener_but_every_due_time_is_kept(clock, wakes):
    sched = scheduler(clock, wakes)
    sched.retry_in(A, 1.0)
    sched.retry_in(B, 3.0)
    sched.retry_in(A, 5.0)
    assert wakes == [clock.now]
    clock.now += 1.0 + RETRY_MARGIN
    sched.tick()
    assert taken(sched) == [A]
    sched.sweep_ended(A)
    clock.now += 2.0
    sched.tick()
    assert taken(sched) == [B]
    clock.now += 2.0
    sched.tick()
    assert taken(sched) == [A]


def test_a_database_behind_waits_doubling_then_is_checked_then_ready(clock, wakes):
    sched = scheduler(clock, wakes, interval=1e9)  # no periodic sweep meanwhile
    assert sched.schema_state("default", A) == "ready"
    pauses = []
    pause = sched.schema_behind("default", A)
    pauses.append(pause)
    assert MIN_SCHEMA_RETRY_DELAY * 0.8 <= pause <= MIN_SCHEMA_RETRY_DELAY
    assert wakes  # the listener's wait must end with the pause
    # Said once a pause: a second channel meeting it in the same pause says nothing.
    assert sched.schema_behind("default", B) is None
    assert sched.schema_state("default", A) == "wait"
    assert sched.schema_state("other", A) == "ready"  # another database goes on
    waiting = {A, B}  # the channels that met the table behind in this pause
    for _ in range(8):
        clock.now += pauses[-1] - 0.01
        sched.tick()
        assert taken(sched) == []
        clock.now += 0.02
        sched.tick()
        assert set(taken(sched)) == waiting  # swept once the pause ends: they find out
        for channel in waiting:
            sched.sweep_ended(channel)
        waiting = {A}
        assert sched.schema_state("default", A) == "check"
        pauses.append(sched.schema_behind("default", A))
    assert all(
        b >= a * 1.5 or b >= MAX_SCHEMA_RETRY_DELAY * 0.8 for a, b in itertools.pairwise(pauses)
    )
    assert max(pauses) <= MAX_SCHEMA_RETRY_DELAY
    clock.now += pauses[-1]
    sched.tick()
    assert sched.schema_state("default", A) == "check"
    assert sched.schema_migrated("default")
    assert sched.schema_state("default", A) == "ready"
    assert not sched.schema_migrated("default")
