"""Fault injection with real processes: while 10,000 lockable messages are processed, a
tester terminates the listeners' LISTEN and worker sessions at random, SIGKILLs a process
that is then started again, and callbacks fail on their first attempt (5%) or always (0.2%).

At the end every message's effect exists exactly once (``Effect.key`` is unique: a message
processed twice would fail its second time and be left stored), and the only stored rows
are the permanent failures, marked failed with their error.

The tester's random choices (the pauses between terminations, which session, which kind) come
from a seed printed at the start of each test (``chaos seed: <n>``, in the captured output
pytest shows for a failed test). ``PGPUBSUB_CHAOS_SEED=<n>`` replays those choices; the
processes' own timing still differs from run to run, so a replayed failure is likely, not
certain.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from collections import Counter

import pytest
from django.db import connection, connections, transaction
from django.db.models import Count

import pgpubsub
from pgpubsub.models import Notification
from tests.processes import LISTEN_SESSION, ServerProcess, outputs, wait_for
from tests.test_embedded import GUNICORN_WORKERS, gunicorn
from tests.testapp import channels
from tests.testapp.models import Effect, Marker

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = 10_000
PER_TRANSACTION = 250
#: Seconds between two sessions terminated by the tester (on average).
KILL_EVERY = 0.25
#: Environment of every listening process: sweeps come often, so that the rows of a killed
#: process or a missed NOTIFY do not wait long.
ENV = {"PGPUBSUB_TEST_SWEEP_INTERVAL": "2", "PGPUBSUB_TEST_WORKERS": "4"}
#: The environment variable that replays a run's random choices: the seed it printed.
SEED_VARIABLE = "PGPUBSUB_CHAOS_SEED"


def kind(number: int) -> str:
    if number % 500 == 7:
        return "always"  # 20 messages: permanent failures
    return "once" if number % 20 == 0 else ""  # 500 messages fail their first attempt


PERMANENT = {f"chaos-{n}" for n in range(MESSAGES) if kind(n) == "always"}
ONCE = {f"chaos-{n}" for n in range(MESSAGES) if kind(n) == "once"}


def produce() -> None:
    for start in range(0, MESSAGES, PER_TRANSACTION):
        with transaction.atomic():
            for number in range(start, start + PER_TRANSACTION):
                pgpubsub.notify(channels.ChaosJob, key=f"chaos-{number}", fail=kind(number))


@pytest.fixture
def chaos_random(request) -> random.Random:
    """The tester's source of random choices: seeded from PGPUBSUB_CHAOS_SEED, else anew; the
    seed is printed, so that a failed test's report shows it."""
    given = os.environ.get(SEED_VARIABLE, "").strip()
    if given:
        try:
            seed = int(given)
        except ValueError:
            pytest.fail(f"{SEED_VARIABLE} must be an integer (a seed a run printed), not {given!r}")
    else:
        seed = random.SystemRandom().randrange(2**32)
    print(
        f"chaos seed: {seed} (replay: {SEED_VARIABLE}={seed} python -m pytest {request.node.nodeid})"
    )
    return random.Random(seed)


class Terminator(threading.Thread):
    """Terminates a random database session of the servers' (never the test's own) every
    ``KILL_EVERY`` seconds on average, until stopped: every ``LISTEN_EVERY``-th a LISTEN
    session, the others worker sessions (either kind when the other has none), so that both
    kinds are cut however few sessions a run gives it time for."""

    LISTEN_EVERY = 3

    def __init__(self, names: list[str], choices: random.Random) -> None:
        super().__init__(name="chaos-terminator", daemon=True)
        self.names = names
        self.choices = choices
        self.stopping = threading.Event()
        self.killed: Counter[str] = Counter()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopping.wait(self.choices.uniform(0, 2 * KILL_EVERY)):
                with connection.cursor() as cursor:
                    cursor.execute(
                        f"SELECT pid, {LISTEN_SESSION} FROM pg_stat_activity "
                        "WHERE datname = current_database() AND application_name = ANY(%s)",
                        [list(self.names)],
                    )
                    by_kind: dict[str, list[int]] = {"listen": [], "worker": []}
                    for pid, listening in cursor.fetchall():
                        by_kind["listen" if listening else "worker"].append(pid)
                    turn = sum(self.killed.values()) % self.LISTEN_EVERY == 0
                    wanted = ("listen", "worker") if turn else ("worker", "listen")
                    what = next((kind for kind in wanted if by_kind[kind]), None)
                    if what is None:
                        continue
                    cursor.execute(
                        "SELECT pg_terminate_backend(%s)", [self.choices.choice(by_kind[what])]
                    )
                self.killed[what] += 1
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            connections.close_all()

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)
        assert not self.is_alive()
        assert self.error is None, self.error


def progress() -> str:
    stored = dict(
        Notification.objects.values_list("failed_at__isnull").annotate(n=Count("id")).order_by()
    )
    return (
        f"{Effect.objects.count()} effects; stored rows: {stored.get(True, 0)} to do, "
        f"{stored.get(False, 0)} failed"
    )


def finished() -> bool:
    return (
        Effect.objects.count() == MESSAGES - len(PERMANENT)
        and Notification.objects.filter(failed_at__isnull=True).count() == 0
        and Notification.objects.count() == len(PERMANENT)
    )


def assert_outcome(servers: list[ServerProcess]) -> None:
    logs = outputs(servers)
    keys = set(Effect.objects.filter(channel="ChaosJob").values_list("key", flat=True))
    assert keys == {f"chaos-{n}" for n in range(MESSAGES)} - PERMANENT, logs
    failed = list(Notification.objects.all())
    assert {row.payload["kwargs"]["key"] for row in failed} == PERMANENT
    for row in failed:
        assert row.failed_at is not None and row.attempts == channels.ChaosJob.max_attempts
        key = row.payload["kwargs"]["key"]
        if row.last_error.startswith("ListenerProcessDied: "):
            continue  # its last attempt ran in the process the test killed, which counts it
        assert row.last_error == f"RuntimeError: chaos job {key} always fails"
        assert "in run_chaos_job" in row.last_traceback
    # Each "once" message failed its first attempt, wherever it ran.
    assert set(Marker.objects.values_list("key", flat=True)) == ONCE


def assert_cut_and_reconnected(terminator: Terminator, servers: list[ServerProcess]) -> None:
    """Sessions of both kinds were cut, and listeners reconnected by themselves."""
    assert terminator.killed["listen"] >= 2 and terminator.killed["worker"] >= 2, terminator.killed
    logs = "".join(server.output() for server in servers)
    assert "Lost the listening connection" in logs, outputs(servers)


def run_chaos(
    servers: list[ServerProcess], names: list[str], kill_one, choices: random.Random
) -> Terminator:
    """Produce while sessions are terminated (at ``choices``' random), kill a process midway
    (``kill_one()``), then wait for the outcome; returns the terminator (stopped) for its
    counts."""
    terminator = Terminator(names, choices)
    terminator.start()
    try:
        producer_done = threading.Event()

        def producer() -> None:
            try:
                produce()
            finally:
                connections.close_all()
                producer_done.set()

        thread = threading.Thread(target=producer, name="chaos-producer")
        thread.start()
        wait_for(lambda: Effect.objects.count() >= MESSAGES // 4, 60, progress)
        kill_one()
        thread.join(90)
        assert producer_done.is_set()
        # Chaos goes on a little after the last message was produced.
        wait_for(lambda: Effect.objects.count() >= MESSAGES * 3 // 4, 60, progress)
    finally:
        terminator.stop()
    wait_for(finished, 60, progress, watch=servers)
    return terminator


@pytest.mark.timeout(240)
def test_listen_processes_lose_nothing_and_do_nothing_twice(processes, chaos_random):
    listeners = [processes.start("--threads", "4", "--recover", ready=1, env=ENV) for _ in range(3)]
    names = [listener.name for listener in listeners]
    victim = listeners[0]

    def kill_one() -> None:
        victim.send(signal.SIGKILL)
        victim.wait(10)
        replacement = processes.start("--threads", "4", "--recover", ready=1, env=ENV)
        listeners.append(replacement)
        names.append(replacement.name)  # the terminator reads the list as it goes

    terminator = run_chaos(listeners[1:], names, kill_one, chaos_random)
    alive = listeners[1:]
    assert all(listener.alive for listener in alive), outputs(alive)
    assert_outcome(listeners)
    assert_cut_and_reconnected(terminator, alive)


GUNICORN_ENV = {**ENV, "PGPUBSUB_TEST_EMBEDDED": "1", "PGPUBSUB_TEST_SHUTDOWN_TIMEOUT": "5"}


@pytest.mark.timeout(240)
def test_gunicorn_workers_in_embedded_mode_lose_nothing_and_do_nothing_twice(
    processes, chaos_random
):
    server = processes.start_command(gunicorn(), ready=GUNICORN_WORKERS, env=GUNICORN_ENV)
    workers = server.children()
    assert len(workers) == GUNICORN_WORKERS

    def kill_one() -> None:
        # gunicorn's master starts a new worker, whose Runtime recovers on start.
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: (
                len(children := server.children()) == GUNICORN_WORKERS and victim not in children
            ),
            30,
            "gunicorn to replace the killed worker",
            watch=[server],
        )

    terminator = run_chaos([server], [server.name], kill_one, chaos_random)
    assert server.alive
    assert_outcome([server])
    assert_cut_and_reconnected(terminator, [server])
