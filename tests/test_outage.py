"""Fault injection: the database goes away for a while and comes back.

The test runs on a PostgreSQL server of its own (``tests.servers``), not on the session's test
database, so that stopping it disturbs no other test. Against it run a ``manage.py listen``
process and a gunicorn server whose workers run embedded Runtimes; lockable messages are
produced before the server stops and after it is back, and every one of them must be
processed, once, by the processes that were running all along.
"""

from __future__ import annotations

import itertools
import os
import sys
import time

import psycopg2
import pytest

from pgpubsub.listening import MAX_RECONNECT_DELAY
from pgpubsub.models import Notification
from tests.processes import LISTEN_SESSION, MANAGE, ServerProcess, outputs, wait_for
from tests.servers import ThrowawayServer
from tests.test_embedded import (
    EMBEDDED,
    GUNICORN_WORKERS,
    RUNTIME_WORKERS,
    gunicorn,
    wait_children,
)
from tests.testapp import channels
from tests.testapp.models import Effect

#: Seconds the server stays stopped.
OUTAGE = 30.0
#: Messages produced before the outage, and (twice) after it.
BEFORE = 40
AFTER = 20
#: Seconds each message produced before the outage takes (so some are still stored when the
#: server stops): BEFORE of them keep the THREADS worker threads busy for about 3.5 s.
SLOW_SECONDS = 0.5
#: Seconds a Runtime may take to reconnect once the server is back: the longest pause between
#: its attempts, plus a margin for the attempt itself and a busy machine.
RECONNECT_TIMEOUT = MAX_RECONNECT_DELAY + 15.0
#: Seconds the processes get to work through the messages once they listen again.
PROCESSING_TIMEOUT = 30.0
#: ``--threads`` of the listen process.
LISTEN_THREADS = 2
#: Worker threads of all the Runtimes together.
THREADS = LISTEN_THREADS + GUNICORN_WORKERS * RUNTIME_WORKERS

DATABASE = "outage"
EFFECTS = Effect._meta.db_table
NOTIFICATIONS = Notification._meta.db_table

_names = itertools.count(1)


class OutageProcess(ServerProcess):
    """A process of the test project against the ``DATABASE`` of the test's own server; its
    database sessions are looked up there."""

    def __init__(self, command: list[str], server: ThrowawayServer, env: dict | None = None):
        self.server = server
        name = f"pgpubsub-outage-{os.getpid()}-{next(_names)}"
        url = server.database_url(DATABASE, application_name=name)
        super().__init__(command, name=name, env={**(env or {}), "DATABASE_URL": url})

    def backends(self, listening: bool = False) -> list[tuple[int, str]]:
        sql = (
            "SELECT pid, query FROM pg_stat_activity "
            "WHERE datname = %s AND application_name = %s AND pid <> pg_backend_pid()"
        )
        if listening:
            sql += f" AND {LISTEN_SESSION}"
        try:
            conn = self.server.connect()
        except psycopg2.OperationalError:  # a stopped server has no sessions
            return []
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql, [DATABASE, self.name])
                return list(cursor.fetchall())
        finally:
            conn.close()


@pytest.fixture
def server():
    """A PostgreSQL server of this test's own, with the test project's database migrated."""
    started = ThrowawayServer()
    try:
        started.create_database(DATABASE)
        migrate = OutageProcess([sys.executable, str(MANAGE), "migrate", "-v", "0"], started)
        try:
            code = migrate.wait(120)
            assert code == 0, f"migrate failed{outputs([migrate])}"
        finally:
            migrate.stop()
        yield started
    finally:
        started.close()


@pytest.fixture
def started(server):
    """The processes a test starts (append them); stopped after the test, whatever happened,
    and before its server is."""
    processes: list[OutageProcess] = []
    yield processes
    errors = []
    for process in processes:
        try:
            process.stop()
        except Exception as error:  # stop the others all the same
            errors.append(error)
    if errors:
        raise errors[0]


class Database:
    """The test's side of the dedicated database: produce messages, count what was done. A
    connection broken by the outage is replaced on the next call."""

    def __init__(self, server: ThrowawayServer) -> None:
        self.server = server
        self._conn = None

    def _cursor(self):
        if self._conn is None or self._conn.closed:
            self._conn = self.server.connect(DATABASE)
        return self._conn.cursor()

    def _query(self, sql: str, params: list | None = None) -> list[tuple]:
        try:
            with self._cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall()
        except psycopg2.OperationalError:
            self.close()  # the server restarted since: the next call connects again
            raise

    def produce(self, channel, messages: list[dict]) -> None:
        """Store ``messages`` on lockable ``channel``, each in a transaction of its own, as
        ``notify()`` would."""
        for fields in messages:
            self._query(
                "SELECT pgpubsub_store(%s, %s::jsonb)",
                [channel.listen_safe_name(), channel(**fields).serialize()],
            )

    def effects(self) -> list[tuple[str, int]]:
        return self._query(f"SELECT key, pid FROM {EFFECTS} ORDER BY key")

    def claimed(self) -> int:
        """Stored rows that a listener has claimed (it is processing them, or was)."""
        return self._query(f"SELECT count(*) FROM {NOTIFICATIONS} WHERE claimed_by IS NOT NULL")[0][
            0
        ]

    def stored(self) -> int:
        return self._query(f"SELECT count(*) FROM {NOTIFICATIONS}")[0][0]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def listening(processes: list[OutageProcess]) -> list[int]:
    """How many LISTEN sessions each process has."""
    return [len(process.backends(listening=True)) for process in processes]


@pytest.mark.timeout(180)
def test_lockable_messages_survive_a_database_outage(server, started):
    listener = OutageProcess(
        [
            sys.executable,
            str(MANAGE),
            "listen",
            "--threads",
            str(LISTEN_THREADS),
            "--loglevel",
            "info",
        ],
        server,
    )
    started.append(listener)
    web = OutageProcess(gunicorn(), server, env=EMBEDDED)
    started.append(web)
    everyone = [listener, web]
    expected_listening = [1, GUNICORN_WORKERS]  # a Runtime per listen process / web worker
    wait_for(
        lambda: listening(everyone) == expected_listening,
        60,
        lambda: f"LISTEN sessions {expected_listening}, have {listening(everyone)}",
        watch=everyone,
    )
    workers = wait_children(web, GUNICORN_WORKERS)
    db = Database(server)
    try:
        # Before: slow messages, so that some are running and others still stored (their
        # wake-up already received, perhaps queued) when the server goes away. Messages run in
        # batches whose effects commit together: wait until some are being processed (their
        # rows claimed) or done, not for effects alone.
        db.produce(
            channels.SlowJob,
            [{"key": f"before-{n}", "seconds": SLOW_SECONDS} for n in range(BEFORE)],
        )
        wait_for(
            lambda: db.claimed() + len(db.effects()) >= THREADS,
            30,
            lambda: f"the first messages processed, have {len(db.effects())}",
            watch=everyone,
        )
        db.close()
        server.stop()

        # The outage: the processes lose every connection and must stay up.
        back_at = time.monotonic() + OUTAGE
        wait_for(
            lambda: time.monotonic() >= back_at,
            OUTAGE + 10,
            "the end of the outage",
            watch=everyone,
        )
        server.start()
        # No message can have been processed since the stop: a listener that reconnected at
        # once would still be in the first message's SLOW_SECONDS.
        done_before = len(db.effects())
        assert done_before < BEFORE, f"all processed before the outage{outputs(everyone)}"

        # After, at once: stored, their notifications most likely sent while nobody listens.
        db.produce(channels.Job, [{"key": f"after-{n}", "text": "work"} for n in range(AFTER)])
        # Every Runtime listens again, by itself.
        wait_for(
            lambda: listening(everyone) == expected_listening,
            RECONNECT_TIMEOUT,
            lambda: f"LISTEN sessions {expected_listening} again, have {listening(everyone)}",
            watch=everyone,
        )
        # After, once listening: delivered by their notifications.
        db.produce(channels.Job, [{"key": f"later-{n}", "text": "work"} for n in range(AFTER)])

        expected = (
            {f"before-{n}" for n in range(BEFORE)}
            | {f"after-{n}" for n in range(AFTER)}
            | {f"later-{n}" for n in range(AFTER)}
        )
        wait_for(
            lambda: len(db.effects()) == len(expected) and db.stored() == 0,
            PROCESSING_TIMEOUT,
            lambda: (
                f"{len(expected)} effects and no stored rows; have {len(db.effects())} "
                f"effects and {db.stored()} stored rows ({done_before} of {BEFORE} done "
                f"before the outage)"
            ),
            watch=everyone,
        )
        effects = db.effects()
    finally:
        db.close()

    # Each message processed once (the unique key would have refused a second effect), by
    # the processes started before the outage: none exited, no gunicorn worker was replaced.
    assert {key for key, _ in effects} == expected, outputs(everyone)
    assert len(effects) == len(expected), outputs(everyone)
    assert {pid for _, pid in effects} <= {listener.pid, *workers}, outputs(everyone)
    assert listener.alive and web.alive, outputs(everyone)
    assert web.children() == workers, outputs(everyone)
    # The outage was reported as warnings: no callback ran twice (it would have failed on the
    # unique key), nothing crashed.
    for process in everyone:
        output = process.output()
        assert "duplicate key" not in output and "Traceback" not in output, outputs([process])
