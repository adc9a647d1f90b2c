"""The tasks workloads (39-41): Django's tasks framework on ``pgpubsub.tasks.DatabaseBackend``
against django-tasks-db's ``DatabaseBackend`` and its ``manage.py db_worker``, in the same run.

django-tasks-db runs in a venv of its own (Django 5.2, ``django-tasks-db[compat]``, i.e. the
django-tasks backport, made once like 1.3.1's), with the same benchmark project and this
checkout's ``pgpubsub`` on its path (the project's other apps need it), its settings naming
django-tasks-db's backend (``BENCH_TASKS_BACKEND=db``). Each run of a tasks workload measures
this checkout and then django-tasks-db, or the reverse (the order alternates from run to run),
each on a fresh database of its own, so that their ratio is taken within the run.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.harness import (
    COMMAND_TIMEOUT,
    ROOT,
    BenchmarkError,
    Databases,
    Engine,
    Process,
    Processes,
    Server,
    Side,
    ensure_venv,
    prepare_side,
    wait_for,
)

if TYPE_CHECKING:  # benchmarks.workloads registers these workloads: it imports this module
    from benchmarks.workloads import Context, Sizes

#: The django-tasks-db side: not a column of the main table (the tasks workloads run on this
#: checkout, and measure django-tasks-db within each run).
TASKS_DB = "tasks-db"
TASKS_DB_REQUIREMENTS = [
    "django>=5.2,<6",
    "django-tasks-db[compat]",
    "django-pgtrigger",
    "psycopg2-binary",
]
#: The venv of django-tasks-db, beside ``--venv-dir``.
TASKS_DB_VENV_NAME = "venv-django-tasks-db"
#: The benchmark project's settings with django-tasks-db's backend.
DB_BACKEND = {"BENCH_TASKS_BACKEND": "db"}
#: Where each backend keeps its results (django-tasks-db's app label is
#: ``django_tasks_database``).
OUR_RESULTS = "pgpubsub_taskresult"
DB_RESULTS = "django_tasks_database_dbtaskresult"
#: ``db_worker``'s options: its defaults (one task at a time, the ``default`` queue, a 1 s
#: pause when it finds no task), without the random start-up delay of up to 1 s.
DB_WORKER_ARGS = ("db_worker", "--no-startup-delay")
#: Seconds the probe task of workload 40 may take (the worker's start included).
PROBE_TIMEOUT = 90.0
#: The names of the tasks workloads (what needs django-tasks-db's side).
NAMES = ("task-drain", "task-latency", "task-enqueue")


# --- django-tasks-db's side ---------------------------------------------------------------------


def ensure_tasks_db_venv(venv_dir: Path, processes: Processes) -> str:
    """A venv with django-tasks-db from PyPI (made once); returns its python."""
    return ensure_venv(venv_dir, TASKS_DB_REQUIREMENTS, processes, "-tasks-db")


_VERSIONS = """
import json, importlib.metadata as m
print(json.dumps({d: m.version(d) for d in ("django-tasks-db", "django-tasks")}))
"""


def prepare_tasks_db(
    workdir: Path, venv_dir: Path, server: Server, databases: Databases, processes: Processes
) -> Side:
    """django-tasks-db's side: its venv, the benchmark project migrated with its app."""
    python = ensure_tasks_db_venv(venv_dir, processes)
    side = Side(TASKS_DB, python, workdir / TASKS_DB, str(ROOT))
    prepare_side(side, server, databases, processes)
    output = processes.run(
        "tasks-db-versions",
        [python, "-c", _VERSIONS],
        side.project,
        side.base_env(),
        COMMAND_TIMEOUT,
    )
    side.versions.update(json.loads(output.strip().splitlines()[-1]))
    side.versions["worker"] = "manage.py " + " ".join(DB_WORKER_ARGS)
    return side


# --- helpers ------------------------------------------------------------------------------------


class Target:
    """One backend measured by a tasks workload: this checkout's (``listen``) or
    django-tasks-db's (``db_worker``)."""

    def __init__(self, side: Side, engine: Engine | None) -> None:
        self.side = side
        self.engine = engine  # None: django-tasks-db
        self.db = engine is None
        self.prefix = "db_" if self.db else ""
        self.results = DB_RESULTS if self.db else OUR_RESULTS
        self.env = DB_BACKEND if self.db else {}

    def driver(self, ctx: Context, dbname: str, *args: str, timeout: float) -> dict:
        output = ctx.processes.run(
            f"{self.side.name}-tasks-{args[0]}",
            self.side.script("tasks_driver.py", *args),
            self.side.project,
            {**self.side.env(ctx.server, dbname, f"bench-{self.side.name}-tasks"), **self.env},
            COMMAND_TIMEOUT + timeout,
        )
        return json.loads(output.strip().splitlines()[-1])

    def start(self, ctx: Context, dbname: str, recover: bool = False) -> Process:
        """``listen`` (``--recover`` for the drain), or ``db_worker``."""
        if not self.db:
            return self.engine.start(ctx.processes, ctx.server, self.side, dbname, recover)
        env = {**self.side.env(ctx.server, dbname, f"bench-{self.side.name}-worker"), **self.env}
        return ctx.processes.start(
            f"{self.side.name}-db_worker", self.side.manage(*DB_WORKER_ARGS), self.side.project, env
        )

    def succeeded(self, conn, where: str = "true", params: list | None = None) -> int:
        return scalar(
            conn,
            f"SELECT count(*) FROM {self.results} WHERE status = 'SUCCESSFUL' AND {where}",
            params,
        )

    def check_once(self, conn, expected: int) -> None:
        """Every task succeeded, each in one attempt (one worker id), none failed; ours: no
        stored row left."""
        done, attempts, other = _row(
            conn,
            f"SELECT count(*) FILTER (WHERE status = 'SUCCESSFUL'), "
            f"coalesce(max(jsonb_array_length(worker_ids::jsonb)), 0), "
            f"count(*) FILTER (WHERE status <> 'SUCCESSFUL') FROM {self.results}",
        )
        if done != expected or attempts != 1 or other:
            raise BenchmarkError(
                f"{self.label()}: {done} of {expected} tasks succeeded, {other} not, at most "
                f"{attempts} attempts per task (expected exactly one each)"
            )
        if not self.db:
            left = scalar(conn, "SELECT count(*) FROM pgpubsub_notification")
            if left:
                raise BenchmarkError(f"{self.label()}: {left} stored rows left")

    def label(self) -> str:
        return "django-tasks-db" if self.db else self.side.name


def _row(conn, sql: str, params: list | None = None) -> tuple:
    with conn.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


def scalar(conn, sql: str, params: list | None = None):
    return _row(conn, sql, params)[0]


_turns = {name: itertools.count() for name in NAMES}


def targets(ctx: Context, side: Side, engine: Engine, name: str) -> list[Target]:
    """This checkout and django-tasks-db (when its side was prepared), this checkout first on
    the first run of the workload, second on the next, and so on."""
    found = [Target(side, engine)]
    db = ctx.sides.get(TASKS_DB)
    if db is not None:
        found.append(Target(db, None))
        if next(_turns[name]) % 2:
            found.reverse()
    return found


def _epoch(column: str) -> str:
    return f"extract(epoch FROM {column})::float8"


# --- 39. no-op tasks stored, then one worker drains them ---------------------------------------


def task_drain(ctx: Context, side: Side, engine: Engine) -> dict[str, float]:
    """N no-op tasks enqueued in one transaction while no worker runs, then one worker
    (``listen --recover``; ``db_worker``) runs them all: tasks/s from the first task's start to
    the last one's finish, and from the worker's start, read from the result rows."""
    count = ctx.sizes.tasks
    out: dict[str, float] = {}
    for target in targets(ctx, side, engine, "task-drain"):
        with ctx.fresh_database(target.side) as (dbname, conn):
            target.driver(ctx, dbname, "store", str(count), timeout=ctx.sizes.wait_timeout(count))
            worker = target.start(ctx, dbname, recover=True)
            try:
                wait_for(
                    lambda t=target: t.succeeded(conn) >= count,
                    ctx.sizes.wait_timeout(count),
                    f"{count} tasks of {target.label()} to succeed",
                    watch=[worker],
                )
                if not target.db:
                    wait_for(
                        lambda: scalar(conn, "SELECT count(*) FROM pgpubsub_notification") == 0,
                        30.0,
                        "the stored rows to be deleted",
                        watch=[worker],
                    )
            finally:
                ctx.processes.stop(worker)
            target.check_once(conn, count)
            first, last = _row(
                conn,
                f"SELECT min({_epoch('started_at')}), max({_epoch('finished_at')}) "
                f"FROM {target.results}",
            )
        if last <= first:
            raise BenchmarkError(f"cannot time {count} tasks of {target.label()}")
        out[f"{target.prefix}rate"] = count / (last - first)
        out[f"{target.prefix}from_start"] = count / (last - worker.started_at)
    if "db_rate" in out:
        out["ratio"] = out["rate"] / out["db_rate"]
    return out


# --- 40. enqueue-to-start latency at a paced rate, worker running -------------------------------


def task_latency(ctx: Context, side: Side, engine: Engine) -> dict[str, float]:
    """A worker running (``listen``; ``db_worker``) and a probe task done, the side's producer
    enqueues tasks at ``--task-rate`` for ``--paced-seconds``, each in its own transaction:
    p50/p99 of started_at − enqueued_at of their result rows."""
    rate = ctx.sizes.task_rate
    count = max(1, round(rate * ctx.sizes.paced_seconds))
    out: dict[str, float] = {}
    for target in targets(ctx, side, engine, "task-latency"):
        with ctx.fresh_database(target.side) as (dbname, conn):
            worker = target.start(ctx, dbname)
            try:
                sent = target.driver(
                    ctx,
                    dbname,
                    "paced",
                    str(count),
                    f"{rate:g}",
                    timeout=PROBE_TIMEOUT + count / rate,
                )
                wait_for(
                    lambda t=target, p=sent["probe"]: (
                        t.succeeded(conn, "id::text <> %s", [p]) >= count
                    ),
                    ctx.sizes.wait_timeout(count),
                    f"{count} paced tasks of {target.label()} to succeed",
                    watch=[worker],
                )
            finally:
                ctx.processes.stop(worker)
            target.check_once(conn, count + 1)
            p50, p99 = _row(
                conn,
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY latency), "
                "percentile_cont(0.99) WITHIN GROUP (ORDER BY latency) FROM ("
                f"SELECT {_epoch('started_at - enqueued_at')} AS latency FROM {target.results} "
                "WHERE id::text <> %s) AS tasks",
                [sent["probe"]],
            )
        out[f"{target.prefix}p50_ms"] = p50 * 1000.0
        out[f"{target.prefix}p99_ms"] = p99 * 1000.0
        out[f"{target.prefix}late_ms"] = sent["late_ms"]
    return out


# --- 41. what enqueuing costs a request's transaction --------------------------------------------


def task_enqueue(ctx: Context, side: Side, engine: Engine) -> dict[str, float]:
    """One client, no worker: E ``task.enqueue()`` calls, each in its own
    ``transaction.atomic()``, and (this checkout) E ``pgpubsub.notify()`` of the lockable channel
    Job the same way, in alternating rounds of the same process: microseconds of the call inside
    the transaction, and of the whole transaction (its commit included)."""
    count = ctx.sizes.task_enqueues
    out: dict[str, float] = {}
    for target in targets(ctx, side, engine, "task-enqueue"):
        with ctx.fresh_database(target.side) as (dbname, _conn):
            args = ["enqueue", str(count)] + ([] if target.db else ["notify"])
            timed = target.driver(ctx, dbname, *args, timeout=ctx.sizes.wait_timeout(count))
        out[f"{target.prefix}enqueue_us"] = timed["enqueue_us"]
        out[f"{target.prefix}enqueue_tx_us"] = timed["enqueue_tx_us"]
        if not target.db:
            out["notify_us"] = timed["notify_us"]
            out["notify_tx_us"] = timed["notify_tx_us"]
            out["ratio"] = timed["enqueue_us"] / timed["notify_us"]
            out["tx_ratio"] = timed["enqueue_tx_us"] / timed["notify_tx_us"]
    return out


# --- the list (benchmarks/workloads.py makes them Workloads) --------------------------------------

_DB = "django-tasks-db `db_worker`"
#: A metric: key, label, unit, higher is better, digits (the fields of ``workloads.Metric``).
MetricSpec = tuple[str, str, str, bool, int]


def _us(key: str, label: str) -> MetricSpec:
    return (key, label, "µs", False, 1)


#: Number, name, title, metrics and run function of each tasks workload; each runs on this
#: checkout only (it measures django-tasks-db itself) and 41 starts no listener.
SPECS: tuple[tuple[int, str, str, tuple[MetricSpec, ...], Callable], ...] = (
    (
        39,
        "task-drain",
        "no-op tasks: N_T enqueued in one transaction, then one worker runs them all (this "
        f"checkout's `listen --recover`, and {_DB}, in the same run)",
        (
            ("rate", "pgpubsub `listen`: first start to last finish", "tasks/s", True, 0),
            ("from_start", "pgpubsub `listen`: from its start", "tasks/s", True, 0),
            ("db_rate", f"{_DB}: first start to last finish", "tasks/s", True, 0),
            ("db_from_start", f"{_DB}: from its start", "tasks/s", True, 0),
            ("ratio", "pgpubsub / db_worker, first start to last finish", "x", True, 2),
        ),
        task_drain,
    ),
    (
        40,
        "task-latency",
        "no-op tasks enqueued at a paced rate (one per transaction), worker running: "
        "enqueue-to-start latency from the result rows",
        (
            ("p50_ms", "pgpubsub `listen`: started − enqueued p50", "ms", False, 1),
            ("p99_ms", "pgpubsub `listen`: started − enqueued p99", "ms", False, 1),
            ("db_p50_ms", f"{_DB}: started − enqueued p50", "ms", False, 1),
            ("db_p99_ms", f"{_DB}: started − enqueued p99", "ms", False, 1),
        ),
        task_latency,
    ),
    (
        41,
        "task-enqueue",
        "enqueue cost inside a request's transaction: one client, E transactions of one "
        "`task.enqueue()` each, against E of one lockable `notify()` each, no worker",
        (
            _us("enqueue_us", "pgpubsub `task.enqueue()` inside `atomic()`"),
            _us("notify_us", "lockable `pgpubsub.notify()` inside `atomic()`"),
            _us("db_enqueue_us", "django-tasks-db `task.enqueue()` inside `atomic()`"),
            ("ratio", "pgpubsub enqueue / lockable notify", "x", False, 2),
            _us("enqueue_tx_us", "pgpubsub: whole transaction, commit included"),
            _us("notify_tx_us", "lockable notify: whole transaction, commit included"),
            _us("db_enqueue_tx_us", "django-tasks-db: whole transaction, commit included"),
            ("tx_ratio", "pgpubsub / notify, whole transactions", "x", False, 2),
        ),
        task_enqueue,
    ),
)

#: ``--only tasks``: the tasks workloads and the no-op lockable drain they are compared with.
GROUP = ("noop-drain", *NAMES)


def sizes_lines(sizes: Sizes) -> dict[str, object]:
    """The sizes of the tasks workloads, for the report."""
    return {
        "N_T (tasks drained, 39)": sizes.tasks,
        "task rate (40, /s)": sizes.task_rate,
        "E (enqueues, 41)": sizes.task_enqueues,
    }


def _median_of(rows: list[dict], name: str, key: str) -> float | None:
    for row in rows:
        if row["name"] == name and row["key"] == key and row["ours"]:
            return row["ours"]["median"]
    return None


def task_targets(args, rows: list[dict]) -> list[dict]:
    """The targets of the tasks backend beside what this run measured (medians; the ratios to
    django-tasks-db and to ``notify()`` are the median of each run's ratio)."""
    out: list[dict] = []

    def add(target: str, measured: str | None, met: bool) -> None:
        if measured is None:
            return  # its workloads did not run
        out.append({"target": target, "measured": measured, "verdict": "met" if met else "not met"})

    def med(name: str, key: str) -> float | None:
        return _median_of(rows, name, key)

    ours, db, ratio = (
        med("task-drain", "rate"),
        med("task-drain", "db_rate"),
        med("task-drain", "ratio"),
    )
    measured = None
    if ours is not None:
        measured = f"{ours:,.0f} tasks/s"
        if db is not None and ratio is not None:
            measured = f"{ratio:.1f}x ({ours:,.0f} vs {db:,.0f} tasks/s)"
        else:
            measured += "; django-tasks-db not measured (`--skip-tasks-db`)"
    add(
        "no-op tasks, one `listen` process: throughput ≥ 5x django-tasks-db's `db_worker` (39)",
        measured,
        ratio is not None and ratio >= 5,
    )
    lockable = med("noop-drain", "rate")
    measured = None
    if ours is not None and lockable is not None:
        measured = (
            f"{ours / lockable:.0%} ({ours:,.0f} tasks/s vs {lockable:,.0f} msgs/s of the no-op "
            "lockable drain, 29)"
        )
    add(
        "no-op tasks of the same order as lockable channels: 39 ≥ 50% of the no-op lockable "
        "drain (29; the same order read as at least half)",
        measured,
        bool(ours and lockable and ours / lockable >= 0.5),
    )
    rate = args.sizes.task_rate
    p50, p99 = med("task-latency", "p50_ms"), med("task-latency", "p99_ms")
    measured = None
    if p50 is not None and p99 is not None:
        measured = f"p50 {p50:,.1f} ms, p99 {p99:,.1f} ms at {rate:g} tasks/s"
        db50, db99 = med("task-latency", "db_p50_ms"), med("task-latency", "db_p99_ms")
        if db50 is not None and db99 is not None:
            measured += f"; django-tasks-db: p50 {db50:,.1f} ms, p99 {db99:,.1f} ms"
        if rate != 100:
            measured += "; the target is at 100 tasks/s (`--task-rate 100`)"
    add(
        "enqueue-to-start latency at a paced 100 tasks/s: p50 ≤ 10 ms, p99 ≤ 50 ms (40)",
        measured,
        p50 is not None and p99 is not None and rate == 100 and p50 <= 10 and p99 <= 50,
    )
    enqueue, notify = med("task-enqueue", "enqueue_us"), med("task-enqueue", "notify_us")
    ratio = med("task-enqueue", "ratio")
    measured = None
    if enqueue is not None and notify is not None and ratio is not None:
        measured = f"{ratio:.2f}x ({enqueue:,.0f} vs {notify:,.0f} µs per call"
        tx_ratio = med("task-enqueue", "tx_ratio")
        tx, notify_tx = med("task-enqueue", "enqueue_tx_us"), med("task-enqueue", "notify_tx_us")
        measured += f"; whole transactions {tx_ratio:.2f}x, {tx:,.0f} vs {notify_tx:,.0f} µs)"
        db, db_tx = med("task-enqueue", "db_enqueue_us"), med("task-enqueue", "db_enqueue_tx_us")
        if db is not None and db_tx is not None:
            measured += f"; django-tasks-db: {db:,.0f} µs per call, {db_tx:,.0f} µs per transaction"
    add(
        "`task.enqueue()` inside `transaction.atomic()` costs ≤ storing a lockable message "
        "(`notify()` of a lockable channel, 41)",
        measured,
        ratio is not None and ratio <= 1,
    )
    return out


def notes(args, tasks_db: Side | None) -> list[str]:
    """How workloads 39-41 measure."""
    if not any(w.name in NAMES for w in args.workloads):
        return []
    against = (
        f"django-tasks-db ({tasks_db.versions.get('django-tasks-db', '?')}, "
        f"`{tasks_db.versions.get('worker')}`: one task per transaction, a 1 s pause whenever "
        "it finds none) in its own venv with Django "
        f"{tasks_db.versions.get('django', '?')} and the django-tasks backport "
        f"{tasks_db.versions.get('django-tasks', '?')}"
        if tasks_db is not None
        else "django-tasks-db: not measured (`--skip-tasks-db`)"
    )
    return [
        "Workloads 39-41 (tasks, `--only tasks`): this checkout's `pgpubsub.tasks.DatabaseBackend` "
        "(`manage.py listen`, one process, one worker thread) against "
        f"{against}, in the same run: each run measures both, each on a fresh database, in an "
        "order that alternates from run to run; the ratios are taken within each run. The task "
        "(`benchapp.tasks.noop`) does nothing. 39: N_T tasks enqueued in one transaction by "
        "`tasks_driver.py` while no worker runs, then the worker starts; tasks/s from the first "
        "task's `started_at` to the last one's `finished_at` in the result rows "
        f"(`{OUR_RESULTS}`, `{DB_RESULTS}`), every task checked to have succeeded in exactly "
        "one attempt. 40: the worker running and a probe task done, the producer enqueues at "
        "the task rate (each task in its own `transaction.atomic()`, task n due at start + n/R); "
        "latency = `started_at − enqueued_at` of each result row (pgpubsub: `enqueued_at` is the "
        "enqueuing transaction's `now()`; django-tasks-db: the time of its INSERT). 41: one "
        "client, no worker, E transactions each, in rounds of 50 alternating with the lockable "
        "`notify(Job)` (the same process), after 20 untimed of each: the call inside "
        "`atomic()` (its BEGIN and INSERT) and the whole transaction (with its COMMIT)."
    ]
