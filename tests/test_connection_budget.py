"""Acceptance tests of the connection budget: an idle Runtime holds only its LISTEN session.

Real ``manage.py listen`` and gunicorn processes run the test project with a few settings of
their own (a settings module written for the test: a short idle timeout, frequent sweeps,
pgpubsub's INFO records with the pid of the process). Each test counts the database sessions
of the process it started, found by their ``application_name`` in ``pg_stat_activity``, while
it idles, while it works and once it idles again.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import pgpubsub
from pgpubsub.connection import LISTENER_TAG
from pgpubsub.models import Notification
from tests.processes import (
    POLL_INTERVAL,
    ROOT,
    ServerProcess,
    gunicorn_command,
    outputs,
    wait_for,
)
from tests.test_embedded import create_authors, effects, stored, wait_children
from tests.testapp import channels
from tests.testapp.models import Effect

pytestmark = pytest.mark.django_db(transaction=True)

#: PGPUBSUB_IDLE_CONNECTION_TIMEOUT where a test waits for the release, in seconds.
IDLE_TIMEOUT = 1.0
#: PGPUBSUB_SWEEP_INTERVAL of the listen processes, in seconds.
SWEEP_INTERVAL = 1.0
#: Worker threads of each Runtime (PGPUBSUB_WORKERS' default).
THREADS = 2
#: Seconds an idle process is watched to hold its sessions (a few periodic sweeps).
IDLE_WATCH = 3.5
#: Seconds a Runtime may take to close idle connections beyond the idle timeout (the
#: worker's wait, a loaded box).
RELEASE_MARGIN = 10.0

SLOW_JOB = "tests.testapp.channels.SlowJob"
AUTHOR_TRIGGER = "tests.testapp.channels.AuthorTrigger"

#: gunicorn workers, each with an embedded Runtime.
GUNICORN_WORKERS = 8
#: The sessions 8 idle gunicorn workers may hold (the issue's target): one LISTEN session each,
#: and one more.
GUNICORN_BUDGET = GUNICORN_WORKERS + 1

_LISTENING = re.compile(r"^(\d+) pgpubsub\.runtime INFO Listening on ", re.MULTILINE)


def settings_env(tmp_path: Path, **settings: object) -> dict[str, str]:
    """The environment of a process whose settings are the test project's plus ``settings``,
    with pgpubsub's INFO records on stderr, each with its process id."""
    lines = ["from tests.settings import *  # noqa: F403", ""]
    lines += [f"{name} = {value!r}" for name, value in settings.items()]
    lines.append(
        "LOGGING = "
        + repr(
            {
                "version": 1,
                "disable_existing_loggers": False,
                "formatters": {"pid": {"format": "%(process)d %(name)s %(levelname)s %(message)s"}},
                "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "pid"}},
                "loggers": {"pgpubsub": {"level": "INFO", "handlers": ["stderr"]}},
            }
        )
    )
    (tmp_path / "budget_settings.py").write_text("\n".join(lines) + "\n")
    return {
        "DJANGO_SETTINGS_MODULE": "budget_settings",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
    }


def sessions(process: ServerProcess) -> list[int]:
    """The backend pids of the database sessions ``process`` (and its children) hold now."""
    return sorted(pid for pid, _ in process.backends())


def listening_pids(process: ServerProcess) -> set[int]:
    """The processes whose Runtime said it listens (in the output of ``process``)."""
    return {int(pid) for pid in _LISTENING.findall(process.output())}


class Counts:
    """The number of sessions of a process, each time it was looked at."""

    def __init__(self, process: ServerProcess) -> None:
        self.process = process
        self.seen: list[int] = []

    def now(self) -> list[int]:
        found = sessions(self.process)
        self.seen.append(len(found))
        return found

    def until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Look at the sessions, and at ``condition``, until it holds."""

        def check() -> bool:
            self.now()
            return condition()

        wait_for(check, timeout, lambda: f"{what}; sessions: {self.seen[-1]}", [self.process])

    def settle(self, most: int, timeout: float) -> list[int]:
        """Wait until the process holds at most ``most`` sessions; returns them."""
        return wait_for(
            lambda: (found := self.now()) and len(found) <= most and found,
            timeout,
            lambda: f"at most {most} session(s) of {self.process.name}, have {self.seen[-1]}",
            [self.process],
        )

    def hold(self, seconds: float) -> list[int]:
        """The counts seen while looking for ``seconds`` without pause but POLL_INTERVAL."""
        counts = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            counts.append(len(self.now()))
            assert self.process.alive, outputs([self.process])
            time.sleep(POLL_INTERVAL)
        return counts


def start_listen(processes, env: dict[str, str]) -> ServerProcess:
    """``listen`` with THREADS worker threads and the start-up recovery, on two lockable
    channels; returns it once its Runtime says (in its log) that it listens and watches."""
    listener = processes.start(
        *("--threads", str(THREADS), "--recover", "--channels", SLOW_JOB, AUTHOR_TRIGGER),
        ready=None,
        env=env,
    )
    wait_for(
        lambda: listening_pids(listener) and "Watching" in listener.output(),
        30,
        f"{listener.name} to listen and watch",
        [listener],
    )
    return listener


def store_slow_jobs(prefix: str, count: int, seconds: float) -> set[str]:
    keys = {f"{prefix}-{number}" for number in range(count)}
    for key in sorted(keys):
        pgpubsub.notify(channels.SlowJob, key=key, seconds=seconds)
    return keys


def done(keys: set[str], authors: list[int]) -> bool:
    """Every SlowJob of ``keys`` and every author of ``authors`` was processed, and no
    lockable row is left."""
    ran = Effect.objects.filter(channel="SlowJob", key__in=keys).count()
    wrote = Effect.objects.filter(key__in=[f"author-{pk}" for pk in authors]).count()
    return ran == len(keys) and wrote == len(authors) and not Notification.objects.exists()


# -- one listen process ---------------------------------------------------------------------


def is_due_look(query: str) -> bool:
    """The statement of a sweep's look for channels with due rows (store.due_names)."""
    statement = query.removeprefix(LISTENER_TAG).lstrip()
    return statement.startswith("SELECT name FROM unnest(") and "EXISTS" in statement


@pytest.mark.timeout(90)
def test_an_idle_runtime_holds_only_its_listen_session(processes, tmp_path):
    # The default idle timeout (30 s): a worker's connection opened meanwhile would be seen.
    # The watcher looks seldom once idle, so that the sweeps' looks can be seen.
    env = settings_env(
        tmp_path, PGPUBSUB_SWEEP_INTERVAL=SWEEP_INTERVAL, PGPUBSUB_WATCH_INTERVAL=10.0
    )
    listener = start_listen(processes, env)
    counts = Counts(listener)
    # The probe that follows the LISTEN is sent on a session of its own, closed at once; the
    # start-up recovery only looked for due rows on the LISTEN session.
    (listen_session,) = counts.settle(1, 10)

    # Periodic sweeps every second, each a look on the LISTEN session: nothing due, no
    # connection of a worker.
    looks = []

    def looked_twice() -> bool:
        queries = [query for pid, query in listener.backends() if pid == listen_session]
        looking = bool(queries) and is_due_look(queries[0])
        if looking and not (looks and looks[-1]):
            looks.append(time.monotonic())
        if not looking:
            looks.append(0.0)
        return len([at for at in looks if at]) >= 2

    counts.until(looked_twice, 30, "two periodic looks on the LISTEN session")
    held = counts.hold(IDLE_WATCH)
    assert set(counts.seen) | set(held) == {1}, (counts.seen, held, outputs([listener]))
    assert sessions(listener) == [listen_session]

    # The Runtime works all the same, and its worker keeps its connection (not idle long
    # enough to close it).
    store_slow_jobs("after-idle", 1, 0.0)
    counts.until(lambda: done({"after-idle-0"}, []), 30, "the job to run")
    found = sessions(listener)
    assert listen_session in found and 1 < len(found) <= 1 + THREADS, listener.backends()
    assert "Traceback" not in listener.output(), outputs([listener])


@pytest.mark.timeout(120)
def test_idle_connections_are_released_and_reopened_under_load(processes, tmp_path):
    env = settings_env(
        tmp_path,
        PGPUBSUB_SWEEP_INTERVAL=SWEEP_INTERVAL,
        PGPUBSUB_IDLE_CONNECTION_TIMEOUT=IDLE_TIMEOUT,
    )
    listener = start_listen(processes, env)
    counts = Counts(listener)
    (listen_session,) = counts.settle(1, 10)

    for batch in ("first", "second"):
        # Stored while the workers hold no connection: nothing wakes them but the watcher.
        assert sessions(listener) == [listen_session]
        counts.seen.clear()
        # Enough to keep both workers busy for a while: a sweep of the jobs (0.15 s each) on
        # one, the authors on the other.
        keys = store_slow_jobs(batch, 16, 0.15)
        authors = create_authors(50, per_transaction=50)
        counts.until(lambda k=keys, a=authors: done(k, a), 60, f"the {batch} batch to be processed")
        # Both workers opened a connection (one channel each, at least), no more than one each.
        assert max(counts.seen) == 1 + THREADS, counts.seen
        # Once idle, the workers close them again.
        counts.settle(1, IDLE_TIMEOUT + RELEASE_MARGIN)
        held = counts.hold(IDLE_TIMEOUT * 2)
        assert set(held) == {1}, held
        assert sessions(listener) == [listen_session]

    # Each message ran once (Effect keys are unique: a second run would have failed loudly).
    assert effects("SlowJob") == 32 and effects("AuthorTrigger") == 100
    assert "Traceback" not in listener.output(), outputs([listener])
    assert "failed" not in listener.output(), outputs([listener])


# -- embedded gunicorn workers --------------------------------------------------------------


@pytest.mark.timeout(180)
def test_idle_embedded_gunicorn_workers_hold_one_session_each(processes, tmp_path):
    env = {
        **settings_env(tmp_path, PGPUBSUB_IDLE_CONNECTION_TIMEOUT=IDLE_TIMEOUT),
        "PGPUBSUB_TEST_EMBEDDED": "1",
    }
    server = processes.start_command(gunicorn_command(GUNICORN_WORKERS), env=env)
    workers = wait_children(server, GUNICORN_WORKERS)
    counts = Counts(server)
    counts.until(
        lambda: listening_pids(server) == workers, 90, f"{GUNICORN_WORKERS} Runtimes to listen"
    )
    # Right after they listen: one session each (the probe sessions of the last ones to
    # start close at once).
    counts.settle(GUNICORN_BUDGET, 10)
    held = counts.hold(IDLE_WATCH)
    assert max(held) <= GUNICORN_BUDGET, (held, server.backends())

    # Lockable work, which the workers' connections run; then idle again.
    pks = create_authors(400)
    wait_for(
        lambda: effects("AuthorTrigger") == len(pks) and stored() == 0,
        90,
        lambda: (
            f"{len(pks)} author effects and no stored rows; have "
            f"{effects('AuthorTrigger')} and {stored()}"
        ),
        [server],
    )
    counts.settle(GUNICORN_BUDGET, IDLE_TIMEOUT + RELEASE_MARGIN)
    held = counts.hold(IDLE_WATCH)
    assert max(held) <= GUNICORN_BUDGET, (held, server.backends())
    assert server.children() == workers
    assert "Traceback" not in server.output(), outputs([server])
