"""``manage.py listen --recover`` of the benchmark project, measured from inside, for
``python -m benchmarks.profiling``. Stops itself (SIGTERM, as a user would) once the no-op
listener ``KIND`` (job or row) ran ``BENCH_EXPECTED`` callbacks and no stored row is left.

    python profiled_listen.py sql KIND OUT.json    time every SQL statement and commit of the
                                                   worker threads, by kind of statement
    python profiled_listen.py cprofile KIND OUT    cProfile every thread the Runtime starts
                                                   (OUT.prof: their stats merged; OUT.json:
                                                   each thread's total)

Only the benchmark project and Django are patched, never pgpubsub.
"""

import json
import os
import re
import signal
import sys
import threading
import time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchsite.settings")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import django  # noqa: E402

django.setup()

from benchapp import listeners  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connections  # noqa: E402

#: Seconds between two checks of the tally and the table.
POLL = 0.02


def statement_kind(sql):
    """A statement's shape: literals, numbers and savepoint names replaced, lists shortened,
    so that the statements of every message and batch fall into a few kinds."""
    shape = re.sub(r"\s+", " ", sql).strip()
    shape = re.sub(r"'(?:[^']|'')*'", "'…'", shape)
    shape = re.sub(r'"[^"]*"', '"…"', shape)
    shape = re.sub(r"\b\d+(\.\d+)?\b", "N", shape)
    shape = re.sub(r"N(, N)+", "N, …", shape)
    return shape if len(shape) <= 110 else shape[:107] + "…"


class SqlClock:
    """Time spent in each kind of statement (and in commits), per thread kind."""

    def __init__(self):
        self.lock = threading.Lock()
        self.kinds = {}  # kind -> [count, seconds]

    def add(self, kind, seconds):
        with self.lock:
            entry = self.kinds.setdefault(kind, [0, 0.0])
            entry[0] += 1
            entry[1] += seconds

    def install(self):
        """Time statements at the driver (psycopg2): a cursor and a connection class of
        ours for every connection opened from now on, so that statements sent on the driver's
        own cursors count too. Only the worker threads' are counted."""
        import psycopg2.extensions

        clock = self

        def counted():
            return threading.current_thread().name.startswith("pgpubsub-worker")

        class TimedCursor(psycopg2.extensions.cursor):
            def execute(self, query, vars=None):
                if not counted():
                    return super().execute(query, vars)
                started = time.perf_counter()
                try:
                    return super().execute(query, vars)
                finally:
                    text = query.decode() if isinstance(query, bytes) else str(query)
                    clock.add(statement_kind(text), time.perf_counter() - started)

        class TimedConnection(psycopg2.extensions.connection):
            def commit(self):
                started = time.perf_counter()
                try:
                    return super().commit()
                finally:
                    if counted():
                        clock.add("COMMIT", time.perf_counter() - started)

            def rollback(self):
                started = time.perf_counter()
                try:
                    return super().rollback()
                finally:
                    if counted():
                        clock.add("ROLLBACK", time.perf_counter() - started)

        options = connections.settings["default"].setdefault("OPTIONS", {})
        options["cursor_factory"] = TimedCursor
        options["connection_factory"] = TimedConnection


class ThreadProfiles:
    """A cProfile.Profile in every thread started from now on (cProfile profiles only the
    thread that enables it)."""

    def __init__(self):
        self.done = []  # (thread name, profile)
        self.lock = threading.Lock()

    def install(self):
        import cProfile

        profiles = self
        run = threading.Thread.run

        def profiled_run(thread):
            profile = cProfile.Profile()
            profile.enable()
            try:
                run(thread)
            finally:
                profile.disable()
                with profiles.lock:
                    profiles.done.append((thread.name, profile))

        threading.Thread.run = profiled_run

    def dump(self, out):
        import pstats

        totals = {}
        stats = None
        for name, profile in self.done:
            profile.create_stats()
            one = pstats.Stats(profile)
            totals[name] = totals.get(name, 0.0) + one.total_tt
            if name.startswith("pgpubsub-worker"):
                stats = one if stats is None else stats.add(one)
        if stats is not None:
            stats.dump_stats(out + ".prof")
        return {"thread_seconds": totals}


def stored_rows():
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pgpubsub_notification")
        return cursor.fetchone()[0]


def stop_when_drained(tally, expected, timings):
    """The watcher thread: once every callback ran and every row is acknowledged, the drain's
    time is noted and the process gets SIGTERM (the Runtime stops as in production)."""
    try:
        while tally.count < expected:
            time.sleep(POLL)
        while stored_rows():
            time.sleep(POLL)
        timings["first"], timings["last"], timings["count"] = tally.first, tally.last, tally.count
    finally:
        connections.close_all()
        os.kill(os.getpid(), signal.SIGTERM)


def main(mode, kind, out):
    tally = {"job": listeners.JOBS, "row": listeners.ROWS}[kind]
    expected = int(os.environ["BENCH_EXPECTED"])
    timings = {}
    # Started before any patching: neither timed nor profiled.
    watcher = threading.Thread(
        target=stop_when_drained, args=(tally, expected, timings), name="bench-watcher"
    )
    watcher.start()
    sql = SqlClock()
    profiles = ThreadProfiles()
    if mode == "sql":
        sql.install()
    elif mode == "cprofile":
        profiles.install()
    else:
        sys.exit(f"unknown mode {mode!r}")
    try:
        call_command("listen", "--recover")
    except SystemExit:
        pass
    watcher.join(10)
    result = {"mode": mode, "kind": kind, **timings}
    if mode == "sql":
        result["statements"] = sql.kinds
    else:
        result.update(profiles.dump(out))
    with open(out + ".json", "w") as output:
        json.dump(result, output, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
