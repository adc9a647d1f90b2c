"""A rolling upgrade from a running django-pgpubsub 1.3.1 (docs/migrating.md).

django-pgpubsub 1.3.1 is installed from PyPI into a venv of its own (the benchmarks' venv, made
once and reused: ``benchmarks.harness.ensure_theirs_venv``). The project of
``tests/fixtures/rolling_upgrade`` runs on both versions: a lockable trigger channel (orders) and
a plain one (notes), whose listeners record each run in ``shop_effect`` with the library that
ran it. While orders and notes are written without pause, the upgrade steps run in order: 1.3.1's
``listen`` runs on a database 1.3.1 migrated, this project's ``makemigrations`` and ``migrate``
run beside it, this project's ``listen --recover`` starts, and 1.3.1's ``listen`` is stopped the
documented way (SIGTERM to its process group). Every order's listener runs exactly once, nothing
stays stored, no 1.3.1 process or session is left.

It also shows why the docs say to stop 1.3.1 by its process group: SIGTERM to the pid of its
``listen`` ends that process only, and the worker it spawned goes on processing.

These tests run real commands against databases of their own, with psycopg2 directly (not
pytest-django's test database). They need the network to PyPI the first time the venv is made;
when it cannot be made they fail, saying so.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlparse

import psycopg2
import pytest

from benchmarks.harness import (
    BenchmarkError,
    Process,
    Processes,
    ensure_theirs_venv,
)
from benchmarks.harness import (
    wait_for as harness_wait_for,
)
from benchmarks.runner import DEFAULT_VENV_DIR
from pgpubsub.connection import LISTENER_TAG
from pgpubsub.testing.postgres import database_url
from tests.processes import live_processes

PROJECT = Path(__file__).resolve().parent / "fixtures" / "rolling_upgrade"

#: Seconds a step may take to show its effect (a process to start, a backlog to drain).
STEP_TIMEOUT = 30.0
#: Seconds 1.3.1's processes get to be gone after SIGTERM to their group.
STOP_TIMEOUT = 10.0
#: Seconds between two orders written by the producer (a steady trickle, as in production).
ORDER_INTERVAL = 0.01
#: The producer adds a note (plain channel) after this many orders.
ORDERS_PER_NOTE = 10
#: Orders each side must have processed before the test moves on to the next step.
SOME = 20
#: Orders written at once just before the migration: 1.3.1's backlog when ours starts.
BURST = 2000

#: What 1.3.1's worker logs for a NOTIFY whose stored row it cannot find: after the migration,
#: lockable NOTIFYs carry a row id, which it looks for as a payload.
NO_LOCK = "Could not obtain a lock on notification"
#: What 1.3.1 logs when a NOTIFY asks it to process every stored row of a channel.
RECOVERING = "Processing all notifications for channel"
#: What 1.3.1's worker logs once it LISTENs (its LISTEN is in a transaction, so the session's
#: last query is a COMMIT, not the LISTEN).
OLD_LISTENING = "Listening for notifications..."


# --- databases --------------------------------------------------------------------------------


def url_for(dbname: str, application_name: str | None = None) -> str:
    parsed = urlparse(database_url())
    query = dict(parse_qsl(parsed.query))
    if application_name:
        query["application_name"] = application_name
    return parsed._replace(path=f"/{dbname}", query=urlencode(query)).geturl()


def connect(dbname: str):
    conn = psycopg2.connect(url_for(dbname))
    conn.autocommit = True
    return conn


def fetch(conn, sql: str, params: Any = None) -> list[tuple]:
    with conn.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def drop_database(name: str) -> None:
    with closing(connect("postgres")) as conn:
        fetch(
            conn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            [name],
        )
        fetch(conn, f'DROP DATABASE IF EXISTS "{name}"')


def sessions(conn, application_name: str) -> list[tuple]:
    return fetch(
        conn,
        "SELECT pid, query FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = %s",
        [application_name],
    )


# --- processes --------------------------------------------------------------------------------


def wait_for(
    condition: Callable[[], Any],
    what: str,
    watch=(),
    timeout: float = STEP_TIMEOUT,
    details: Callable[[], str] | None = None,
) -> Any:
    """``benchmarks.harness.wait_for``, failing the test (with ``details()`` when given)."""
    try:
        return harness_wait_for(condition, timeout, what, watch)
    except BenchmarkError as error:
        failure = str(error) + (f"\n{details()}" if details else "")
    pytest.fail(failure, pytrace=False)


def group_members(pgid: int) -> list[tuple[int, int]]:
    """(pid, parent pid) of the live processes of process group ``pgid``."""
    return [(pid, ppid) for pid, ppid, group in live_processes() if group == pgid]


class Project:
    """The rolling-upgrade project in a directory of its own, on one database."""

    def __init__(self, directory: Path, dbname: str, processes: Processes) -> None:
        self.directory = directory
        self.dbname = dbname
        self.processes = processes

    def env(self, application_name: str) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "DJANGO_SETTINGS_MODULE")
        }
        env.update(
            DATABASE_URL=url_for(self.dbname, application_name),
            DJANGO_SETTINGS_MODULE="shopsite.settings",
            PYTHONPATH=str(self.directory),
            PYTHONUNBUFFERED="1",
        )
        return env

    def run(self, python: str, *args: str) -> str:
        """``manage.py <args>`` to completion; its output (the test fails if it fails)."""
        name = f"{'1.3.1' if python != sys.executable else 'ours'}-{args[0]}"
        try:
            return self.processes.run(
                name, self.command(python, *args), self.directory, self.env(name), 120
            )
        except BenchmarkError as error:
            failure = str(error)
        pytest.fail(failure, pytrace=False)

    def start(self, python: str, name: str, *args: str) -> Process:
        return self.processes.start(
            name, self.command(python, *args), self.directory, self.env(name)
        )

    def command(self, python: str, *args: str) -> list[str]:
        return [python, str(self.directory / "manage.py"), *args]


# --- fixtures ---------------------------------------------------------------------------------


@dataclass
class OldVenv:
    """The venv with django-pgpubsub 1.3.1, or why it could not be made."""

    python: str | None = None
    error: str | None = None

    def require(self) -> str:
        """Its python; fails the test (in its body, so it shows as FAILED) when it is missing."""
        if self.python is None:
            pytest.fail(self.error, pytrace=False)
        return self.python


@pytest.fixture(scope="module")
def old_venv(tmp_path_factory) -> OldVenv:
    """A venv with django-pgpubsub 1.3.1 from PyPI, made once and reused (the benchmarks'),
    never skipped: the tests fail when it cannot be made."""
    logs = tmp_path_factory.mktemp("venv-logs")
    try:
        DEFAULT_VENV_DIR.parent.mkdir(parents=True, exist_ok=True)
        # Test sessions running at once (tox environments) wait for the one making the venv.
        with open(DEFAULT_VENV_DIR.parent / "venv.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return OldVenv(python=ensure_theirs_venv(DEFAULT_VENV_DIR, Processes(logs)))
    except (BenchmarkError, OSError) as error:
        return OldVenv(
            error=f"Could not install django-pgpubsub 1.3.1 from PyPI into {DEFAULT_VENV_DIR} "
            f"(this test needs it, and the network to PyPI the first time):\n{error}"
        )


@pytest.fixture(scope="module")
def old_template(old_venv, tmp_path_factory) -> Iterator[tuple[Path, str] | None]:
    """The project with the migration 1.3.1's ``makemigrations`` wrote, and a template database
    that 1.3.1's ``migrate`` migrated; both removed at the end. None without the venv."""
    if old_venv.python is None:
        yield None
        return
    directory = tmp_path_factory.mktemp("project-1.3.1") / "project"
    shutil.copytree(PROJECT, directory, ignore=shutil.ignore_patterns("__pycache__"))
    dbname = f"pgpubsub_rolling_template_{os.getpid()}_{secrets.token_hex(3)}"
    with closing(connect("postgres")) as conn:
        fetch(conn, f'CREATE DATABASE "{dbname}"')
    processes = Processes(tmp_path_factory.mktemp("template-logs"))
    try:
        project = Project(directory, dbname, processes)
        made = project.run(old_venv.python, "makemigrations", "shop")
        assert "shop/migrations/0001_initial.py" in made, made
        migrated = project.run(old_venv.python, "migrate", "--noinput")
        assert "Applying pgpubsub.0006_payload_stores_proper_jsonb... OK" in migrated, migrated
        assert "Applying shop.0001_initial... OK" in migrated, migrated
        yield directory, dbname
    finally:
        processes.stop_all()
        drop_database(dbname)


@pytest.fixture
def project(old_template, tmp_path) -> Iterator[Project | None]:
    """A copy of the 1.3.1 project on a copy of the database 1.3.1 migrated. Every process
    started through it is stopped (its whole process group) and the database dropped after.
    None without the venv."""
    if old_template is None:
        yield None
        return
    template_dir, template_db = old_template
    directory = tmp_path / "project"
    shutil.copytree(template_dir, directory, ignore=shutil.ignore_patterns("__pycache__"))
    dbname = f"pgpubsub_rolling_{os.getpid()}_{secrets.token_hex(3)}"
    with closing(connect("postgres")) as conn:
        fetch(conn, f'CREATE DATABASE "{dbname}" TEMPLATE "{template_db}"')
    logs = tmp_path / "logs"
    logs.mkdir()
    processes = Processes(logs)
    try:
        yield Project(directory, dbname, processes)
    finally:
        processes.stop_all()
        drop_database(dbname)


class Producer:
    """Writes orders (and every ``ORDERS_PER_NOTE`` orders a note) in a thread, each in a
    transaction of its own, until stopped; remembers their ids."""

    def __init__(self, dbname: str) -> None:
        self.conn = connect(dbname)
        self.orders: list[int] = []
        self.notes: list[int] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="rolling-upgrade-producer")

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                [(order,)] = fetch(
                    self.conn, "INSERT INTO shop_order (number) VALUES (1) RETURNING id"
                )
                with self._lock:
                    self.orders.append(order)
                if len(self.orders) % ORDERS_PER_NOTE == 0:
                    [(note,)] = fetch(
                        self.conn, "INSERT INTO shop_note (text) VALUES ('n') RETURNING id"
                    )
                    with self._lock:
                        self.notes.append(note)
                self._stop.wait(ORDER_INTERVAL)
        except BaseException as error:  # reported by the test
            self.error = error

    def produced(self) -> tuple[list[int], list[int]]:
        with self._lock:
            return list(self.orders), list(self.notes)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(STEP_TIMEOUT)
        assert not self._thread.is_alive(), "the producer did not stop"
        self.conn.close()
        if self.error is not None:
            raise AssertionError(f"the producer failed: {self.error!r}") from self.error


@contextmanager
def producing(dbname: str) -> Iterator[Producer]:
    producer = Producer(dbname)
    producer.start()
    try:
        yield producer
    finally:
        producer.stop()


def effects(conn, kind: str) -> list[tuple[int, str]]:
    return fetch(conn, "SELECT ref, side FROM shop_effect WHERE kind = %s ORDER BY id", [kind])


def processed_by(conn, kind: str, side: str) -> int:
    [(count,)] = fetch(
        conn, "SELECT count(*) FROM shop_effect WHERE kind = %s AND side = %s", [kind, side]
    )
    return count


def start_old_listen(project: Project, old_python: str) -> Process:
    """1.3.1's ``manage.py listen``, once its spawned worker LISTENs."""
    old = project.start(old_python, "1.3.1-listen", "listen")
    wait_for(
        lambda: OLD_LISTENING in old.log_path.read_text(),
        "1.3.1's listen to LISTEN",
        watch=[old],
    )
    return old


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_sigterm_to_the_pid_of_1_3_1_listen_orphans_its_worker(project, old_venv):
    """Why docs/migrating.md says to stop 1.3.1 by its process group."""
    old_python = old_venv.require()
    old = start_old_listen(project, old_python)
    with closing(connect(project.dbname)) as conn:
        members = dict(group_members(old.pid))
        workers = [pid for pid, parent in members.items() if parent == old.pid]
        assert workers, f"1.3.1's listen started no process: {members}"

        old.popen.send_signal(signal.SIGTERM)
        assert old.popen.wait(STOP_TIMEOUT) == -signal.SIGTERM
        # What it spawned is still there, orphaned, and still processes messages.
        orphans = dict(group_members(old.pid))
        assert set(workers) <= orphans.keys(), (workers, orphans, old.log_tail())
        assert all(parent != old.pid for parent in orphans.values())
        assert sessions(conn, "1.3.1-listen")
        [(order,)] = fetch(conn, "INSERT INTO shop_order (number) VALUES (1) RETURNING id")
        wait_for(
            lambda: fetch(
                conn, "SELECT pid FROM shop_effect WHERE kind = 'order' AND ref = %s", [order]
            ),
            "the orphaned 1.3.1 worker to process an order",
        )
        [(pid,)] = fetch(
            conn, "SELECT pid FROM shop_effect WHERE kind = 'order' AND ref = %s", [order]
        )
        assert pid in workers

        # SIGTERM to the group ends them.
        os.killpg(old.pid, signal.SIGTERM)
        wait_for(lambda: not group_members(old.pid), "the orphans to exit", timeout=STOP_TIMEOUT)
        wait_for(lambda: not sessions(conn, "1.3.1-listen"), "1.3.1's sessions to end")


@pytest.mark.timeout(300)
def test_rolling_upgrade_from_a_running_1_3_1(project, old_venv):
    """docs/migrating.md, "Upgrading while 1.3.1 runs", step by step, with writes throughout."""
    old_python = old_venv.require()
    # Before the upgrade: 1.3.1's listen processes the orders and notes being written (from
    # when it LISTENs: a plain message nobody listens to is gone).
    old = start_old_listen(project, old_python)
    with closing(connect(project.dbname)) as conn, producing(project.dbname) as producer:
        wait_for(
            lambda: processed_by(conn, "order", "1.3.1") >= SOME, "1.3.1 to process orders", [old]
        )

        # Step 1, the new release: this checkout (the test's python) and the migration its
        # makemigrations writes (for the project's app: the checkout's own models are not this
        # test's business).
        made = project.run(sys.executable, "makemigrations", "shop")
        [migration] = re.findall(r"shop/migrations/(0002_\w+)\.py", made)

        # 1.3.1 falls behind: a burst of orders in one transaction leaves it a backlog, which
        # it is still working through when ours starts (1.3.1 does a few hundred a second).
        burst = [
            order
            for (order,) in fetch(
                conn,
                "INSERT INTO shop_order (number) SELECT 2 FROM generate_series(1, %s) RETURNING id",
                [BURST],
            )
        ]

        # Step 2: migrate, while 1.3.1's listen works and orders keep coming.
        migrated = project.run(sys.executable, "migrate", "--noinput")
        assert "Applying pgpubsub.0007_functions_and_channel_index... OK" in migrated, migrated
        assert f"Applying shop.{migration}... OK" in migrated, migrated

        # Step 3: this project's listen --recover starts, beside 1.3.1's. Both take rows of the
        # backlog (each skips the rows the other holds); new rows are ours alone.
        ours = project.start(sys.executable, "ours-listen", "listen", "--recover")
        wait_for(
            lambda: any(
                q.upper().startswith("LISTEN") or q.startswith(LISTENER_TAG)
                for _, q in sessions(conn, "ours-listen")
            ),
            "our listen to LISTEN",
            [ours, old],
        )
        [(first_note_after,)] = fetch(conn, "SELECT coalesce(max(id), 0) FROM shop_note")
        wait_for(
            lambda: fetch(
                conn,
                "SELECT 1 FROM shop_effect WHERE kind = 'order' AND side = 'ours' "
                "AND ref BETWEEN %s AND %s",
                [burst[0], burst[-1]],
            ),
            "us to take orders of 1.3.1's backlog",
            [ours, old],
        )
        # A plain message reaches both: a note written now is processed by each side (1.3.1
        # once it is through its backlog).
        wait_for(
            lambda: fetch(
                conn,
                "SELECT ref FROM shop_effect WHERE kind = 'note' AND ref > %s "
                "GROUP BY ref HAVING count(DISTINCT side) = 2",
                [first_note_after],
            ),
            "a note processed by both 1.3.1 and us",
            [ours, old],
        )
        # The new triggers only store their rows; our watcher's wake-up ("0", a row id no row
        # has) is what 1.3.1 hears: it looks for it as a payload, finds nothing, says so, and
        # leaves the rows to us. It never takes a wake-up for a request to process every
        # stored row (1.3.1's reading of the empty payload), which would run rows of ours
        # that wait for a retry.
        wait_for(
            lambda: NO_LOCK in old.log_path.read_text(), "1.3.1 to hear a wake-up", [ours, old]
        )
        assert RECOVERING not in old.log_path.read_text()

        # Step 4: 1.3.1's listen is stopped the documented way, its whole process group.
        old_group = group_members(old.pid)
        assert len(old_group) >= 2, old_group  # listen and the worker it spawned
        os.killpg(old.pid, signal.SIGTERM)
        wait_for(
            lambda: not group_members(old.pid),
            "every process of 1.3.1's listen to exit",
            timeout=STOP_TIMEOUT,
        )
        assert old.popen.wait(STOP_TIMEOUT) == -signal.SIGTERM
        wait_for(lambda: not sessions(conn, "1.3.1-listen"), "1.3.1's sessions to end")

        # Production goes on, with ours alone.
        after_stop = len(producer.produced()[0])
        wait_for(lambda: len(producer.produced()[0]) >= after_stop + SOME, "more orders")

    # Everything written is processed, once; nothing stays stored.
    trickle, notes = producer.produced()
    orders = set(trickle) | set(burst)
    with closing(connect(project.dbname)) as conn:

        def missing() -> tuple[set[int], set[int]]:
            return (
                orders - {ref for ref, _ in effects(conn, "order")},
                set(notes) - {ref for ref, _ in effects(conn, "note")},
            )

        wait_for(
            lambda: (
                missing() == (set(), set())
                and not fetch(conn, "SELECT id FROM pgpubsub_notification")
            ),
            "every order and note to be processed and no row to stay stored",
            [ours],
            details=lambda: (
                f"not processed (orders, notes): {missing()}\nstored: "
                + repr(
                    fetch(
                        conn, "SELECT id, channel, attempts, last_error FROM pgpubsub_notification"
                    )
                )
                + f"\n--- 1.3.1 log:\n{old.log_tail(60)}"
            ),
        )
        order_effects = effects(conn, "order")
        runs = Counter(ref for ref, _ in order_effects)
        assert [ref for ref, count in runs.items() if count > 1] == [], "orders run twice"
        assert set(runs) == orders
        by_side = Counter(side for _, side in order_effects)
        assert by_side["1.3.1"] >= SOME and by_side["ours"] >= SOME, by_side
        burst_set = set(burst)
        burst_by_side = Counter(side for ref, side in order_effects if ref in burst_set)
        assert burst_by_side["1.3.1"] and burst_by_side["ours"], burst_by_side
        assert fetch(conn, "SELECT count(*) FROM pgpubsub_notification") == [(0,)]

        # Every note reached a listener; neither side ran one twice.
        note_runs = Counter(effects(conn, "note"))
        assert {ref for ref, _ in note_runs} == set(notes)
        assert max(note_runs.values()) == 1, note_runs

    ours.stop()
    assert ours.popen.returncode == 0, ours.log_tail()
