"""The workloads. Each runs once for one side on a fresh database and returns its metrics."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import (
    COMMAND_TIMEOUT,
    BenchmarkError,
    Databases,
    ListenEngine,
    Process,
    Processes,
    Server,
    Side,
    wait_for,
)

#: Seconds a started listener may take to process its first readiness probe.
READY_TIMEOUT = 90.0
#: Seconds between two readiness probes.
PROBE_INTERVAL = 0.1
#: The plain channel of the benchmark project, and its LISTEN name (the same on both sides).
TICK_CHANNEL = "benchapp.channels.Tick"
TICK_LISTEN_NAME = "pgpubsub_" + hashlib.sha1(TICK_CHANNEL.encode()).hexdigest()[:5]

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

    def wait_timeout(self, count: int) -> float:
        """Seconds to wait for ``count`` messages: generous for 1.3.1's ~100 rows/s."""
        return 60.0 + count / 10.0


@dataclass
class Context:
    server: Server
    databases: Databases
    processes: Processes
    engine: ListenEngine
    sizes: Sizes

    @contextlib.contextmanager
    def fresh_database(self, side: Side) -> Iterator[tuple[str, object]]:
        """A copy of the side's migrated template, with an autocommit connection; dropped after."""
        dbname = self.databases.create(side.name, template=side.template_db)
        try:
            conn = self.server.connect(dbname)
            try:
                yield dbname, conn
            finally:
                conn.close()
        finally:
            self.databases.drop(dbname)

    @contextlib.contextmanager
    def listener(self, side: Side, dbname: str, recover: bool = False) -> Iterator[Process]:
        process = self.engine.start(self.processes, self.server, side, dbname, recover=recover)
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
    run: Callable[[Context, Side | None], dict[str, float]]
    #: Runs once per repetition, not per side (the hand-written ceiling).
    sideless: bool = False


# --- helpers ----------------------------------------------------------------------------------


def scalar(conn, sql: str, params: list | None = None):
    with conn.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()[0]


def counter(conn, sql: str, target: int) -> Callable[[], bool]:
    return lambda: scalar(conn, sql) >= target


def percentiles(conn, table: str, where: str) -> dict[str, float]:
    """p50 and p99 of the ``latency`` column, in milliseconds."""
    with conn.cursor() as cursor:
        cursor.execute(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY latency), "
            f"percentile_cont(0.99) WITHIN GROUP (ORDER BY latency) FROM {table} WHERE {where}"
        )
        p50, p99 = cursor.fetchone()
    return {"p50_ms": p50 * 1000.0, "p99_ms": p99 * 1000.0}


def wait_ready(conn, listener: Process) -> None:
    """Send plain probe messages until the listener has processed one: it then LISTENs on
    every channel (both sides LISTEN on all channels before waiting)."""
    probes = 0

    def probe_processed() -> bool:
        nonlocal probes
        probes += 1
        payload = json.dumps({"kwargs": {"seq": -probes, "sent": time.time()}})
        with conn.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, %s)", [TICK_LISTEN_NAME, payload])
        return scalar(conn, "SELECT count(*) FROM benchapp_item WHERE key LIKE 'probe-%'") > 0

    wait_for(
        probe_processed,
        READY_TIMEOUT,
        f"{listener.name} to process a probe message",
        watch=[listener],
        interval=PROBE_INTERVAL,
    )


def check_effects(conn, expected: int) -> None:
    done = scalar(conn, "SELECT count(*) FROM benchapp_effect")
    if done != expected:
        raise BenchmarkError(f"expected {expected} effects (exactly once), found {done}")


# --- 1. lockable trigger drain, bulk, with --recover ----------------------------------------


def drain_bulk(ctx: Context, side: Side) -> dict[str, float]:
    events = ctx.sizes.events
    with ctx.fresh_database(side) as (dbname, conn):
        with conn.cursor() as cursor:
            cursor.execute(INSERT_EVENTS, [events])
        stored = scalar(conn, "SELECT count(*) FROM pgpubsub_notification")
        if stored != events:
            raise BenchmarkError(f"{side.name}: the trigger stored {stored} of {events} rows")
        with ctx.listener(side, dbname, recover=True) as listener:
            wait_for(
                counter(conn, "SELECT count(*) FROM benchapp_effect", events),
                ctx.sizes.wait_timeout(events),
                f"{events} effects of {side.name}",
                watch=[listener],
            )
            elapsed = time.perf_counter() - listener.started
            wait_for(
                lambda: scalar(conn, "SELECT count(*) FROM pgpubsub_notification") == 0,
                30.0,
                "the stored rows to be deleted",
                watch=[listener],
            )
            check_effects(conn, events)
    return {"rate": events / elapsed}


# --- 2. lockable trigger, one row per transaction, listener running -------------------------


def one_per_transaction(ctx: Context, side: Side) -> dict[str, float]:
    events = ctx.sizes.events
    with ctx.fresh_database(side) as (dbname, conn):
        with ctx.listener(side, dbname) as listener:
            wait_ready(conn, listener)
            started = time.perf_counter()
            with conn.cursor() as cursor:
                for n in range(events):
                    cursor.execute(INSERT_EVENT, [f"event-{n}"])
            wait_for(
                counter(conn, "SELECT count(*) FROM benchapp_effect", events),
                ctx.sizes.wait_timeout(events),
                f"{events} effects of {side.name}",
                watch=[listener],
            )
            elapsed = time.perf_counter() - started
            check_effects(conn, events)
            return {"rate": events / elapsed, **percentiles(conn, "benchapp_effect", "true")}


# --- 3. plain notify() send rate -------------------------------------------------------------


def run_driver(ctx: Context, side: Side, dbname: str, messages: int) -> dict:
    output = ctx.processes.run(
        f"{side.name}-send",
        side.script("driver.py", "send", str(messages)),
        side.project,
        side.env(ctx.server, dbname, f"bench-{side.name}-sender"),
        COMMAND_TIMEOUT + ctx.sizes.wait_timeout(messages),
    )
    return json.loads(output.strip().splitlines()[-1])


def notify_rate(ctx: Context, side: Side) -> dict[str, float]:
    messages = ctx.sizes.messages
    with ctx.fresh_database(side) as (dbname, _conn):
        sent = run_driver(ctx, side, dbname, messages)
    return {"rate": messages / sent["seconds"]}


# --- 4. plain channel end to end --------------------------------------------------------------


def plain_end_to_end(ctx: Context, side: Side) -> dict[str, float]:
    messages = ctx.sizes.messages
    with ctx.fresh_database(side) as (dbname, conn):
        with ctx.listener(side, dbname) as listener:
            wait_ready(conn, listener)
            sent = run_driver(ctx, side, dbname, messages)
            wait_for(
                counter(
                    conn, "SELECT count(*) FROM benchapp_item WHERE key LIKE 'tick-%'", messages
                ),
                ctx.sizes.wait_timeout(messages),
                f"{messages} plain messages received by {side.name}",
                watch=[listener],
            )
            elapsed = time.time() - sent["started"]
            received = scalar(conn, "SELECT count(*) FROM benchapp_item WHERE key LIKE 'tick-%'")
            if received != messages:
                raise BenchmarkError(f"sent {messages} plain messages, received {received}")
            return {
                "rate": messages / elapsed,
                **percentiles(conn, "benchapp_item", "key LIKE 'tick-%'"),
            }


# --- 5. idle listener -------------------------------------------------------------------------


def idle_listener(ctx: Context, side: Side) -> dict[str, float]:
    with ctx.fresh_database(side) as (dbname, conn):
        with ctx.listener(side, dbname) as listener:
            wait_ready(conn, listener)
            startup = time.perf_counter() - listener.started
            before = listener.cpu_seconds()
            clock = time.perf_counter()
            time.sleep(ctx.sizes.idle_seconds)  # the measurement window itself
            window = time.perf_counter() - clock
            cpu = listener.cpu_seconds() - before
            rss = listener.rss_bytes()
            if not listener.alive():
                raise BenchmarkError(f"{listener.name} exited while idle:\n{listener.log_tail()}")
            return {
                "cpu_ms_per_s": cpu * 1000.0 / window,
                "rss_mb": rss / 2**20,
                "startup_s": startup,
                "processes": float(len(listener.tree())),
            }


# --- 6. ceiling: hand-written psycopg2 drain ---------------------------------------------------

CEILING_SCHEMA = """
CREATE TABLE event (id serial PRIMARY KEY, key text NOT NULL, sent_at double precision NOT NULL);
CREATE TABLE queue (
    id bigserial PRIMARY KEY, channel text NOT NULL, payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE effect (id serial PRIMARY KEY, key text NOT NULL UNIQUE, latency double precision);
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


def ceiling(ctx: Context, side: Side | None) -> dict[str, float]:
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
                elapsed = time.perf_counter() - process.started
                wait_for(lambda: not process.alive(), 30.0, "the ceiling loop to exit")
                result = json.loads(process.log_path.read_text().strip().splitlines()[-1])
            finally:
                ctx.processes.stop(process)
            if scalar(conn, "SELECT count(*) FROM effect") != events:
                raise BenchmarkError("the ceiling loop did not process every row exactly once")
        finally:
            conn.close()
    finally:
        ctx.databases.drop(dbname)
    return {"rate": events / elapsed, "loop_rate": result["rows"] / result["seconds"]}


# --- the list -----------------------------------------------------------------------------------

WORKLOADS: tuple[Workload, ...] = (
    Workload(
        1,
        "drain",
        "lockable trigger drain, bulk (K rows stored, then `listen --recover`)",
        (Metric("rate", "throughput from listener start", "rows/s"),),
        drain_bulk,
    ),
    Workload(
        2,
        "one-per-tx",
        "lockable trigger, one row per transaction, listener running",
        (
            Metric("rate", "throughput", "rows/s"),
            Metric("p50_ms", "latency p50", "ms", higher_is_better=False, digits=1),
            Metric("p99_ms", "latency p99", "ms", higher_is_better=False, digits=1),
        ),
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
        (
            Metric("rate", "throughput", "msgs/s"),
            Metric("p50_ms", "latency p50", "ms", higher_is_better=False, digits=1),
            Metric("p99_ms", "latency p99", "ms", higher_is_better=False, digits=1),
        ),
        plain_end_to_end,
    ),
    Workload(
        5,
        "idle",
        "idle listener",
        (
            Metric("cpu_ms_per_s", "CPU while idle", "ms/s", higher_is_better=False, digits=2),
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
)


def select(only: str | None) -> list[Workload]:
    """The workloads named (or numbered) in ``--only``, in their order."""
    if not only:
        return list(WORKLOADS)
    wanted = {part.strip() for part in only.split(",") if part.strip()}
    known = {str(w.number) for w in WORKLOADS} | {w.name for w in WORKLOADS}
    unknown = wanted - known
    if unknown:
        names = ", ".join(f"{w.number}/{w.name}" for w in WORKLOADS)
        raise ValueError(f"unknown workload(s) {', '.join(sorted(unknown))}; choose from {names}")
    return [w for w in WORKLOADS if str(w.number) in wanted or w.name in wanted]
