"""The workloads. Each runs once for one side on a fresh database and returns its metrics."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import http.client
import itertools
import json
import math
import os
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg2

from benchmarks import tasks
from benchmarks.harness import (
    COMMAND_TIMEOUT,
    EMBEDDED_THREADS,
    EMBEDDED_WEB_WORKERS,
    BenchmarkError,
    Databases,
    Engine,
    Process,
    Processes,
    Server,
    Side,
    cpu_sample,
    rss_bytes,
    thread_count,
    voluntary_switches,
    wait_for,
)

#: Seconds a started listener may take to process its first readiness probe.
READY_TIMEOUT = 90.0
#: Seconds between two readiness probes.
PROBE_INTERVAL = 0.1
#: The plain channel of the benchmark project, and its LISTEN name (the same on both sides).
TICK_CHANNEL = "benchapp.channels.Tick"
TICK_LISTEN_NAME = "pgpubsub_" + hashlib.sha1(TICK_CHANNEL.encode()).hexdigest()[:5]

#: The benchmark project's settings with ``PGPUBSUB_NOTIFY_ON_WRITE = True``.
NOTIFY_ON_WRITE = {"BENCH_NOTIFY_ON_WRITE": "1"}

INSERT_EVENT = (
    "INSERT INTO benchapp_event (key, sent_at) VALUES (%s, extract(epoch FROM clock_timestamp()))"
)
INSERT_EVENTS = (
    "INSERT INTO benchapp_event (key, sent_at) "
    "SELECT 'event-' || n, extract(epoch FROM clock_timestamp()) FROM generate_series(1, %s) n"
)


@dataclass(frozen=True)
class Sizes:
    events: int  # K: Events per lockable workload
    messages: int  # M: plain messages per plain workload
    idle_seconds: float
    batch: int  # rows per transaction of the ceiling loop
    backlog: int  # B: stored rows of the backlog workload (0: not run)
    rate: float  # messages per second of the paced producer (workload 8)
    paced_seconds: float  # how long the paced producer sends, per channel
    web_seconds: float = 10.0  # each window of workload 28 (idle, then serving)
    noop_rows: int = 10000  # N: stored rows of the no-op drains and the raw drain (29-31)
    writers: tuple[int, ...] = (1, 4, 16)  # concurrent writer connections (34)
    writer_seconds: float = 3.0  # how long each writer measurement lasts (34)
    burst_writers: int = 16  # writer processes of the burst (36)
    burst_seconds: float = 2.0  # how long the burst's writers write at full speed (36)
    watch_seconds: float = 20.0  # idle window of the 4 Runtimes (37)
    settle_seconds: float = 3.0  # pause before the idle measurements of 37 and 38
    idle_connection_timeout: float = 5.0  # PGPUBSUB_IDLE_CONNECTION_TIMEOUT of workload 38
    tasks: int = 5000  # N_T: no-op tasks drained by one worker (39)
    task_rate: float = 100.0  # tasks per second of the paced producer (40)
    task_enqueues: int = 2000  # E: timed enqueues, one per transaction (41)

    def wait_timeout(self, count: int) -> float:
        """Seconds to wait for ``count`` messages: generous for 1.3.1's ~100 rows/s."""
        return 60.0 + count / 10.0

    @property
    def paced_count(self) -> int:
        return max(1, round(self.rate * self.paced_seconds))


@dataclass
class Context:
    server: Server
    databases: Databases
    processes: Processes
    sizes: Sizes
    #: The sides prepared for this invocation, by name (workload 34 writes into ours' and
    #: theirs' databases).
    sides: dict[str, Side] = dataclasses.field(default_factory=dict)
    #: Template databases migrated with other settings (see ``notify_on_write_template``).
    templates: dict[tuple[str, str], str] = dataclasses.field(default_factory=dict)

    @contextlib.contextmanager
    def fresh_database(
        self, side: Side, template: str | None = None
    ) -> Iterator[tuple[str, object]]:
        """A copy of the side's migrated template (or of ``template``), with an autocommit
        connection; dropped after."""
        dbname = self.databases.create(side.name, template=template or side.template_db)
        try:
            conn = self.server.connect(dbname)
            try:
                yield dbname, conn
            finally:
                conn.close()
        finally:
            self.databases.drop(dbname)

    def notify_on_write_template(self, side: Side) -> str:
        """A copy of this checkout's migrated template where ``migrate`` ran again with
        ``PGPUBSUB_NOTIFY_ON_WRITE = True`` (its post_migrate reinstalls the SQL functions with
        the setting): every lockable row stored there is NOTIFYed by its writer. Made once per
        invocation; checked with ``pgpubsub_notify_on_write()``."""
        key = (side.name, "notify-on-write")
        if key not in self.templates:
            dbname = self.databases.create(f"{side.name}_now", template=side.template_db)
            self.processes.run(
                f"{side.name}-migrate-notify-on-write",
                side.manage("migrate", "--noinput"),
                side.project,
                {**side.env(self.server, dbname, f"bench-{side.name}-setup"), **NOTIFY_ON_WRITE},
                COMMAND_TIMEOUT,
            )
            conn = self.server.connect(dbname)
            try:
                wakes = scalar(conn, "SELECT pgpubsub_notify_on_write(%s)", [EVENT_LISTEN_NAME])
            finally:
                conn.close()
            if not wakes:
                raise BenchmarkError(
                    "migrate with PGPUBSUB_NOTIFY_ON_WRITE = True left the Event channel "
                    "without per-write NOTIFY"
                )
            self.templates[key] = dbname
        return self.templates[key]

    @contextlib.contextmanager
    def listener(
        self,
        side: Side,
        dbname: str,
        engine: Engine,
        recover: bool = False,
        env: dict[str, str] | None = None,
    ) -> Iterator[Process]:
        process = engine.start(self.processes, self.server, side, dbname, recover, env)
        try:
            yield process
        finally:
            self.processes.stop(process)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool = True
    digits: int = 0


@dataclass(frozen=True)
class Workload:
    number: int
    name: str
    title: str
    metrics: tuple[Metric, ...]
    run: Callable[[Context, Side | None, Engine | None], dict[str, float]]
    #: What processes the notifications (``Engine.for_side`` adapts it to django-pgpubsub 1.3.1,
    #: or says it cannot run there).
    engine: Engine = Engine()
    #: Runs once per repetition, not per side (the hand-written ceiling).
    sideless: bool = False
    #: Runs only when the backlog size B is set (the full run; not ``--quick``).
    needs_backlog: bool = False
    #: Runs on this checkout only (django-pgpubsub 1.3.1 has nothing to compare).
    ours_only: bool = False
    #: Starts no listener (the log line then names no engine).
    listens: bool = True
    #: What it times runs on no side's database driver (the runner's psycopg2, pgbench): it runs
    #: once per repetition for this checkout, not again with psycopg 3 (``--psycopg3``).
    driver_free: bool = False
    #: Metrics that depend on the sizes (the writer counts of workload 34).
    metrics_for: Callable[[Sizes], tuple[Metric, ...]] | None = None

    def sized(self, sizes: Sizes) -> Workload:
        """This workload with the metrics of ``sizes``."""
        if self.metrics_for is None:
            return self
        return dataclasses.replace(self, metrics=self.metrics_for(sizes))


# --- helpers ----------------------------------------------------------------------------------


def scalar(conn, sql: str, params: list | None = None):
    with conn.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()[0]


def counter(conn, sql: str, target: int) -> Callable[[], bool]:
    return lambda: scalar(conn, sql) >= target


def percentiles(conn, table: str, where: str, prefix: str = "") -> dict[str, float]:
    """p50 and p99 of the ``latency`` column, in milliseconds."""
    with conn.cursor() as cursor:
        cursor.execute(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY latency), "
            f"percentile_cont(0.99) WITHIN GROUP (ORDER BY latency) FROM {table} WHERE {where}"
        )
        p50, p99 = cursor.fetchone()
    return {f"{prefix}p50_ms": p50 * 1000.0, f"{prefix}p99_ms": p99 * 1000.0}


def rate_since(conn, started_at: float, table: str = "benchapp_effect", where: str = "true"):
    """Rows per second from ``started_at`` (epoch seconds) to the last row's callback time, as
    the listener recorded it (``done_at``): not rounded up to the runner's next check."""
    count, last = _one(conn, f"SELECT count(*), max(done_at) FROM {table} WHERE {where}")
    if not count or last <= started_at:
        raise BenchmarkError(f"cannot time {count} rows of {table}")
    return count / (last - started_at)


def processing_rate(conn) -> float:
    """Effects per second from the first effect's callback to the last one's, so without the
    listener's start-up."""
    count, first, last = _one(
        conn, "SELECT count(*), min(done_at), max(done_at) FROM benchapp_effect"
    )
    if count < 2 or last <= first:
        raise BenchmarkError(f"cannot time the processing of {count} effects")
    return (count - 1) / (last - first)


def _one(conn, sql: str, params: list | None = None) -> tuple:
    with conn.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


def wait_ready(conn, listener: Process, workers: int = 1) -> None:
    """Send plain probe messages until ``workers`` listening processes have each processed one:
    they then LISTEN on every channel (both sides LISTEN on all channels before waiting)."""
    probes = 0

    def probe_processed() -> bool:
        nonlocal probes
        probes += 1
        payload = json.dumps({"kwargs": {"seq": -probes, "sent": time.time()}})
        with conn.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, %s)", [TICK_LISTEN_NAME, payload])
        listening = scalar(
            conn,
            "SELECT count(DISTINCT split_part(key, '-', 3)) FROM benchapp_item "
            "WHERE key LIKE 'probe-%'",
        )
        return listening >= workers

    wait_for(
        probe_processed,
        READY_TIMEOUT,
        f"{listener.name} to process a probe message in {workers} process(es)",
        watch=[listener],
        interval=PROBE_INTERVAL,
    )


def wait_effects(ctx: Context, conn, side: Side, events: int, listener: Process) -> None:
    """Until ``events`` effects exist."""
    wait_for(
        counter(conn, "SELECT count(*) FROM benchapp_effect", events),
        ctx.sizes.wait_timeout(events),
        f"{events} effects of {side.name}",
        watch=[listener],
    )


def threads_used(conn) -> float:
    """How many threads (of all processes) processed at least one row."""
    return float(scalar(conn, "SELECT count(DISTINCT worker) FROM benchapp_effect"))


def check_exactly_once(conn, listener: Process, expected: int) -> None:
    """Exactly ``expected`` effects, and every stored row deleted (acknowledged)."""
    wait_for(
        lambda: scalar(conn, "SELECT count(*) FROM pgpubsub_notification") == 0,
        30.0,
        "the stored rows to be deleted",
        watch=[listener],
    )
    done = scalar(conn, "SELECT count(*) FROM benchapp_effect")
    if done != expected:
        raise BenchmarkError(f"expected {expected} effects (exactly once), found {done}")


def paced(count: int, rate: float, send: Callable[[int], object]) -> float:
    """Call ``send(n)`` for n < count on a fixed schedule, n at start + n / rate (a late send
    does not shift the later ones); the most a send was late, in milliseconds."""
    start = time.perf_counter()
    late = 0.0
    for n in range(count):
        delay = start + n / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        else:
            late = max(late, -delay)
        send(n)
    return late * 1000.0


# --- 1, 9, 11. lockable trigger drain: rows stored, then ``listen --recover`` -----------------


def drain_stored(ctx: Context, side: Side, engine: Engine, size: str = "events"):
    """``size`` rows (``Sizes.events`` or ``Sizes.backlog``) inserted in one statement while no
    listener runs, then ``listen --recover`` (with the engine's options), or the embedded
    Runtimes (which recover at start), drain them."""
    events = getattr(ctx.sizes, size)
    with ctx.fresh_database(side) as (dbname, conn):
        with conn.cursor() as cursor:
            cursor.execute(INSERT_EVENTS, [events])
        stored = scalar(conn, "SELECT count(*) FROM pgpubsub_notification")
        if stored != events:
            raise BenchmarkError(f"{side.name}: the trigger stored {stored} of {events} rows")
        with ctx.listener(side, dbname, engine, recover=True) as listener:
            wait_effects(ctx, conn, side, events, listener)
            check_exactly_once(conn, listener, events)
        return {
            "rate": rate_since(conn, listener.started_at),
            "processing_rate": processing_rate(conn),
            "threads_used": threads_used(conn),
        }


# --- 2, 10. lockable trigger, one row per transaction, listener running ---------------------


def one_per_transaction(ctx: Context, side: Side, engine: Engine) -> dict[str, float]:
    events = ctx.sizes.events
    with ctx.fresh_database(side) as (dbname, conn):
        with ctx.listener(side, dbname, engine) as listener:
            wait_ready(conn, listener, engine.processes)
            started_at = time.time()
            with conn.cursor() as cursor:
                for n in range(events):
                    cursor.execute(INSERT_EVENT, [f"event-{n}"])
            inserted = time.time() - started_at
            wait_effects(ctx, conn, side, events, listener)
            check_exactly_once(conn, listener, events)
            return {
                "rate": rate_since(conn, started_at),
                **percentiles(conn, "benchapp_effect", "true"),
                "insert_rate": events / inserted,
                "threads_used": threads_used(conn),
            }


# --- 7, 12. lockable trigger, rows in one transaction, listener running ---------------------


def bulk_live(ctx: Context, side: Side, engine: Engine, size: str = "events") -> dict[str, float]:
    """``size`` rows (``Sizes.events`` or ``Sizes.backlog``) inserted in one statement (one
    transaction, like ``bulk_create``) while the listener runs: as many notifications arrive at
    once, and as many rows are stored."""
    events = getattr(ctx.sizes, size)
    with ctx.fresh_database(side) as (dbname, conn):
        with ctx.listener(side, dbname, engine) as listener:
            wait_ready(conn, listener, engine.processes)
            started_at = time.time()
            with conn.cursor() as cursor:
                cursor.execute(INSERT_EVENTS, [events])
            wait_effects(ctx, conn, side, events, listener)
            check_exactly_once(conn, listener, events)
            return {
                "rate": rate_since(conn, started_at),
                **percentiles(conn, "benchapp_effect", "true"),
                "threads_used": threads_used(conn),
            }


# --- 3. plain notify() send rate -------------------------------------------------------------


def run_driver(
    ctx: Context, side: Side, dbname: str, messages: int, rate: float = 0.0, command: str = "send"
) -> dict:
    """The side's ``driver.py COMMAND``: ``send`` (Tick) and ``ping`` (Ping) send plain
    messages, ``store`` stores lockable Job messages in one transaction."""
    output = ctx.processes.run(
        f"{side.name}-{command}",
        side.script("driver.py", command, str(messages), *([f"{rate:g}"] if rate else [])),
        side.project,
        side.env(ctx.server, dbname, f"bench-{side.name}-sender"),
        COMMAND_TIMEOUT + ctx.sizes.wait_timeout(messages),
    )
    return json.loads(output.strip().splitlines()[-1])


def notify_rate(ctx: Context, side: Side, engine: Engine) -> dict[str, float]:
    messages = ctx.sizes.messages
    with ctx.fresh_database(side) as (dbname, _conn):
        sent = run_driver(ctx, side, dbname, messages)
    return {"rate": messages / sent["seconds"]}


# --- 4. plain channel end to end --------------------------------------------------------------

TICKS = "SELECT count(*) FROM benchapp_item WHERE key LIKE 'tick-%'"


def wait_ticks(
    ctx: Context, conn, side: Side, messages: int, listener: Process, processes: int = 1
) -> None:
    """Until each of ``processes`` listening processes has recorded every one of ``messages``
    plain messages, exactly once."""
    expected = messages * processes
    wait_for(
        counter(conn, TICKS, expected),
        ctx.sizes.wait_timeout(expected),
        f"{messages} plain messages received by {processes} process(es) of {side.name}",
        watch=[listener],
    )
    with conn.cursor() as cursor:
        cursor.execute(
            "SELECT split_part(key, '-', 3), count(*) FROM benchapp_item "
            "WHERE key LIKE 'tick-%' GROUP BY 1"
        )
        per_process = dict(cursor.fetchall())
    if len(per_process) != processes or set(per_process.values()) != {messages}:
        raise BenchmarkError(
            f"sent {messages} plain messages to {processes} listening process(es); received "
            f"(pid: count) {per_process}"
        )


def plain_end_to_end(ctx: Context, side: Side, engine: Engine) -> dict[str, float]:
    """M plain messages at full speed; each listening process must receive every one (one
    process for ``listen``; every web process in embedded mode: a broadcast).

    ``rate`` counts messages (M / time from the first send to the last callback of any
    process), ``delivery_rate`` the callbacks of all processes; latencies are those of every
    callback."""
    messages = ctx.sizes.messages
    listening = engine.processes
    with ctx.fresh_database(side) as (dbname, conn):
        with ctx.listener(side, dbname, engine) as listener:
            wait_ready(conn, listener, listening)
            sent = run_driver(ctx, side, dbname, messages)
            wait_ticks(ctx, conn, side, messages, listener, listening)
            rate = rate_since(conn, sent["started"], "benchapp_item", "key LIKE 'tick-%'")
            return {
                "rate": rate / listening,
                "delivery_rate": rate,
                **percentiles(conn, "benchapp_item", "key LIKE 'tick-%'"),
            }


# --- 5. idle listener -------------------------------------------------------------------------


def idle_listener(ctx: Context, side: Side, engine: Engine) -> dict[str, float]:
    with ctx.fresh_database(side) as (dbname, conn):
        with ctx.listener(side, dbname, engine) as listener:
            wait_ready(conn, listener)
            startup = time.perf_counter() - listener.started
            before = listener.cpu_sample()
            switches = voluntary_switches(listener.tree())
            clock = time.perf_counter()
            time.sleep(ctx.sizes.idle_seconds)  # the measurement window itself
            after = listener.cpu_sample()
            switches = voluntary_switches(listener.tree()) - switches
            window = time.perf_counter() - clock
            cpu, resolution = before.seconds_until(after)
            rss = listener.rss_bytes()
            if not listener.alive():
                raise BenchmarkError(f"{listener.name} exited while idle:\n{listener.log_tail()}")
            return {
                "cpu_ms_per_s": cpu * 1000.0 / window,
                "wakeups_per_s": switches / window,
                "rss_mb": rss / 2**20,
                "startup_s": startup,
                "processes": float(len(listener.tree())),
                # Not shown in the table: 1.0 when the CPU time was read in nanoseconds.
                "cpu_in_ns": 1.0 if resolution == "ns" else 0.0,
            }


# --- 28. what the embedded Runtime adds to a web worker -----------------------------------------

#: Requests per second (to both workers together) while workload 28 measures serving workers.
REQUEST_RATE = 100.0
#: Workload 28 reads every worker's RSS this often until two readings in a row are the same
#: (the workers have settled), for at most SETTLE_TIMEOUT seconds.
SETTLE_INTERVAL = 0.5
SETTLE_TIMEOUT = 30.0

#: Which mode workload 28 measures first alternates from run to run.
_web_runs = itertools.count()


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over the Unix socket gunicorn listens on."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


def get_page(path: Path, url: str) -> str:
    """GET ``url`` from the server on Unix socket ``path`` (one connection: gunicorn's sync
    workers close it after each response); the body."""
    conn = UnixHTTPConnection(path, timeout=30.0)
    try:
        conn.request("GET", url)
        response = conn.getresponse()
        body = response.read().decode(errors="replace")
    finally:
        conn.close()
    if response.status != 200:
        raise BenchmarkError(f"GET {url}: HTTP {response.status}: {body[:500]}")
    return body


def _per_worker(values: dict[int, float]) -> float:
    return statistics.fmean(values.values())


def _cpu_ms_per_s(before: dict, after: dict, window: float) -> tuple[float, bool]:
    """Mean CPU per worker in ms per second of ``window``, and whether every worker was read
    in nanoseconds."""
    used, exact = {}, True
    for pid, sample in before.items():
        seconds, resolution = sample.seconds_until(after[pid])
        used[pid] = seconds * 1000.0 / window
        exact = exact and resolution == "ns"
    return _per_worker(used), exact


def _settle(web: Process, workers: list[int]) -> None:
    """Until no worker's RSS changed over SETTLE_INTERVAL (or SETTLE_TIMEOUT passed: the
    workers are then measured as they are)."""
    last: dict[int, int] = {}

    def unchanged() -> bool:
        nonlocal last
        now = {pid: rss_bytes(pid) for pid in workers}
        same, last = now == last, now
        return same

    with contextlib.suppress(BenchmarkError):  # the timeout; an exited gunicorn fails below
        wait_for(unchanged, SETTLE_TIMEOUT, "the workers to settle", interval=SETTLE_INTERVAL)
    if not web.alive():
        raise BenchmarkError(f"{web.name} exited:\n{web.log_tail()}")


def _web_mode(
    ctx: Context, side: Side, engine: Engine, dbname: str, conn, embedded: bool
) -> dict[str, float]:
    """Start gunicorn with ``PGPUBSUB_EMBEDDED`` on or off, wait for its workers to load the
    application (and, when on, for every Runtime to LISTEN), let them settle, then measure
    each worker idle for ``Sizes.web_seconds``, then serving REQUEST_RATE requests per second
    for as long."""
    ready_dir = Path(tempfile.mkdtemp(prefix="ready-", dir=side.project))
    env = {"BENCH_READY_DIR": str(ready_dir)}
    web = engine.start_web(ctx.processes, ctx.server, side, dbname, embedded, env)
    try:
        count = engine.processes

        def loaded() -> list[int] | None:
            workers = sorted(pid for pid in web.children() if (ready_dir / str(pid)).exists())
            return workers if len(workers) == count else None

        workers = wait_for(
            loaded, READY_TIMEOUT, f"{count} gunicorn workers to load the application", [web]
        )
        if embedded:
            wait_ready(conn, web, count)  # each worker's Runtime processed a probe: it LISTENs
            with conn.cursor() as cursor:
                cursor.execute(
                    "SELECT DISTINCT split_part(key, '-', 3)::int FROM benchapp_item "
                    "WHERE key LIKE 'probe-%'"
                )
                listening = sorted(row[0] for row in cursor.fetchall())
            if listening != workers:
                raise BenchmarkError(f"probes processed by {listening}, not the workers {workers}")
        _settle(web, workers)

        # Idle: no request, no notification.
        before = {pid: cpu_sample([pid]) for pid in workers}
        switches = voluntary_switches(workers)
        clock = time.perf_counter()
        time.sleep(ctx.sizes.web_seconds)  # the measurement window itself
        after = {pid: cpu_sample([pid]) for pid in workers}
        switches = voluntary_switches(workers) - switches
        idle_window = time.perf_counter() - clock
        idle_cpu, idle_exact = _cpu_ms_per_s(before, after, idle_window)
        rss = {pid: rss_bytes(pid) / 2**20 for pid in workers}
        threads = {pid: thread_count(pid) for pid in workers}
        sessions = scalar(
            conn,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
            [dbname, f"bench-{side.name}-web"],
        )

        # Serving: REQUEST_RATE requests per second, one page each (a query), paced.
        requests = max(1, round(REQUEST_RATE * ctx.sizes.web_seconds))
        latencies: list[float] = []

        def request(n: int) -> None:
            started = time.perf_counter()
            get_page(web.socket, "/ping")
            latencies.append(time.perf_counter() - started)

        before = {pid: cpu_sample([pid]) for pid in workers}
        clock = time.perf_counter()
        late = paced(requests, REQUEST_RATE, request)
        after = {pid: cpu_sample([pid]) for pid in workers}
        serve_cpu, serve_exact = _cpu_ms_per_s(before, after, time.perf_counter() - clock)
        served_rss = {pid: rss_bytes(pid) / 2**20 for pid in workers}
        if sorted(web.children()) != workers:
            raise BenchmarkError(
                f"the gunicorn workers changed while measured: {workers} -> "
                f"{sorted(web.children())}\n{web.log_tail()}"
            )
        latencies.sort()
        return {
            "rss_mb": _per_worker(rss),
            "cpu_ms_per_s": idle_cpu,
            "wakeups_per_s": switches / idle_window / count,
            "threads": _per_worker(threads),
            "sessions": sessions / count,
            "serve_cpu_ms_per_s": serve_cpu,
            "req_p50_ms": statistics.median(latencies) * 1000.0,
            "req_p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000.0,
            "served_rss_mb": _per_worker(served_rss),
            "late_ms": late,
            "cpu_in_ns": 1.0 if idle_exact and serve_exact else 0.0,
        }
    finally:
        ctx.processes.stop(web)


def web_overhead(ctx: Context, side: Side, engine: Engine) -> dict[str, float]:
    """What the embedded Runtime adds to a web process: gunicorn (``engine.processes`` sync
    workers) serving the benchmark project with ``PGPUBSUB_EMBEDDED`` off, then on (or on,
    then off: the order alternates from run to run), on the same database; each worker's RSS,
    CPU and wake-ups while idle and while serving, per worker (the mean of the workers)."""
    modes = (False, True) if next(_web_runs) % 2 == 0 else (True, False)
    measured = {}
    with ctx.fresh_database(side) as (dbname, conn):
        for embedded in modes:
            measured[embedded] = _web_mode(ctx, side, engine, dbname, conn, embedded)
    off, on = measured[False], measured[True]
    result = {}
    for key in ("rss_mb", "cpu_ms_per_s", "wakeups_per_s", "serve_cpu_ms_per_s", "served_rss_mb"):
        result[f"off_{key}"] = off[key]
        result[f"on_{key}"] = on[key]
        result[f"added_{key}"] = on[key] - off[key]
    for key in ("req_p50_ms", "req_p99_ms", "late_ms", "threads", "sessions"):
        result[f"off_{key}"] = off[key]
        result[f"on_{key}"] = on[key]
    result["cpu_in_ns"] = min(off["cpu_in_ns"], on["cpu_in_ns"])
    return result


# --- 8. latency at a fixed rate ---------------------------------------------------------------


def paced_latency(ctx: Context, side: Side, engine: Engine) -> dict[str, float]:
    """A producer at ``Sizes.rate`` messages/s for ``Sizes.paced_seconds``: first lockable
    trigger rows, one per transaction (the runner's INSERTs), then plain ``notify()`` (the
    side's driver); end-to-end latency of each. This checkout runs in its default mode (the
    writers only store the rows, the watcher wakes the listener; workload 35: per-write
    NOTIFY)."""
    count, rate = ctx.sizes.paced_count, ctx.sizes.rate
    with ctx.fresh_database(side) as (dbname, conn):
        if side.checkout and _notifies_on_write(conn):
            raise BenchmarkError("the database's functions NOTIFY on write (not the default)")
        with ctx.listener(side, dbname, engine) as listener:
            wait_ready(conn, listener)
            with conn.cursor() as cursor:
                trigger_late = paced(
                    count, rate, lambda n: cursor.execute(INSERT_EVENT, [f"event-{n}"])
                )
            wait_effects(ctx, conn, side, count, listener)
            check_exactly_once(conn, listener, count)
            sent = run_driver(ctx, side, dbname, count, rate)
            wait_ticks(ctx, conn, side, count, listener)
            return {
                **percentiles(conn, "benchapp_effect", "true", prefix="trigger_"),
                **percentiles(conn, "benchapp_item", "key LIKE 'tick-%'", prefix="plain_"),
                # Not shown in the table: how far behind its schedule each producer fell.
                "trigger_late_ms": trigger_late,
                "plain_late_ms": sent["late_ms"],
            }


# --- 6. ceiling: hand-written psycopg2 drain ---------------------------------------------------

CEILING_SCHEMA = """
CREATE TABLE event (id serial PRIMARY KEY, key text NOT NULL, sent_at double precision NOT NULL);
CREATE TABLE queue (
    id bigserial PRIMARY KEY, channel text NOT NULL, payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE effect (
    id serial PRIMARY KEY, key text NOT NULL UNIQUE, latency double precision,
    done_at double precision
);
CREATE FUNCTION store_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO queue (channel, payload) VALUES (
        'event',
        jsonb_build_object('app', 'benchapp', 'model', 'Event', 'old', NULL, 'new', to_jsonb(NEW))
    );
    RETURN NULL;
END $$;
CREATE TRIGGER store_event AFTER INSERT ON event FOR EACH ROW EXECUTE FUNCTION store_event();
"""


def ceiling(ctx: Context, side: Side | None, engine: Engine | None) -> dict[str, float]:
    events = ctx.sizes.events
    dbname = ctx.databases.create("ceiling")
    try:
        conn = ctx.server.connect(dbname)
        try:
            with conn.cursor() as cursor:
                cursor.execute(CEILING_SCHEMA)
                cursor.execute(
                    "INSERT INTO event (key, sent_at) SELECT 'event-' || n, "
                    "extract(epoch FROM clock_timestamp()) FROM generate_series(1, %s) n",
                    [events],
                )
            script = str(Path(__file__).resolve().parent / "ceiling.py")
            params = json.dumps(ctx.server.params(dbname))
            process = ctx.processes.start(
                "ceiling", [sys.executable, script, params, str(ctx.sizes.batch)], Path.cwd(), None
            )
            try:

                def drained() -> bool:
                    if process.popen.poll() not in (None, 0):
                        raise BenchmarkError(f"the ceiling loop failed:\n{process.log_tail()}")
                    return scalar(conn, "SELECT count(*) FROM effect") >= events

                wait_for(drained, ctx.sizes.wait_timeout(events), "the ceiling loop")
                wait_for(lambda: not process.alive(), 30.0, "the ceiling loop to exit")
                result = json.loads(process.log_path.read_text().strip().splitlines()[-1])
            finally:
                ctx.processes.stop(process)
            if scalar(conn, "SELECT count(*) FROM effect") != events:
                raise BenchmarkError("the ceiling loop did not process every row exactly once")
            rate = rate_since(conn, process.started_at, "effect")
        finally:
            conn.close()
    finally:
        ctx.databases.drop(dbname)
    return {"rate": rate, "loop_rate": result["rows"] / result["seconds"]}


# --- 29-33. what the library costs per message (issue 16) ---------------------------------------


def _listen_name(dotted: str) -> str:
    return "pgpubsub_" + hashlib.sha1(dotted.encode()).hexdigest()[:5]


#: The no-op channels: Job (lockable, stored with ``notify()``) and RowTrigger (a lockable
#: trigger channel on Row); the listeners count their callbacks in memory (benchapp/listeners.py).
JOB_LISTEN_NAME = _listen_name("benchapp.channels.Job")
ROW_LISTEN_NAME = _listen_name("benchapp.channels.RowTrigger")
EVENT_LISTEN_NAME = _listen_name("benchapp.channels.EventTrigger")
INSERT_ROWS = INSERT_EVENTS.replace("benchapp_event", "benchapp_row")
#: The raw drain: what a hand-written psycopg2 consumer of the same stored rows does per batch
#: (the conditions select the rows a listener would claim, through the same partial index).
RAW_CLAIM = (
    "DELETE FROM pgpubsub_notification WHERE id IN ("
    "SELECT id FROM pgpubsub_notification WHERE channel = %s "
    "AND failed_at IS NULL AND next_attempt_at IS NULL "
    "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING payload"
)


def store_noop(ctx: Context, side: Side, dbname: str, conn, kind: str, count: int) -> None:
    """``count`` stored rows of the no-op channel ``kind``: Job messages stored by the side's
    ``notify()`` in one transaction, or Rows inserted in one statement (the trigger stores
    them)."""
    if kind == "job":
        run_driver(ctx, side, dbname, count, command="store")
    else:
        with conn.cursor() as cursor:
            cursor.execute(INSERT_ROWS, [count])
    stored = scalar(conn, "SELECT count(*) FROM pgpubsub_notification")
    if stored != count:
        raise BenchmarkError(f"{side.name}: {stored} of {count} {kind} rows stored")


def read_tallies(directory: Path, name: str) -> list[dict]:
    """What the no-op listener ``name`` of each process wrote (see benchapp/listeners.py)."""
    return [json.loads(path.read_text()) for path in sorted(directory.glob(f"{name}-*.json"))]


def wait_tally(ctx: Context, directory: Path, name: str, expected: int, listener: Process) -> dict:
    """Until the listener ``name`` ran ``expected`` callbacks (over all processes): the count,
    the first and last callback times and every latency recorded."""
    wait_for(
        lambda: sum(t["count"] for t in read_tallies(directory, name)) >= expected,
        ctx.sizes.wait_timeout(expected),
        f"{expected} callbacks of the no-op listener {name}",
        watch=[listener],
    )
    tallies = read_tallies(directory, name)
    return {
        "count": sum(t["count"] for t in tallies),
        "first": min(t["first"] for t in tallies),
        "last": max(t["last"] for t in tallies),
        "latencies": sorted(lat for t in tallies for lat in t["latencies"]),
    }


def tally_env(side: Side, expected: int) -> tuple[Path, dict[str, str]]:
    directory = Path(tempfile.mkdtemp(prefix="tally-", dir=side.project))
    return directory, {"BENCH_EXPECTED": str(expected), "BENCH_RESULT_DIR": str(directory)}


def noop_drain(ctx: Context, side: Side, engine: Engine, kind: str = "job") -> dict[str, float]:
    """N stored rows of a lockable channel whose listener does nothing (``job``: a plain
    channel, rows stored with ``notify()``; ``row``: a trigger channel, its listener given model
    instances built from the row images), drained by ``listen --recover``. Exactly once: N
    callbacks and no stored row left."""
    rows = ctx.sizes.noop_rows
    with ctx.fresh_database(side) as (dbname, conn):
        store_noop(ctx, side, dbname, conn, kind, rows)
        directory, env = tally_env(side, rows)
        with ctx.listener(side, dbname, engine, recover=True, env=env) as listener:
            tally = wait_tally(ctx, directory, kind, rows, listener)
            wait_for(
                lambda: scalar(conn, "SELECT count(*) FROM pgpubsub_notification") == 0,
                30.0,
                "the stored rows to be deleted",
                watch=[listener],
            )
            tally = wait_tally(ctx, directory, kind, rows, listener)  # a late duplicate?
        if tally["count"] != rows:
            raise BenchmarkError(
                f"expected {rows} callbacks (exactly once), found {tally['count']}"
            )
        if tally["last"] <= tally["first"]:
            raise BenchmarkError(f"cannot time {rows} callbacks")
        return {
            "rate": (rows - 1) / (tally["last"] - tally["first"]),
            "from_start": rows / (tally["last"] - listener.started_at),
        }


def raw_loop(params: dict, channel: str, batch: int, expected: int) -> float:
    """The hand-written drain of ``channel``'s stored rows, in the runner's process: claim and
    delete ``batch`` rows in one statement, decode each payload (psycopg2 decodes jsonb with
    ``json.loads``), commit; messages per second of the loop."""
    conn = psycopg2.connect(**params)
    try:
        done = 0
        clock = time.perf_counter()
        with conn.cursor() as cursor:
            while True:
                cursor.execute(RAW_CLAIM, [channel, batch])
                payloads = [payload for (payload,) in cursor.fetchall()]
                conn.commit()
                if not payloads:
                    break
                if not isinstance(payloads[0], dict):
                    raise BenchmarkError(f"the raw drain read {type(payloads[0])}, not a dict")
                done += len(payloads)
        seconds = time.perf_counter() - clock
    finally:
        conn.close()
    if done != expected:
        raise BenchmarkError(f"the raw drain found {done} rows of {channel}, not {expected}")
    return done / seconds


def raw_drain(ctx: Context, side: Side, engine: Engine) -> dict[str, float]:
    """The raw ceiling of workloads 29 and 30: the same N stored rows (Job rows stored by
    ``notify()``, then Row rows stored by the trigger) drained by ``raw_loop``, RAW_LOOPS
    times each (stored again each time): the median. The loop takes a fraction of a second,
    where one hiccup of a shared machine weighs a lot."""
    rows = ctx.sizes.noop_rows
    result = {}
    with ctx.fresh_database(side) as (dbname, conn):
        for kind, channel, key in (
            ("job", JOB_LISTEN_NAME, "rate"),
            ("row", ROW_LISTEN_NAME, "trigger_rate"),
        ):
            rates = []
            for _ in range(RAW_LOOPS):
                store_noop(ctx, side, dbname, conn, kind, rows)
                rates.append(raw_loop(ctx.server.params(dbname), channel, RAW_BATCH, rows))
            result[key] = statistics.median(rates)
    return result


#: Rows per transaction of the raw drain (issue 16's reference loop).
RAW_BATCH = 100
#: Drains of each kind of rows per run of workload 31 (their median counts).
RAW_LOOPS = 3


def orm_loop(ctx: Context, side: Side, engine: Engine) -> dict[str, float]:
    """K Events stored as in workload 1, drained by ``orm_loop.py``: the benchmark's listener
    function called by a hand-written loop with the Runtime's batching and atomicity."""
    events = ctx.sizes.events
    with ctx.fresh_database(side) as (dbname, conn):
        with conn.cursor() as cursor:
            cursor.execute(INSERT_EVENTS, [events])
        output = ctx.processes.run(
            f"{side.name}-orm-loop",
            side.script("orm_loop.py", EVENT_LISTEN_NAME),
            side.project,
            side.env(ctx.server, dbname, f"bench-{side.name}-orm-loop"),
            COMMAND_TIMEOUT + ctx.sizes.wait_timeout(events),
        )
        loop = json.loads(output.strip().splitlines()[-1])
        left = scalar(conn, "SELECT count(*) FROM pgpubsub_notification")
        done = scalar(conn, "SELECT count(*) FROM benchapp_effect")
        if left or done != events:
            raise BenchmarkError(f"the ORM loop made {done} effects of {events}, left {left}")
        return {
            "processing_rate": processing_rate(conn),
            "loop_rate": loop["rows"] / loop["seconds"],
            "batch": float(loop["batch"]),
        }


def _percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (as ``percentile_cont``)."""
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ping_end_to_end(ctx: Context, side: Side, engine: Engine) -> dict[str, float]:
    """M plain messages at full producer speed to a listener that only records, in memory,
    each message's latency (callback time - send time): msgs/s from the first send to the last
    callback, latency p50/p99, and the producer's own rate."""
    messages = ctx.sizes.messages
    with ctx.fresh_database(side) as (dbname, conn):
        directory, env = tally_env(side, messages)
        with ctx.listener(side, dbname, engine, env=env) as listener:
            wait_ready(conn, listener, engine.processes)
            sent = run_driver(ctx, side, dbname, messages, command="ping")
            tally = wait_tally(ctx, directory, "ping", messages * engine.processes, listener)
    if tally["count"] != messages * engine.processes:
        raise BenchmarkError(f"sent {messages} pings, {tally['count']} callbacks ran")
    latencies = tally["latencies"]
    return {
        "rate": messages / (tally["last"] - sent["started"]),
        "p50_ms": _percentile(latencies, 0.5) * 1000.0,
        "p99_ms": _percentile(latencies, 0.99) * 1000.0,
        "send_rate": messages / sent["seconds"],
    }


# --- 34. writers' commits per second (issue 15) ------------------------------------------------

#: (a) a table like Event without trigger and (d) one whose hand-written trigger stores the
#: same payload as this checkout's trigger into pgpubsub_notification, without NOTIFY.
WRITER_SCHEMA = """
CREATE TABLE bench_plain (LIKE benchapp_event INCLUDING ALL);
CREATE TABLE bench_stored (LIKE benchapp_event INCLUDING ALL);
CREATE FUNCTION bench_store_only() RETURNS trigger LANGUAGE plpgsql AS $bench$
DECLARE
    payload jsonb;
    notification_context_text text;
BEGIN
    notification_context_text := current_setting('pgpubsub.notification_context', true);
    payload := jsonb_build_object(
        'app', 'benchapp', 'model', 'Event', 'old', NULL, 'new', to_jsonb(NEW),
        'context', COALESCE(NULLIF(notification_context_text, '')::jsonb, '{}'::jsonb),
        'when', TG_WHEN
    );
    INSERT INTO pgpubsub_notification (channel, payload) VALUES ('bench_store_only', payload);
    RETURN NULL;
END
$bench$;
CREATE TRIGGER bench_store_only AFTER INSERT ON bench_stored
FOR EACH ROW EXECUTE FUNCTION bench_store_only();
"""
#: What each writer target INSERTs into, on which side's database (and, for (b'), which
#: template: this checkout's migrated with ``PGPUBSUB_NOTIFY_ON_WRITE = True``).
WRITER_TARGETS = (
    ("plain", "ours", "bench_plain"),  # (a)
    ("trigger", "ours", "benchapp_event"),  # (b) this checkout's lockable trigger, default mode
    ("notify", "ours", "benchapp_event"),  # (b') the same with per-write NOTIFY
    ("theirs", "theirs", "benchapp_event"),  # (c) django-pgpubsub 1.3.1's
    ("stored", "ours", "bench_stored"),  # (d) store only, no NOTIFY
)
#: The targets compared with (a).
WRITER_RATIOS = ("trigger", "notify", "theirs", "stored")


def commits(ctx: Context, dbname: str, table: str, connections: int, seconds: float) -> tuple:
    """(commits, seconds) of ``connections`` writers into ``table`` for ``seconds``."""
    result = run_writers(ctx, dbname, table, connections, seconds)
    return result["commits"], result["seconds"]


def pgbench() -> str | None:
    """The pgbench on the PATH, if any: the writers of workloads 34 and 36 then."""
    return shutil.which("pgbench")


def writer_client() -> str:
    """Which client the writers of workloads 34 and 36 are, for the report."""
    if pgbench():
        return "pgbench (simple query protocol, `-c N -j N`)"
    return "Python processes (writers.py, psycopg2)"


def writer_seconds(seconds: float) -> float:
    """How long the writers actually write when asked for ``seconds``: pgbench's ``-T`` takes
    whole seconds (at least 1), writers.py any duration."""
    return float(max(1, math.ceil(seconds - 1e-9))) if pgbench() else seconds


#: The writers' transaction: one INSERT, as writers.py does it (``sent_at``: the time of the
#: inserting statement, which workload 36 measures its latencies from).
WRITER_INSERT = (
    "INSERT INTO {table} (key, sent_at) VALUES ('w', extract(epoch FROM clock_timestamp()))"
)


def _conninfo(params: dict) -> str:
    """A libpq connection string of ``params`` but the password (given in PGPASSWORD)."""

    def quoted(value) -> str:
        text = str(value).replace("\\", "\\\\").replace("'", "\\'")
        return f"'{text}'"

    return " ".join(f"{key}={quoted(value)}" for key, value in params.items() if key != "password")


def run_writers(ctx: Context, dbname: str, table: str, connections: int, seconds: float) -> dict:
    """``connections`` writers INSERT into ``table`` for ``seconds`` (see ``writer_seconds``),
    one row per transaction: pgbench when it is on the PATH, else ``writers.py``.
    ``{"commits", "seconds", "rate"}``."""
    if pgbench():
        return run_pgbench(ctx, dbname, table, connections, seconds)
    script = str(Path(__file__).resolve().parent / "writers.py")
    params = json.dumps(ctx.server.params(dbname))
    output = ctx.processes.run(
        f"writers-{table}-{connections}",
        [sys.executable, script, params, table, str(connections), f"{seconds:g}"],
        Path.cwd(),
        None,
        COMMAND_TIMEOUT + seconds,
    )
    return json.loads(output.strip().splitlines()[-1])


def run_pgbench(ctx: Context, dbname: str, table: str, connections: int, seconds: float) -> dict:
    """``pgbench -n -c N -j N -T S -f <script>``: N connections (one thread each), each running
    the one-INSERT transaction in a loop, in autocommit, for S whole seconds. The simple query
    protocol (pgbench's default), as Django and writers.py send their statements: ``-M
    prepared`` would spare every target the parsing and planning of each INSERT, which a Django
    application does not. The rate is pgbench's tps without the initial connection time, over
    the transactions it processed (each one commit)."""
    duration = int(writer_seconds(seconds))
    script = ctx.processes.logs / f"pgbench-{table}.sql"
    script.write_text(WRITER_INSERT.format(table=table) + ";\n")
    params = ctx.server.params(dbname)
    env = dict(os.environ)
    if params.get("password"):
        env["PGPASSWORD"] = str(params["password"])
    output = ctx.processes.run(
        f"pgbench-{table}-{connections}",
        [
            *[pgbench() or "pgbench", "-n", "-c", str(connections), "-j", str(connections)],
            *["-T", str(duration), "-f", str(script), _conninfo(params)],
        ],
        Path.cwd(),
        env,
        COMMAND_TIMEOUT + duration,
    )
    return parse_pgbench(output)


def parse_pgbench(output: str) -> dict:
    """``{"commits", "seconds", "rate"}`` of pgbench's report: the transactions it processed,
    and its tps without the initial connection time (older versions: "excluding connections
    establishing"; else the only tps line)."""
    processed = re.search(r"^number of transactions actually processed: (\d+)", output, re.M)
    failed = re.search(r"^number of failed transactions: (\d+)", output, re.M)
    rates = re.findall(r"^tps = ([\d.]+)(?: \((.*)\))?", output, re.M)
    if processed is None or not rates:
        raise BenchmarkError(f"pgbench printed no transaction count or tps:\n{output[-2000:]}")
    if failed is not None and int(failed.group(1)):
        raise BenchmarkError(f"pgbench: {failed.group(1)} transactions failed:\n{output[-2000:]}")
    without = [
        rate
        for rate, how in rates
        if "without initial connection" in how or "excluding connections" in how
    ]
    rate = float(without[0] if without else rates[-1][0])
    count = int(processed.group(1))
    return {"commits": count, "seconds": count / rate if rate else 0.0, "rate": rate}


def _notifies_on_write(conn) -> bool:
    """Whether the database's SQL functions NOTIFY with each Event row stored."""
    return bool(scalar(conn, "SELECT pgpubsub_notify_on_write(%s)", [EVENT_LISTEN_NAME]))


def writers(ctx: Context, side: Side, engine: Engine) -> dict[str, float]:
    """Commits/s of 1, 4, 16 (``Sizes.writers``) concurrent writers, one INSERT per
    transaction, for ``Sizes.writer_seconds`` each, into (a) a table without trigger, (b) the
    model of this checkout's lockable trigger channel in its default mode (the row stored, no
    NOTIFY: the watcher wakes the listeners), (b') the same with per-write NOTIFY
    (``PGPUBSUB_NOTIFY_ON_WRITE = True``), (c) the same model in a database migrated by
    django-pgpubsub 1.3.1 (its trigger: store + NOTIFY), (d) a table whose hand-written trigger
    only stores the row; each on a fresh database, no listener running. The ratios to (a) are
    taken within the run.

    Each target is measured in two halves, in the order a, b, b', c, d then d, c, b', b, a, so
    that a load that rises or falls on a shared machine weighs on every target alike."""
    result: dict[str, float] = {}
    half = ctx.sizes.writer_seconds / 2
    ours = ctx.sides["ours"]
    templates = {"notify": ctx.notify_on_write_template(ours)}
    for connections in ctx.sizes.writers:
        targets = [t for t in WRITER_TARGETS if t[1] in ctx.sides]  # (c): not --skip-theirs
        with contextlib.ExitStack() as stack:
            databases = {}
            for key, side_name, _ in targets:
                dbname, conn = stack.enter_context(
                    ctx.fresh_database(ctx.sides[side_name], templates.get(key))
                )
                if side_name == "ours":
                    with conn.cursor() as cursor:
                        cursor.execute(WRITER_SCHEMA)
                    if key in ("trigger", "notify") and _notifies_on_write(conn) != (
                        key == "notify"
                    ):
                        raise BenchmarkError(f"the database of ({key}) is not in its mode")
                databases[key] = dbname, conn
            done = {key: [0, 0.0] for key, _, _ in targets}
            for key, _, table in targets + targets[::-1]:
                count, seconds = commits(ctx, databases[key][0], table, connections, half)
                done[key][0] += count
                done[key][1] += seconds
            for key, side_name, table in targets:
                result[f"{key}_c{connections}"] = done[key][0] / done[key][1]
                if table == "benchapp_event":  # the trigger did store every row
                    stored = scalar(databases[key][1], "SELECT count(*) FROM pgpubsub_notification")
                    if stored != done[key][0]:
                        raise BenchmarkError(
                            f"{side_name}'s trigger ({key}) stored {stored} rows of {done[key][0]}"
                        )
        for key in WRITER_RATIOS:
            if f"{key}_c{connections}" in result:
                result[f"{key}_ratio_c{connections}"] = (
                    result[f"{key}_c{connections}"] / result[f"plain_c{connections}"]
                )
    return result


_WRITER_TITLES = {
    "plain": "(a) table without trigger",
    "trigger": "(b) lockable trigger channel, default (store only, watcher wakes)",
    "notify": "(b') lockable trigger channel, per-write NOTIFY",
    "theirs": "(c) 1.3.1's lockable trigger channel",
    "stored": "(d) hand-written store-only trigger",
}
_WRITER_SHORT = {"trigger": "(b)", "notify": "(b')", "theirs": "(c)", "stored": "(d)"}


def writer_metrics(sizes: Sizes) -> tuple[Metric, ...]:
    """Commits/s of (a)-(d) and the ratios of (b)-(d) to (a), for each number of writers."""
    metrics = []
    for connections in sizes.writers:
        writers = f"{connections} writer{'s' if connections > 1 else ''}"
        for key, _, _ in WRITER_TARGETS:
            metrics.append(
                Metric(
                    f"{key}_c{connections}",
                    f"{_WRITER_TITLES[key]}, {writers}",
                    "commits/s",
                )
            )
        for key in WRITER_RATIOS:
            metrics.append(
                Metric(
                    f"{key}_ratio_c{connections}",
                    f"{_WRITER_SHORT[key]}/(a), {writers}",
                    "",
                    digits=2,
                )
            )
    return tuple(metrics)


# --- 35-38. delivery without NOTIFY in the writer's transaction (issue 15) -----------------------


def paced_on_write(ctx: Context, side: Side, engine: Engine) -> dict[str, float]:
    """Workload 8's lockable trigger rows (paced, one per transaction), in a database whose SQL
    functions NOTIFY with each stored row (``PGPUBSUB_NOTIFY_ON_WRITE = True``, the listener
    run with it too): the latency of the per-write mode, beside workload 8's default mode."""
    count, rate = ctx.sizes.paced_count, ctx.sizes.rate
    with ctx.fresh_database(side, ctx.notify_on_write_template(side)) as (dbname, conn):
        if not _notifies_on_write(conn):
            raise BenchmarkError("the database's functions do not NOTIFY on write")
        with ctx.listener(side, dbname, engine, env=NOTIFY_ON_WRITE) as listener:
            wait_ready(conn, listener)
            with conn.cursor() as cursor:
                late = paced(count, rate, lambda n: cursor.execute(INSERT_EVENT, [f"event-{n}"]))
            wait_effects(ctx, conn, side, count, listener)
            check_exactly_once(conn, listener, count)
            return {
                **percentiles(conn, "benchapp_effect", "true", prefix="trigger_"),
                "trigger_late_ms": late,  # not shown: how far behind its schedule it fell
            }


class WakeUps:
    """A LISTEN session of the runner on the Event channel: counts the NOTIFYs sent to it (the
    watcher's wake-ups, or the writers' per-write NOTIFYs)."""

    def __init__(self, ctx: Context, dbname: str) -> None:
        self.conn = ctx.server.connect(dbname)
        with self.conn.cursor() as cursor:
            cursor.execute(f"LISTEN {EVENT_LISTEN_NAME}")

    def count(self) -> int:
        """NOTIFYs received since the last call."""
        self.conn.poll()
        received = sum(1 for n in self.conn.notifies if n.channel == EVENT_LISTEN_NAME)
        self.conn.notifies.clear()
        return received

    def close(self) -> None:
        self.conn.close()


def burst(ctx: Context, side: Side, engine: Engine) -> dict[str, float]:
    """A running ``listen`` (default mode: writers only store rows); ``Sizes.burst_writers``
    writer processes (``writers.py``) INSERT Events at full speed for ``Sizes.burst_seconds``.
    Every row processed exactly once; latency from each row's commit (``sent_at``, the
    inserting statement's ``clock_timestamp()``) to its effect, the writers' rate, the time the
    listener took to catch up after the last insert, and the wake-ups sent on the channel."""
    with ctx.fresh_database(side) as (dbname, conn):
        if _notifies_on_write(conn):
            raise BenchmarkError("the database's functions NOTIFY on write (not the default)")
        wakeups = WakeUps(ctx, dbname)
        try:
            with ctx.listener(side, dbname, engine) as listener:
                wait_ready(conn, listener, engine.processes)
                wakeups.count()  # none expected yet
                written = run_writers(
                    ctx, dbname, "benchapp_event", ctx.sizes.burst_writers, ctx.sizes.burst_seconds
                )
                events = written["commits"]
                inserted, first_sent, last_sent = _one(
                    conn, "SELECT count(*), min(sent_at), max(sent_at) FROM benchapp_event"
                )
                if inserted != events:
                    raise BenchmarkError(f"the writers reported {events} rows, {inserted} exist")
                wait_effects(ctx, conn, side, events, listener)
                check_exactly_once(conn, listener, events)
                last_done = scalar(conn, "SELECT max(done_at) FROM benchapp_effect")
                woken = wakeups.count()
        finally:
            wakeups.close()
        return {
            "rows": float(events),
            "write_rate": written["rate"],
            "rate": events / (last_done - first_sent),
            **percentiles(conn, "benchapp_effect", "true"),
            "catch_up_s": max(0.0, last_done - last_sent),
            "wakeups": float(woken),
        }


#: Runtimes (``manage.py listen`` processes) of the deployment of workload 37.
DEPLOYMENT_RUNTIMES = 4
#: What the elected watcher logs (pgpubsub.runtime, INFO).
WATCHING = "for new stored notifications"


def transactions(conn) -> int:
    """Transactions committed and rolled back in the connection's database so far (each
    autocommit statement is one), as the statistics collector counts them."""
    return int(
        scalar(
            conn,
            "SELECT xact_commit + xact_rollback FROM pg_stat_database "
            "WHERE datname = current_database()",
        )
    )


def watcher_idle(ctx: Context, side: Side, engine: Engine) -> dict[str, float]:
    """DEPLOYMENT_RUNTIMES ``listen`` processes on one database with a lockable channel, idle:
    once each processed a probe, one logged that it watches, and ``Sizes.settle_seconds``
    passed, over ``Sizes.watch_seconds``: the database's queries per second (transactions of
    ``pg_stat_database``, less the runner's own) and each process's CPU."""
    runtimes = DEPLOYMENT_RUNTIMES
    with ctx.fresh_database(side) as (dbname, conn):
        with contextlib.ExitStack() as stack:
            listeners = [
                stack.enter_context(ctx.listener(side, dbname, engine)) for _ in range(runtimes)
            ]
            wait_ready(conn, listeners[0], runtimes)

            def watching() -> list[Process]:
                return [p for p in listeners if WATCHING in p.log_path.read_text(errors="replace")]

            wait_for(watching, READY_TIMEOUT, "a Runtime to log that it watches", listeners)
            time.sleep(ctx.sizes.settle_seconds)  # start-up sweeps and probes are over
            before = {p.pid: p.cpu_sample() for p in listeners}
            switches = {p.pid: voluntary_switches(p.tree()) for p in listeners}
            counted = transactions(conn)
            clock = time.perf_counter()
            time.sleep(ctx.sizes.watch_seconds)  # the measurement window itself
            # The runner's own transaction in the window: the first reading (the second one
            # reads before it commits).
            queries = transactions(conn) - counted - 1
            window = time.perf_counter() - clock
            after = {p.pid: p.cpu_sample() for p in listeners}
            woke = {
                p.pid: (voluntary_switches(p.tree()) - switches[p.pid]) / window for p in listeners
            }
            for process in listeners:
                if not process.alive():
                    raise BenchmarkError(f"{process.name} exited:\n{process.log_tail()}")
            used = {pid: sample.seconds_until(after[pid]) for pid, sample in before.items()}
            cpu = {pid: seconds * 1000.0 / window for pid, (seconds, _) in used.items()}
            watchers = watching()
    return {
        "queries_per_s": queries / window,
        "cpu_max_ms_per_s": max(cpu.values()),
        "cpu_median_ms_per_s": statistics.median(cpu.values()),
        "cpu_watcher_ms_per_s": cpu[watchers[0].pid],
        "cpu_total_ms_per_s": sum(cpu.values()),
        "watchers": float(len(watchers)),
        "wakeups_watcher_per_s": woke[watchers[0].pid],
        "wakeups_median_per_s": statistics.median(woke.values()),
        # Not shown in the table: 1.0 when every Runtime's CPU time was read in nanoseconds.
        "cpu_in_ns": 1.0 if all(how == "ns" for _, how in used.values()) else 0.0,
    }


#: gunicorn workers of workload 38, each with an embedded Runtime.
SESSION_WEB_WORKERS = 8


def client_sessions(conn) -> int:
    """Client sessions on the connection's database, but for the connection's own."""
    return int(
        scalar(
            conn,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
        )
    )


def embedded_sessions(ctx: Context, side: Side, engine: Engine) -> dict[str, float]:
    """Database sessions of ``engine.processes`` idle gunicorn workers with an embedded Runtime
    (``PGPUBSUB_IDLE_CONNECTION_TIMEOUT`` = ``Sizes.idle_connection_timeout``): once every
    worker loaded the application and ``Sizes.settle_seconds`` passed (before any message);
    the most seen while they process K Events inserted one per transaction (every row exactly
    once); and once the idle timeout and 2 s more passed after the last effect."""
    count, events = engine.processes, ctx.sizes.events
    timeout = ctx.sizes.idle_connection_timeout
    with ctx.fresh_database(side) as (dbname, conn):
        ready_dir = Path(tempfile.mkdtemp(prefix="ready-", dir=side.project))
        env = {"BENCH_READY_DIR": str(ready_dir), "BENCH_IDLE_CONNECTION_TIMEOUT": f"{timeout:g}"}
        web = engine.start_web(ctx.processes, ctx.server, side, dbname, True, env)
        try:

            def loaded() -> list[int] | None:
                workers = sorted(p for p in web.children() if (ready_dir / str(p)).exists())
                return workers if len(workers) == count else None

            workers = wait_for(
                loaded, READY_TIMEOUT, f"{count} gunicorn workers to load the application", [web]
            )
            time.sleep(ctx.sizes.settle_seconds)
            at_start = client_sessions(conn)
            wait_ready(conn, web, count)  # every worker's Runtime LISTENs (a probe each)
            with conn.cursor() as cursor:
                cursor.execute(
                    "SELECT DISTINCT split_part(key, '-', 3)::int FROM benchapp_item "
                    "WHERE key LIKE 'probe-%'"
                )
                listening = sorted(row[0] for row in cursor.fetchall())
            if listening != workers:
                raise BenchmarkError(f"probes processed by {listening}, not the workers {workers}")
            busiest = client_sessions(conn)
            with conn.cursor() as cursor:
                for n in range(events):
                    cursor.execute(INSERT_EVENT, [f"event-{n}"])

            def processed() -> bool:
                nonlocal busiest
                busiest = max(busiest, client_sessions(conn))
                return scalar(conn, "SELECT count(*) FROM benchapp_effect") >= events

            wait_for(processed, ctx.sizes.wait_timeout(events), f"{events} effects", [web])
            check_exactly_once(conn, web, events)
            time.sleep(timeout + 2.0)
            after_work = client_sessions(conn)
            if sorted(web.children()) != workers:
                raise BenchmarkError(f"the gunicorn workers changed:\n{web.log_tail()}")
            return {
                "start_sessions": float(at_start),
                "busy_sessions": float(busiest),
                "idle_sessions": float(after_work),
                "threads_used": threads_used(conn),
            }
        finally:
            ctx.processes.stop(web)


# --- the list -----------------------------------------------------------------------------------

RATE = Metric("rate", "throughput", "rows/s")
FROM_START = Metric("rate", "throughput from listener start", "rows/s")
PROCESSING = Metric("processing_rate", "throughput, first to last effect", "rows/s")
P50 = Metric("p50_ms", "latency p50", "ms", higher_is_better=False, digits=1)
P99 = Metric("p99_ms", "latency p99", "ms", higher_is_better=False, digits=1)
PRODUCER = Metric("insert_rate", "the producer's insert rate", "rows/s")
MSGS = Metric("rate", "throughput", "msgs/s")

DRAIN_METRICS = (FROM_START, PROCESSING)
ONE_PER_TX_METRICS = (RATE, P50, P99, PRODUCER)
BULK_METRICS = (RATE, P50, P99)
PLAIN_METRICS = (MSGS, P50, P99)
BROADCAST_METRICS = (
    MSGS,
    Metric("delivery_rate", "callbacks, all processes", "per s"),
    P50,
    P99,
)
_SERVING = f"serving {REQUEST_RATE:g} req/s"
WEB_METRICS = (
    Metric("off_rss_mb", "RSS per worker, Runtime off", "MB", False, 1),
    Metric("on_rss_mb", "RSS per worker, Runtime on", "MB", False, 1),
    Metric("added_rss_mb", "RSS the Runtime adds per worker", "MB", False, 1),
    Metric("off_cpu_ms_per_s", "idle CPU per worker, Runtime off", "ms/s", False, 2),
    Metric("on_cpu_ms_per_s", "idle CPU per worker, Runtime on", "ms/s", False, 2),
    Metric("added_cpu_ms_per_s", "idle CPU the Runtime adds per worker", "ms/s", False, 2),
    Metric("off_wakeups_per_s", "idle wake-ups per worker, Runtime off", "per s", False, 1),
    Metric("on_wakeups_per_s", "idle wake-ups per worker, Runtime on", "per s", False, 1),
    Metric("off_threads", "threads per worker, Runtime off", "", False, 0),
    Metric("on_threads", "threads per worker, Runtime on", "", False, 0),
    Metric("off_sessions", "database sessions per worker while idle, Runtime off", "", False, 1),
    Metric("on_sessions", "database sessions per worker while idle, Runtime on", "", False, 1),
    Metric("off_serve_cpu_ms_per_s", f"CPU per worker {_SERVING}, Runtime off", "ms/s", False, 2),
    Metric("on_serve_cpu_ms_per_s", f"CPU per worker {_SERVING}, Runtime on", "ms/s", False, 2),
    Metric("off_req_p50_ms", f"request latency p50 {_SERVING}, Runtime off", "ms", False, 2),
    Metric("on_req_p50_ms", f"request latency p50 {_SERVING}, Runtime on", "ms", False, 2),
    Metric("off_req_p99_ms", f"request latency p99 {_SERVING}, Runtime off", "ms", False, 2),
    Metric("on_req_p99_ms", f"request latency p99 {_SERVING}, Runtime on", "ms", False, 2),
    Metric("added_served_rss_mb", "RSS the Runtime adds per worker, after serving", "MB", False, 1),
)

TWO_PROCESSES = Engine(processes=2)
EMBEDDED = Engine(embedded=True, processes=EMBEDDED_WEB_WORKERS, threads=EMBEDDED_THREADS)
#: In the titles of the embedded workloads: what django-pgpubsub 1.3.1 runs instead.
THEIRS_INSTEAD = f"1.3.1: `listen --processes {EMBEDDED_WEB_WORKERS}`"


def _with(engine: Engine) -> str:
    return " ".join(engine.listen_args())


def _scaling(number: int, name: str, base: str, engine: Engine) -> Workload:
    """Workload ``base`` (1, 2 or 7) run by ``listen`` with other ``--processes``/``--threads``."""
    run, metrics, recover, of = {
        "drain": (drain_stored, DRAIN_METRICS, "--recover ", 1),
        "one-per-tx": (one_per_transaction, ONE_PER_TX_METRICS, "", 2),
        "bulk": (bulk_live, BULK_METRICS, "", 7),
        "plain": (plain_end_to_end, PLAIN_METRICS, "", 4),
    }[base]
    return Workload(
        number, name, f"workload {of} with `listen {recover}{_with(engine)}`", metrics, run, engine
    )


WORKLOADS: tuple[Workload, ...] = (
    Workload(
        1,
        "drain",
        "lockable trigger drain, bulk (K rows stored, then `listen --recover`)",
        DRAIN_METRICS,
        drain_stored,
    ),
    Workload(
        2,
        "one-per-tx",
        "lockable trigger, one row per transaction, listener running",
        ONE_PER_TX_METRICS,
        one_per_transaction,
    ),
    Workload(
        3,
        "notify",
        "plain `notify()` send rate (autocommit, no listener)",
        (Metric("rate", "send rate", "msgs/s"),),
        notify_rate,
    ),
    Workload(
        4,
        "plain",
        "plain channel end to end (producer at full speed)",
        PLAIN_METRICS,
        plain_end_to_end,
    ),
    Workload(
        5,
        "idle",
        "idle listener",
        (
            Metric("cpu_ms_per_s", "CPU while idle", "ms/s", higher_is_better=False, digits=2),
            Metric("wakeups_per_s", "wake-ups while idle", "per s", False, 1),
            Metric("rss_mb", "RSS (process tree)", "MB", higher_is_better=False, digits=1),
            Metric("startup_s", "start to ready", "s", higher_is_better=False, digits=2),
            Metric("processes", "processes", "", higher_is_better=False),
        ),
        idle_listener,
    ),
    Workload(
        6,
        "ceiling",
        "ceiling: hand-written psycopg2 SKIP LOCKED drain of the same K rows",
        (
            Metric("rate", "throughput from process start", "rows/s"),
            Metric("loop_rate", "throughput of the loop alone", "rows/s"),
        ),
        ceiling,
        sideless=True,
    ),
    Workload(
        7,
        "bulk",
        "lockable trigger, K rows in one transaction, listener running",
        BULK_METRICS,
        bulk_live,
    ),
    Workload(
        8,
        "latency",
        "latency at a fixed rate (R/s, one message per transaction)",
        (
            Metric("trigger_p50_ms", "lockable trigger p50", "ms", False, 1),
            Metric("trigger_p99_ms", "lockable trigger p99", "ms", False, 1),
            Metric("plain_p50_ms", "plain `notify()` p50", "ms", False, 1),
            Metric("plain_p99_ms", "plain `notify()` p99", "ms", False, 1),
        ),
        paced_latency,
    ),
    Workload(
        9,
        "drain-2p",
        "workload 1 with `listen --processes 2`",
        DRAIN_METRICS,
        drain_stored,
        TWO_PROCESSES,
    ),
    Workload(
        10,
        "one-per-tx-2p",
        "workload 2 with `listen --processes 2`",
        ONE_PER_TX_METRICS,
        one_per_transaction,
        TWO_PROCESSES,
    ),
    Workload(
        11,
        "backlog",
        "workload 1 with B rows stored",
        DRAIN_METRICS,
        functools.partial(drain_stored, size="backlog"),
        needs_backlog=True,
    ),
    Workload(
        12,
        "bulk-backlog",
        "workload 7 with B rows",
        BULK_METRICS,
        functools.partial(bulk_live, size="backlog"),
        needs_backlog=True,
    ),
    # Scaling of ``listen`` with threads and processes (``--threads``: ours only).
    _scaling(13, "drain-t2", "drain", Engine(threads=2)),
    _scaling(14, "drain-t4", "drain", Engine(threads=4)),
    _scaling(15, "drain-2p-t2", "drain", Engine(processes=2, threads=2)),
    _scaling(16, "one-per-tx-t2", "one-per-tx", Engine(threads=2)),
    _scaling(17, "one-per-tx-t4", "one-per-tx", Engine(threads=4)),
    _scaling(18, "one-per-tx-2p-t2", "one-per-tx", Engine(processes=2, threads=2)),
    _scaling(19, "bulk-t2", "bulk", Engine(threads=2)),
    _scaling(20, "bulk-t4", "bulk", Engine(threads=4)),
    _scaling(21, "bulk-2p", "bulk", TWO_PROCESSES),
    _scaling(22, "bulk-2p-t2", "bulk", Engine(processes=2, threads=2)),
    _scaling(23, "plain-t2", "plain", Engine(threads=2)),
    # The embedded Runtime: gunicorn web workers, each with a Runtime.
    Workload(
        24,
        "drain-emb",
        "embedded: workload 1, K rows stored, then gunicorn starts and its workers recover "
        f"them (1.3.1: `listen --recover --processes {EMBEDDED_WEB_WORKERS}`)",
        DRAIN_METRICS,
        drain_stored,
        EMBEDDED,
    ),
    Workload(
        25,
        "one-per-tx-emb",
        f"embedded: workload 2, one row per transaction ({THEIRS_INSTEAD})",
        ONE_PER_TX_METRICS,
        one_per_transaction,
        EMBEDDED,
    ),
    Workload(
        26,
        "bulk-emb",
        f"embedded: workload 7, K rows in one transaction ({THEIRS_INSTEAD})",
        BULK_METRICS,
        bulk_live,
        EMBEDDED,
    ),
    Workload(
        27,
        "broadcast-emb",
        f"embedded: plain channel broadcast, every web process receives every message "
        f"({THEIRS_INSTEAD})",
        BROADCAST_METRICS,
        plain_end_to_end,
        EMBEDDED,
    ),
    Workload(
        28,
        "web-emb",
        f"embedded: what the Runtime adds to a gunicorn worker ({EMBEDDED_WEB_WORKERS} sync "
        "workers, `PGPUBSUB_EMBEDDED` off, then on; idle, then serving; this checkout only: "
        "1.3.1 has no embedded mode)",
        WEB_METRICS,
        web_overhead,
        EMBEDDED,
        ours_only=True,
    ),
    # What the library costs per message, against hand-written loops (issue 16).
    Workload(
        29,
        "noop-drain",
        "no-op lockable drain: N rows stored with `notify()`, listener does nothing, "
        "`listen --recover` (this checkout only: 1.3.1 never processes them)",
        (
            Metric("rate", "throughput, first to last callback", "msgs/s"),
            Metric("from_start", "throughput from listener start", "msgs/s"),
        ),
        noop_drain,
        ours_only=True,
    ),
    Workload(
        30,
        "trigger-noop-drain",
        "no-op lockable trigger drain: N rows stored by the trigger, listener does nothing "
        "(gets model instances built from the row images), `listen --recover`",
        (
            Metric("rate", "throughput, first to last callback", "msgs/s"),
            Metric("from_start", "throughput from listener start", "msgs/s"),
        ),
        functools.partial(noop_drain, kind="row"),
    ),
    Workload(
        31,
        "raw-drain",
        "raw ceiling of 29 and 30: hand-written psycopg2 loop over the same N stored rows "
        f"(DELETE … {RAW_BATCH} … SKIP LOCKED RETURNING payload, JSON decoded, a commit per batch)",
        (
            Metric("rate", "notify() rows (as 29)", "msgs/s"),
            Metric("trigger_rate", "trigger rows (as 30)", "msgs/s"),
        ),
        raw_drain,
        ours_only=True,
        listens=False,
        driver_free=True,
    ),
    Workload(
        32,
        "orm-loop",
        "ORM ceiling of 1: hand-written loop calling the benchmark's listener function with "
        "the Runtime's batching and atomicity (a savepoint per message, a commit per batch)",
        (
            Metric("processing_rate", "throughput, first to last effect", "rows/s"),
            Metric("loop_rate", "throughput of the loop alone", "rows/s"),
        ),
        orm_loop,
        ours_only=True,
        listens=False,
    ),
    Workload(
        33,
        "ping",
        "plain messages at full producer speed, listener records the latency in memory only",
        (
            MSGS,
            P50,
            P99,
            Metric("send_rate", "the producer's send rate", "msgs/s"),
        ),
        ping_end_to_end,
    ),
    # What a lockable trigger channel costs the writers (issue 15).
    Workload(
        34,
        "writers",
        "writers' commits/s, one INSERT per transaction, no listener",
        (),
        writers,
        ours_only=True,
        listens=False,
        driver_free=True,
        metrics_for=writer_metrics,
    ),
    # Delivery without NOTIFY in the writer's transaction: latency, idle cost, sessions (15).
    Workload(
        35,
        "latency-on-write",
        "workload 8's lockable trigger rows with per-write NOTIFY (`PGPUBSUB_NOTIFY_ON_WRITE = "
        "True`; workload 8 runs the default mode, where the watcher wakes the listeners)",
        (
            Metric("trigger_p50_ms", "lockable trigger p50, per-write NOTIFY", "ms", False, 1),
            Metric("trigger_p99_ms", "lockable trigger p99, per-write NOTIFY", "ms", False, 1),
        ),
        paced_on_write,
        ours_only=True,
    ),
    Workload(
        36,
        "burst",
        "burst: writer processes INSERT Events at full speed for a few seconds while `listen` "
        "runs (default mode: the writers only store the rows)",
        (
            Metric("rows", "rows written", ""),
            Metric("write_rate", "the writers' commits/s", "commits/s"),
            Metric("rate", "throughput, first insert to last effect", "rows/s"),
            P50,
            P99,
            Metric("catch_up_s", "last insert to last effect", "s", False, 2),
            Metric("wakeups", "wake-ups (NOTIFYs on the channel)", "", False),
        ),
        burst,
        ours_only=True,
    ),
    Workload(
        37,
        "watcher-idle",
        f"idle deployment of {DEPLOYMENT_RUNTIMES} `listen` processes on one database with a "
        "lockable channel (one elected watcher)",
        (
            Metric(
                "queries_per_s", "queries/s against the database, all Runtimes", "per s", False, 1
            ),
            Metric("cpu_max_ms_per_s", "CPU of the busiest Runtime", "ms/s", False, 2),
            Metric("cpu_median_ms_per_s", "CPU per Runtime, median", "ms/s", False, 2),
            Metric("cpu_watcher_ms_per_s", "CPU of the watcher", "ms/s", False, 2),
            Metric("wakeups_watcher_per_s", "wake-ups of the watcher's threads", "per s", False, 1),
            Metric("wakeups_median_per_s", "wake-ups per Runtime, median", "per s", False, 1),
            Metric("watchers", "Runtimes that logged they watch", "", False),
        ),
        watcher_idle,
        ours_only=True,
    ),
    Workload(
        38,
        "sessions-emb",
        f"database sessions of {SESSION_WEB_WORKERS} idle gunicorn workers with an embedded "
        f"Runtime ({EMBEDDED_THREADS} worker threads each, `PGPUBSUB_IDLE_CONNECTION_TIMEOUT` "
        "set for the benchmark, see the sizes)",
        (
            Metric("start_sessions", "sessions after start, before any message", "", False),
            Metric("busy_sessions", "most sessions while processing K rows", "", False),
            Metric("idle_sessions", "sessions once the idle timeout passed after work", "", False),
        ),
        embedded_sessions,
        Engine(embedded=True, processes=SESSION_WEB_WORKERS, threads=EMBEDDED_THREADS),
        ours_only=True,
    ),
    # Django's tasks framework: pgpubsub.tasks against django-tasks-db (benchmarks/tasks.py).
    *(
        Workload(
            number,
            name,
            title,
            tuple(Metric(*spec) for spec in metrics),
            run,
            ours_only=True,
            listens=name != "task-enqueue",
        )
        for number, name, title, metrics, run in tasks.SPECS
    ),
)

#: Names that select several workloads in ``--only``.
GROUPS = {
    # listen with 1, 2 processes and 1, 2, 4 threads, on workloads 1, 2 and 7
    "scaling": ("drain", "one-per-tx", "bulk", "drain-2p", "one-per-tx-2p")
    + tuple(w.name for w in WORKLOADS if 13 <= w.number <= 22),
    "embedded": tuple(w.name for w in WORKLOADS if w.engine.embedded and w.number <= 28),
    # embedded vs listen with --threads 1 and 2 on the example workloads
    # the per-message cost of issue 16: the no-op drains and their ceilings, plain at full speed
    "per-message": (
        "drain",
        "plain",
        "noop-drain",
        "trigger-noop-drain",
        "raw-drain",
        "orm-loop",
        "ping",
    ),
    # issue 15: writers in each mode, latency of each mode, burst, idle watcher, sessions
    "issue15": ("latency", "writers", "latency-on-write", "burst", "watcher-idle", "sessions-emb"),
    "compare": (
        "one-per-tx",
        "bulk",
        "plain",
        "one-per-tx-t2",
        "bulk-t2",
        "plain-t2",
        "one-per-tx-emb",
        "bulk-emb",
        "broadcast-emb",
    ),
    # Django's tasks: pgpubsub.tasks against django-tasks-db, and the no-op lockable drain
    "tasks": tasks.GROUP,
}


def select(only: str | None) -> list[Workload]:
    """The workloads named (or numbered) in ``--only``, or in a group named there, in their
    order."""
    if not only:
        return list(WORKLOADS)
    wanted = {part.strip() for part in only.split(",") if part.strip()}
    for group, names in GROUPS.items():
        if group in wanted:
            wanted.discard(group)
            wanted.update(names)
    known = {str(w.number) for w in WORKLOADS} | {w.name for w in WORKLOADS}
    unknown = wanted - known
    if unknown:
        names = ", ".join(f"{w.number}/{w.name}" for w in WORKLOADS)
        raise ValueError(
            f"unknown workload(s) {', '.join(sorted(unknown))}; choose from {names}, or the "
            f"groups {', '.join(GROUPS)}"
        )
    return [w for w in WORKLOADS if str(w.number) in wanted or w.name in wanted]
