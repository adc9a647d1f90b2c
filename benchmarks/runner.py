"""``python -m benchmarks``: measure this checkout against django-pgpubsub 1.3.1 and print a
Markdown table (medians, min-max, ratio ours/theirs)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import traceback
from pathlib import Path

from benchmarks import tasks
from benchmarks.harness import (
    CLOCK_TICKS,
    EMBEDDED_THREADS,
    EMBEDDED_WEB_WORKERS,
    OURS,
    OURS_PSYCOPG3,
    ROOT,
    THEIRS,
    BenchmarkError,
    Databases,
    Processes,
    Server,
    Side,
    ensure_gunicorn,
    ensure_psycopg3_venv,
    ensure_theirs_venv,
    prepare_side,
)
from benchmarks.workloads import (
    GROUPS,
    RAW_BATCH,
    REQUEST_RATE,
    Context,
    Sizes,
    Workload,
    select,
    writer_client,
    writer_seconds,
)

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/test"
DEFAULT_VENV_DIR = Path(tempfile.gettempdir()) / "pgpubsub-bench" / "venv-django-pgpubsub-1.3.1"
#: The venv of this checkout with psycopg 3 (``--psycopg3``), beside ``--venv-dir``.
PSYCOPG3_VENV_NAME = "venv-ours-psycopg3"
FULL = Sizes(
    events=2000,
    messages=2000,
    idle_seconds=30.0,
    batch=100,
    backlog=10000,
    rate=200.0,
    paced_seconds=10.0,
    web_seconds=10.0,
    noop_rows=10000,
    writers=(1, 4, 16),
    writer_seconds=3.0,
    burst_writers=16,
    burst_seconds=2.0,
    watch_seconds=30.0,
    settle_seconds=3.0,
    idle_connection_timeout=5.0,
    tasks=5000,
    task_rate=100.0,
    task_enqueues=2000,
)
QUICK = Sizes(
    events=100,
    messages=200,
    idle_seconds=1.0,
    batch=100,
    backlog=0,
    rate=200.0,
    paced_seconds=1.0,
    web_seconds=1.0,
    noop_rows=200,
    writers=(1, 4, 16),
    writer_seconds=0.5,
    burst_writers=16,
    burst_seconds=0.5,
    watch_seconds=2.0,
    settle_seconds=1.0,
    idle_connection_timeout=1.0,
    tasks=100,
    task_rate=100.0,
    task_enqueues=100,
)
NOTES = [
    "In django-pgpubsub 1.3.1, lockable channels published with `notify()` are never processed "
    "(the row is stored under the dotted channel name, the listener looks it up by its LISTEN "
    "name), so exactly-once processing is compared on a lockable *trigger* channel only.",
    "Ratio is ours/theirs: above 1 is better for throughput, below 1 is better for latency, "
    "CPU, memory and start-up.",
    "django-pgpubsub 1.3.1's `listen` runs its listener in a spawned child process: its idle "
    "CPU and RSS are those of the whole process tree. Its `--processes 2` works: the parent "
    "spawns two listener processes, each LISTENing on every channel (with `--recover`, each "
    "runs its own recovery); ours runs two listener processes under a supervisor.",
    'Throughput "from listener start" (workloads 1, 9, 11) and the ceiling\'s "from process '
    'start" include interpreter and Django start-up (workload 5 shows it alone); "first to '
    'last effect" is the processing alone (callback times of the first and last row).',
    "Workload 8 paces its producer: message n is sent at start + n/R, one per transaction "
    "(trigger rows: the runner's INSERTs; plain: the side's `notify()`), so its latencies are "
    "those of a listener that is not saturated, as long as R is below its capacity "
    "(workloads 2 and 4).",
]


ENGINE_LINE = (
    "`manage.py listen`, one process and one worker thread, unless the workload's title says "
    "otherwise (`--processes`, `--threads`); embedded workloads (24–28): gunicorn serving the "
    f"benchmark project with {EMBEDDED_WEB_WORKERS} sync workers and `PGPUBSUB_EMBEDDED = True`, "
    f"{EMBEDDED_THREADS} worker threads per Runtime (`PGPUBSUB_WORKERS`); workload 28 also "
    "without it"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark pgpubsub (this checkout) against django-pgpubsub 1.3.1.",
    )
    parser.add_argument(
        "--database-url",
        default=DEFAULT_DATABASE_URL,
        help="A PostgreSQL server where the runner may CREATE and DROP databases "
        f"(default: {DEFAULT_DATABASE_URL}). Unix sockets: postgresql://user:@/db?host=/dir",
    )
    parser.add_argument("--repeat", type=int, default=3, help="Runs per workload and side.")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"Small sizes for a smoke run (K={QUICK.events}, M={QUICK.messages}, "
        f"idle {QUICK.idle_seconds:g}s, paced {QUICK.paced_seconds:g}s, web windows "
        f"{QUICK.web_seconds:g}s, N={QUICK.noop_rows}, writers {QUICK.writer_seconds:g}s, "
        f"burst {QUICK.burst_seconds:g}s, watcher window {QUICK.watch_seconds:g}s, idle "
        f"connection timeout {QUICK.idle_connection_timeout:g}s, N_T={QUICK.tasks}, "
        f"E={QUICK.task_enqueues}, no backlog workload "
        "unless --backlog is given).",
    )
    parser.add_argument("--events", type=int, help=f"K, Events per run (default {FULL.events}).")
    parser.add_argument(
        "--messages", type=int, help=f"M, plain messages per run (default {FULL.messages})."
    )
    parser.add_argument(
        "--idle-seconds", type=float, help=f"Idle window (default {FULL.idle_seconds:g})."
    )
    parser.add_argument(
        "--backlog",
        type=int,
        help=f"B, rows of the backlog workloads 11 and 12 (default {FULL.backlog}; not run with "
        "--quick unless given).",
    )
    parser.add_argument(
        "--rate",
        type=float,
        help=f"R, messages per second of the paced producer (default {FULL.rate:g}).",
    )
    parser.add_argument(
        "--paced-seconds",
        type=float,
        help=f"How long the paced producer sends, per channel (default {FULL.paced_seconds:g}).",
    )
    parser.add_argument(
        "--web-seconds",
        type=float,
        help="Each window of workload 28 (idle, then serving), per mode "
        f"(default {FULL.web_seconds:g}).",
    )
    parser.add_argument(
        "--noop-rows",
        type=int,
        help=f"N, stored rows of the no-op drains and the raw drain (29-31; default "
        f"{FULL.noop_rows}).",
    )
    parser.add_argument(
        "--writers",
        help="Comma-separated numbers of concurrent writer connections of workload 34 "
        f"(default {','.join(map(str, FULL.writers))}).",
    )
    parser.add_argument(
        "--writer-seconds",
        type=float,
        help=f"How long each writer measurement of workload 34 lasts (default "
        f"{FULL.writer_seconds:g}).",
    )
    parser.add_argument(
        "--burst-writers",
        type=int,
        help=f"Writer processes of the burst, workload 36 (default {FULL.burst_writers}).",
    )
    parser.add_argument(
        "--burst-seconds",
        type=float,
        help="How long the burst's writers write at full speed, workload 36 "
        f"(default {FULL.burst_seconds:g}).",
    )
    parser.add_argument(
        "--watch-seconds",
        type=float,
        help="Idle window of the deployment of 4 Runtimes, workload 37 "
        f"(default {FULL.watch_seconds:g}).",
    )
    parser.add_argument(
        "--idle-connection-timeout",
        type=float,
        help="PGPUBSUB_IDLE_CONNECTION_TIMEOUT of the gunicorn workers of workload 38 "
        f"(default {FULL.idle_connection_timeout:g}).",
    )
    parser.add_argument(
        "--tasks",
        type=int,
        help=f"N_T, no-op tasks drained by one worker, workload 39 (default {FULL.tasks}).",
    )
    parser.add_argument(
        "--task-rate",
        type=float,
        help=f"Tasks per second of the paced producer, workload 40 (default {FULL.task_rate:g}; "
        "it sends for --paced-seconds).",
    )
    parser.add_argument(
        "--task-enqueues",
        type=int,
        help=f"E, timed enqueues (and lockable notify()s), workload 41 (default "
        f"{FULL.task_enqueues}).",
    )
    parser.add_argument(
        "--skip-tasks-db",
        action="store_true",
        help="Measure the tasks workloads (39-41) on this checkout only: no django-tasks-db venv.",
    )
    parser.add_argument(
        "--only",
        help="Comma-separated workload numbers or names, e.g. 1,2,ceiling, or groups: "
        + ", ".join(GROUPS)
        + ".",
    )
    parser.add_argument(
        "--skip-theirs", action="store_true", help="Measure this checkout only (no 1.3.1 venv)."
    )
    parser.add_argument(
        "--psycopg3",
        action="store_true",
        help="Also measure this checkout with psycopg 3: a third side, ours-psycopg3, in a venv "
        f"made once beside --venv-dir ({PSYCOPG3_VENV_NAME}: this checkout installed editable "
        "with psycopg[binary], no psycopg2), on every workload ours runs.",
    )
    parser.add_argument(
        "--venv-dir",
        type=Path,
        default=DEFAULT_VENV_DIR,
        help=f"Where the django-pgpubsub 1.3.1 venv is made once (default: {DEFAULT_VENV_DIR}).",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="Also write the results to this file: JSON if it ends in .json, else Markdown.",
    )
    parser.add_argument(
        "--keep-temp", action="store_true", help="Keep the generated projects and logs."
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    for name in ("events", "messages", "backlog", "noop_rows", "tasks", "task_enqueues"):
        if getattr(args, name) is not None and getattr(args, name) < 2:
            parser.error(f"--{name.replace('_', '-')} must be at least 2")
    if args.burst_writers is not None and args.burst_writers < 1:
        parser.error("--burst-writers must be at least 1")
    for name in (
        "rate",
        "paced_seconds",
        "idle_seconds",
        "web_seconds",
        "writer_seconds",
        "burst_seconds",
        "watch_seconds",
        "idle_connection_timeout",
        "task_rate",
    ):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    writers = None
    if args.writers is not None:
        try:
            writers = tuple(int(part) for part in args.writers.split(",") if part.strip())
        except ValueError:
            writers = ()
        if not writers or min(writers) < 1:
            parser.error("--writers must be a comma-separated list of positive numbers")
    try:
        args.workloads = select(args.only)
    except ValueError as exc:
        parser.error(str(exc))
    base = QUICK if args.quick else FULL
    args.sizes = Sizes(
        events=args.events or base.events,
        messages=args.messages or base.messages,
        idle_seconds=args.idle_seconds or base.idle_seconds,
        batch=base.batch,
        backlog=args.backlog or base.backlog,
        rate=args.rate or base.rate,
        paced_seconds=args.paced_seconds or base.paced_seconds,
        web_seconds=args.web_seconds or base.web_seconds,
        noop_rows=args.noop_rows or base.noop_rows,
        writers=writers or base.writers,
        writer_seconds=args.writer_seconds or base.writer_seconds,
        burst_writers=args.burst_writers or base.burst_writers,
        burst_seconds=args.burst_seconds or base.burst_seconds,
        watch_seconds=args.watch_seconds or base.watch_seconds,
        settle_seconds=base.settle_seconds,
        idle_connection_timeout=args.idle_connection_timeout or base.idle_connection_timeout,
        tasks=args.tasks or base.tasks,
        task_rate=args.task_rate or base.task_rate,
        task_enqueues=args.task_enqueues or base.task_enqueues,
    )
    args.workloads = [w.sized(args.sizes) for w in args.workloads]
    args.skipped = [w for w in args.workloads if w.needs_backlog and not args.sizes.backlog]
    args.workloads = [w for w in args.workloads if w not in args.skipped]
    return args


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through every finally: processes, databases


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    server = Server.from_url(args.database_url)
    workdir = Path(tempfile.mkdtemp(prefix="pgpubsub-bench-"))
    logs = workdir / "logs"
    logs.mkdir()
    processes = Processes(logs)
    databases = Databases(server)
    failed = False
    for workload in args.skipped:
        log(f"skipping {workload.number}. {workload.name}: no backlog size B (--quick)")
    try:
        sides = [Side(OURS, sys.executable, workdir / OURS, str(ROOT))]
        if args.psycopg3:
            venv = args.venv_dir.parent / PSYCOPG3_VENV_NAME
            python = ensure_psycopg3_venv(venv, processes)
            sides.append(Side(OURS_PSYCOPG3, python, workdir / OURS_PSYCOPG3, None))
        if not args.skip_theirs:
            python = ensure_theirs_venv(args.venv_dir, processes)
            sides.append(Side(THEIRS, python, workdir / THEIRS, None))
        needs_sides = any(not w.sideless for w in args.workloads)
        if needs_sides:
            for side in sides:
                log(f"preparing {side.name} ({side.python})")
                prepare_side(side, server, databases, processes)
        if any(w.engine.embedded for w in args.workloads):
            for side in sides:
                if side.checkout:
                    ensure_gunicorn(side, args.venv_dir.parent, processes)
        # django-tasks-db: measured within the tasks workloads' runs, not a column of its own.
        tasks_db = None
        if any(w.name in tasks.NAMES for w in args.workloads) and not args.skip_tasks_db:
            log("preparing django-tasks-db")
            venv = args.venv_dir.parent / tasks.TASKS_DB_VENV_NAME
            tasks_db = tasks.prepare_tasks_db(workdir, venv, server, databases, processes)
        named = {s.name: s for s in sides}
        if tasks_db is not None:
            named[tasks_db.name] = tasks_db
        context = Context(server, databases, processes, args.sizes, named)
        results = measure(context, args.workloads, sides, args.repeat)
        report = build_report(args, server, sides, results, tasks_db)
        markdown = render_markdown(report)
        print(markdown)
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            if args.output.suffix == ".json":
                args.output.write_text(json.dumps(report, indent=2) + "\n")
            else:
                args.output.write_text(markdown)
            log(f"wrote {args.output}")
        failed = bool(report["errors"])
        return 1 if failed else 0
    except BenchmarkError as exc:
        failed = True
        log(f"error: {exc}")
        return 1
    finally:
        processes.stop_all()
        databases.drop_all()
        if args.keep_temp or failed:
            log(f"projects and logs kept in {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)


def log(message: str) -> None:
    print(f"[bench {datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def measure(
    context: Context, workloads: list[Workload], sides: list[Side], repeat: int
) -> dict[str, dict[str, list[dict[str, float]] | list[str]]]:
    """workload name -> side name -> the metrics of each run (and "errors" -> messages).
    Sides alternate: in the order given on even repetitions (ours, ours-psycopg3, theirs),
    reversed on odd ones. A side whose engine cannot run a workload (1.3.1 has no
    ``--threads``), or a workload of this checkout only (28) on 1.3.1, or a workload that times
    no side's driver on the psycopg 3 side, leaves it out."""
    results: dict = {w.name: {"errors": []} for w in workloads}
    for rep in range(repeat):
        order = sides if rep % 2 == 0 else list(reversed(sides))
        for workload in workloads:
            for side in [None] if workload.sideless else order:
                label = "ceiling" if side is None else side.name
                engine = None if side is None else workload.engine.for_side(side)
                if side is not None and not _runs_on(workload, side, engine):
                    continue
                shown = (
                    "" if engine is None or not workload.listens else f" with {engine.describe()}"
                )
                log(f"run {rep + 1}/{repeat}: {workload.number}. {workload.name} [{label}]{shown}")
                try:
                    metrics = workload.run(context, side, engine)
                except BenchmarkError as exc:
                    message = f"{workload.name} [{label}] run {rep + 1}: {exc}"
                    log(f"error: {message}")
                    results[workload.name]["errors"].append(message)
                    continue
                except Exception:
                    message = f"{workload.name} [{label}] run {rep + 1}: {traceback.format_exc()}"
                    log(f"error: {message}")
                    results[workload.name]["errors"].append(message)
                    continue
                log("  " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
                results[workload.name].setdefault(label, []).append(metrics)
    return results


def _runs_on(workload: Workload, side: Side, engine) -> bool:
    """Whether ``side`` runs ``workload`` (with ``engine``, its engine there)."""
    if engine is None or workload.ours_only and not side.checkout:
        return False
    return not (workload.driver_free and side.name == OURS_PSYCOPG3)


def summarize(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _ratio(value: dict | None, reference: dict | None) -> float | None:
    """The ratio of two summaries' medians, None when either is missing or the reference 0."""
    if value and reference and reference["median"]:
        return value["median"] / reference["median"]
    return None


def build_report(
    args, server: Server, sides: list[Side], results: dict, tasks_db: Side | None = None
) -> dict:
    psycopg3 = any(side.name == OURS_PSYCOPG3 for side in sides)
    rows = []
    for workload in args.workloads:
        runs = results[workload.name]
        for metric in workload.metrics:
            row = {
                "workload": workload.number,
                "name": workload.name,
                "title": workload.title,
                "metric": metric.label,
                "key": metric.key,
                "unit": metric.unit,
                "higher_is_better": metric.higher_is_better,
                "digits": metric.digits,
            }
            labels = ("ours", "theirs", "ceiling")
            if psycopg3:
                labels += (OURS_PSYCOPG3,)
            for label in labels:
                values = [run[metric.key] for run in runs.get(label, []) if metric.key in run]
                row[label] = summarize(values)
                row[f"{label}_runs"] = values
            if workload.sideless:
                row["ours"], row["ceiling"] = row["ceiling"], None
                row["ours_runs"] = row.pop("ceiling_runs")
            ours, theirs = row["ours"], row["theirs"]
            row["ratio"] = _ratio(ours, theirs)
            if psycopg3:
                row["psycopg3_ratio"] = _ratio(row[OURS_PSYCOPG3], ours)
            rows.append(row)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks " + " ".join(sys.argv[1:]),
        "machine": {
            "nproc": os.cpu_count(),
            "cpu": cpu_model(),
            "platform": platform.platform(),
            "runner python": platform.python_version(),
            "postgresql": server.version(),
            "postgresql settings": ", ".join(
                f"{k} {v}" for k, v in server.settings(SERVER_SETTINGS).items()
            ),
        },
        "sizes": {
            "K (events)": args.sizes.events,
            "M (messages)": args.sizes.messages,
            "B (backlog)": args.sizes.backlog if not args.skipped else "not run",
            "R (paced rate, /s)": args.sizes.rate,
            "paced seconds": args.sizes.paced_seconds,
            "idle seconds": args.sizes.idle_seconds,
            "web seconds": args.sizes.web_seconds,
            "ceiling batch": args.sizes.batch,
            "N (no-op rows)": args.sizes.noop_rows,
            "writers": ",".join(map(str, args.sizes.writers)),
            "writer seconds": args.sizes.writer_seconds,
            "writers' client (34, 36)": writer_client(),
            "burst writers": args.sizes.burst_writers,
            "burst seconds": args.sizes.burst_seconds,
            "watcher window seconds": args.sizes.watch_seconds,
            "idle connection timeout (38)": args.sizes.idle_connection_timeout,
            **tasks.sizes_lines(args.sizes),
            "repeat": args.repeat,
        },
        "engine": ENGINE_LINE,
        "sides": {side.name: side.versions for side in [*sides, *filter(None, [tasks_db])]},
        "rows": rows,
        "summary": summary_lines(rows),
        "targets": targets(args, sides, rows),
        "task_targets": tasks.task_targets(args, rows),
        "scaling": grid(_SCALING_COLUMNS, _SCALING_ROWS, results),
        "comparison": grid(_COMPARISON_COLUMNS, _COMPARISON_ROWS, results),
        "web": grid(_WEB_COLUMNS, _WEB_ROWS, results),
        "writers": grid(*_writer_table(args.sizes.writers), results),
        "drivers": driver_table(sides, rows) if psycopg3 else None,
        "notes": NOTES
        + driver_notes(args, sides)
        + engine_notes(args)
        + idle_notes(args, results)
        + web_notes(args, results)
        + per_message_notes(args, results)
        + tasks.notes(args, tasks_db),
        "errors": [e for w in args.workloads for e in results[w.name]["errors"]],
    }


def _median(rows: list[dict], name: str, key: str, label: str) -> float | None:
    for row in rows:
        if row["name"] == name and row["key"] == key:
            return row[label]["median"] if row[label] else None
    return None


#: Summary lines: (what, workload, metric, reference workload, its metric), per side.
_SHARES = (
    ("drain, from process start", "drain", "rate", "ceiling", "rate"),
    (
        "drain, first to last effect vs the loop alone",
        "drain",
        "processing_rate",
        "ceiling",
        "loop_rate",
    ),
    ("one-per-tx vs the loop alone", "one-per-tx", "rate", "ceiling", "loop_rate"),
    ("bulk vs the loop alone", "bulk", "rate", "ceiling", "loop_rate"),
)
_SCALING = (
    ("drain, first to last effect", "drain-2p", "processing_rate", "drain", "processing_rate"),
    ("one-per-tx", "one-per-tx-2p", "rate", "one-per-tx", "rate"),
)
_BACKLOG = (
    ("drain, first to last effect", "backlog", "processing_rate", "drain", "processing_rate"),
    ("bulk", "bulk-backlog", "rate", "bulk", "rate"),
)


def summary_lines(rows: list[dict]) -> list[str]:
    """Ours as a share of the ceiling, 2 processes against 1, and backlog B against K."""
    lines = []
    shares = []
    for what, name, key, ref_name, ref_key in _SHARES:
        ours = _median(rows, name, key, "ours")
        ceiling = _median(rows, ref_name, ref_key, "ours")  # the ceiling's row keeps it there
        if ours and ceiling:
            shares.append(f"{what} {ours / ceiling:.0%}")
    if shares:
        lines.append(
            "Ours as a share of the hand-written ceiling (workload 6): " + "; ".join(shares)
        )
    for title, table in (
        ("Scaling, `--processes 2` / `--processes 1` (workloads 9, 10 / 1, 2)", _SCALING),
        ("Backlog, B rows / K rows (workloads 11, 12 / 1, 7)", _BACKLOG),
    ):
        parts = []
        for what, name, key, ref_name, ref_key in table:
            for label in ("ours", "theirs"):
                value = _median(rows, name, key, label)
                reference = _median(rows, ref_name, ref_key, label)
                if value and reference:
                    parts.append(f"{what} {label} {value / reference:.2f}x")
        if parts:
            lines.append(f"{title}: " + "; ".join(parts))
    parts = []
    for what, name, ref_key in (
        ("`notify()` rows", "noop-drain", "rate"),
        ("trigger rows", "trigger-noop-drain", "trigger_rate"),
    ):
        ours = _median(rows, name, "rate", "ours")
        raw = _median(rows, "raw-drain", ref_key, "ours")
        if ours and raw:
            parts.append(
                f"{what} {ours / raw:.1%} ({1e6 / ours:,.0f} µs per message against "
                f"{1e6 / raw:,.0f} µs)"
            )
    if parts:
        lines.append(
            "No-op drains as a share of the raw drain of the same rows (workloads 29, 30 / "
            "31): " + "; ".join(parts)
        )
    rss = _median(rows, "web-emb", "added_rss_mb", "ours")
    cpu = _median(rows, "web-emb", "added_cpu_ms_per_s", "ours")
    if rss is not None and cpu is not None:
        listeners = [
            f"{label} {value:.2f} ms/s"
            for label, side in (("ours", "ours"), ("1.3.1", "theirs"))
            if (value := _median(rows, "idle", "cpu_ms_per_s", side)) is not None
        ]
        lines.append(
            f"The embedded Runtime adds {rss:.1f} MB RSS and {cpu:.2f} ms/s of idle CPU to a "
            "gunicorn worker (workload 28, medians)"
            + ("; an idle `listen` (workload 5) uses " + ", ".join(listeners) if listeners else "")
        )
    return lines


#: Server settings the report lists: what a commit costs (workload 34) depends on them.
SERVER_SETTINGS = ("fsync", "synchronous_commit", "wal_sync_method", "shared_buffers")


def _writer_table(levels: tuple[int, ...]) -> tuple[tuple[str, ...], tuple]:
    """Workload 34 as a table: (a)-(d) by rows, commits/s and the ratio to (a) for each number
    of writers."""
    columns = tuple(
        title
        for n in levels
        for title in (f"{n} writer{'s' if n > 1 else ''} (commits/s)", f"{n}: ratio to (a)")
    )
    rows = []
    for key, title in (
        ("plain", "(a) table without trigger"),
        (
            "trigger",
            "(b) this checkout's lockable trigger channel, default (store only, the watcher wakes)",
        ),
        ("notify", "(b') the same with per-write NOTIFY (`PGPUBSUB_NOTIFY_ON_WRITE = True`)"),
        ("theirs", "(c) django-pgpubsub 1.3.1's lockable trigger channel (store + NOTIFY)"),
        ("stored", "(d) hand-written trigger storing the row, no NOTIFY"),
    ):
        cells = []
        for n in levels:
            cells.append(("writers", "ours", f"{key}_c{n}", 0, False))
            ratio = "-" if key == "plain" else f"{key}_ratio_c{n}"
            cells.append(("writers", "ours", ratio, 2, False))
        rows.append((title, cells))
    return columns, tuple(rows)


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "not met", None: "not judged here"}[met]


def targets(args, sides: list[Side], rows: list[dict]) -> list[dict]:
    """Each target of issues 16 and 15 beside what this run measured: ``issue``, ``target``,
    ``measured`` (text), ``verdict`` (met, not met, not measured...)."""
    out: list[dict] = []

    def add(issue: int, target: str, measured: str | None, met: bool | None, needs: str) -> None:
        if measured is None:
            measured, verdict = "—", f"not measured in this run (`--only {needs}`)"
        else:
            verdict = _verdict(met)
        out.append({"issue": issue, "target": target, "measured": measured, "verdict": verdict})

    def med(name: str, key: str, label: str = "ours") -> float | None:
        return _median(rows, name, key, label)

    noop, raw = med("noop-drain", "rate"), med("raw-drain", "rate")
    add(
        16,
        "no-op lockable drain ≥ 50% of the raw drain (29 / 31)",
        f"{noop / raw:.1%} ({noop:,.0f} vs {raw:,.0f} msgs/s)" if noop and raw else None,
        bool(noop and raw and noop / raw >= 0.5),
        "noop-drain,raw-drain",
    )
    orm, loop = med("drain", "processing_rate"), med("orm-loop", "processing_rate")
    add(
        16,
        "ORM listener drain ≥ 80% of a hand-written loop calling the same listener with the "
        "same batching and atomicity (1 / 32, first to last effect)",
        f"{orm / loop:.1%} ({orm:,.0f} vs {loop:,.0f} rows/s)" if orm and loop else None,
        bool(orm and loop and orm / loop >= 0.8),
        "drain,orm-loop",
    )
    for name, what in (("ping", "33, no-op listener"), ("plain", "4, ORM listener")):
        ours, theirs = med(name, "rate"), med(name, "rate", "theirs")
        add(
            16,
            f"plain messages at full speed: throughput ≥ 1.3.1's ({what})",
            f"{ours / theirs:.2f}x ({ours:,.0f} vs {theirs:,.0f} msgs/s)"
            if ours and theirs
            else None,
            bool(ours and theirs and ours >= theirs),
            name,
        )
        ours, theirs = med(name, "p99_ms"), med(name, "p99_ms", "theirs")
        add(
            16,
            f"plain messages at full speed: p99 latency ≤ 1.3.1's ({what})",
            f"{ours:,.1f} vs {theirs:,.1f} ms" if ours is not None and theirs else None,
            ours is not None and theirs is not None and ours <= theirs,
            name,
        )
    p99, capacity = med("latency", "trigger_p99_ms"), med("one-per-tx", "rate")
    measured = None
    if p99 is not None:
        measured = f"p99 {p99:,.1f} ms at R = {args.sizes.rate:g}/s (workload 8)"
        if capacity:
            measured += f"; capacity one row per transaction (2): {capacity:,.0f}/s"
            if not 0.4 <= args.sizes.rate / capacity <= 0.6:
                measured += f", so half is {capacity / 2:,.0f}/s: rerun with that `--rate`"
        else:
            measured += "; capacity not measured (workload 2)"
    add(
        16,
        "lockable p99 ≤ 50 ms at half of measured capacity, one row per transaction",
        measured,
        p99 is not None and p99 <= 50,
        "one-per-tx,latency --rate <half of one-per-tx>",
    )
    out.append(driver_target(sides, rows))
    cpu, rss = med("idle", "cpu_ms_per_s"), med("idle", "rss_mb")
    add(
        16,
        "no regression: idle CPU, RSS (workload 5; and every reliability test)",
        f"idle CPU {cpu:.2f} ms/s, RSS {rss:.1f} MB: compare with the previous report"
        if cpu is not None and rss is not None
        else None,
        None,
        "idle",
    )
    levels = args.sizes.writers
    top = max(levels)
    ratio = med("writers", f"trigger_ratio_c{top}")
    measured = None
    if ratio is not None:
        measured = f"{ratio:.2f} at {top} writers"
        extra = [
            f"{what} {value:.2f}"
            for what, key in (
                ("(b') per-write NOTIFY", "notify"),
                ("(c) 1.3.1", "theirs"),
                ("(d) store only", "stored"),
            )
            if (value := med("writers", f"{key}_ratio_c{top}")) is not None
        ]
        if extra:
            measured += " (" + ", ".join(extra) + ")"
        if top != 16:
            measured += "; the target is at 16 writers (`--writers 1,4,16`)"
    add(
        15,
        "16 writers into a model with a lockable trigger channel: (b)/(a) ≥ 0.70 of the "
        "commits/s without trigger (34)",
        measured,
        ratio is not None and top == 16 and ratio >= 0.7,
        "writers",
    )
    issue15_targets(args, rows, add, med)
    return out


DRIVER_TARGET = "psycopg 3 at least as fast as psycopg2 on every workload"


def speed(row: dict) -> str | None:
    """What a row of the table says about speed: "throughput" (a rate, higher is better),
    "time" (a latency or duration, lower is better), or None (CPU, memory, counts)."""
    unit = row["unit"]
    if row["higher_is_better"] and (unit.endswith("/s") or unit == "per s"):
        return "throughput"
    if not row["higher_is_better"] and unit in ("ms", "s"):
        return "time"
    return None


def _faster(row: dict) -> bool | None:
    """Whether the psycopg 3 side is at least as fast as ours on this row; None when the row is
    no speed or either side has no median."""
    kind, ratio = speed(row), row.get("psycopg3_ratio")
    if kind is None or ratio is None:
        return None
    return ratio >= 1.0 if kind == "throughput" else ratio <= 1.0


def _drivers(sides: list[Side]) -> tuple[str | None, str | None]:
    """The driver Django used on ours and on the psycopg 3 side (None: that side did not run)."""
    found = {side.name: side.versions.get("driver", "?") for side in sides}
    return found.get(OURS), found.get(OURS_PSYCOPG3)


def driver_target(sides: list[Side], rows: list[dict]) -> dict:
    """Issue 16's driver target: every throughput and time metric that both this checkout's
    sides measured, psycopg 3 against psycopg2 (``--psycopg3``)."""
    ours, other = _drivers(sides)
    target = {"issue": 16, "target": DRIVER_TARGET}
    if other is None:
        return {
            **target,
            "measured": f"this run used {ours or 'the driver Django picks'} only",
            "verdict": "not measured (add `--psycopg3`: this checkout again in a venv with "
            "psycopg 3)",
        }
    judged = [row for row in rows if _faster(row) is not None]
    if ours != "psycopg2":
        return {
            **target,
            "measured": f"ours ran {ours} (the runner's Python has psycopg installed, which "
            "Django prefers): run the runner from an environment without psycopg",
            "verdict": _verdict(None),
        }
    if not judged:
        return {
            **target,
            "measured": "no throughput or latency measured by both drivers",
            "verdict": _verdict(None),
        }
    met = [_faster(row) for row in judged]
    parts = [
        f"{row['workload']} {row['name']} {row['metric']} {row['psycopg3_ratio']:.2f}x "
        f"{'met' if ok else 'not met'}"
        for row, ok in zip(judged, met, strict=True)
    ]
    return {
        **target,
        "measured": f"psycopg 3 / psycopg2, medians ({sum(met)} of {len(met)} met; "
        "throughput: ≥ 1 is met, latency and times: ≤ 1): " + "; ".join(parts),
        "verdict": _verdict(all(met)),
    }


def driver_table(sides: list[Side], rows: list[dict]) -> dict:
    """This checkout with each driver (``--psycopg3``): the rows both sides measured."""
    ours, other = _drivers(sides)
    out = []
    for row in rows:
        if row["ours"] is None or row[OURS_PSYCOPG3] is None:
            continue
        faster = _faster(row)
        overlap = (
            row["ours"]["min"] <= row[OURS_PSYCOPG3]["max"]
            and row[OURS_PSYCOPG3]["min"] <= row["ours"]["max"]
        )
        out.append(
            {
                "workload": row["workload"],
                "name": row["name"],
                "metric": row["metric"],
                "unit": row["unit"],
                "digits": row["digits"],
                "speed": speed(row),
                "psycopg2": row["ours"],
                "psycopg 3": row[OURS_PSYCOPG3],
                "ratio": row["psycopg3_ratio"],
                "met": faster,
                "ranges_overlap": overlap,
            }
        )
    return {"ours driver": ours, "ours-psycopg3 driver": other, "rows": out}


def driver_notes(args, sides: list[Side]) -> list[str]:
    """What the psycopg 3 side runs (``--psycopg3``)."""
    if not any(side.name == OURS_PSYCOPG3 for side in sides):
        return []
    venv = args.venv_dir.parent / PSYCOPG3_VENV_NAME
    left_out = [f"{w.number} ({w.name})" for w in args.workloads if w.sideless or w.driver_free]
    but = f" but {', '.join(left_out)}, whose timed part uses no side's driver" if left_out else ""
    return [
        f"ours-psycopg3 is this checkout installed editable into `{venv}` with "
        "`psycopg[binary]` and without psycopg2, so Django's PostgreSQL backend (and the "
        "library with it) uses psycopg 3; ours runs with the runner's Python. It runs every "
        "workload ours runs in the same invocation (the sides alternate from run to run)"
        f"{but}. The runner's own statements (the INSERTs of the lockable workloads, the "
        "probes, the checks) use psycopg2 for both: only the side's processes (`listen`, "
        "gunicorn, the producer, the ORM loop) change driver. Its numbers are in the table "
        '"psycopg 3 vs psycopg2", not in the main one, whose ratio stays ours/theirs; there a '
        "throughput ratio ≥ 1 and a latency ratio ≤ 1 mean psycopg 3 is at least as fast, and "
        "overlapping min–max ranges mean the difference is within this machine's noise."
    ]


def _runs(rows: list[dict], name: str) -> int:
    """How many runs of this checkout produced metrics for workload ``name``."""
    return max((len(row["ours_runs"]) for row in rows if row["name"] == name), default=0)


def issue15_targets(args, rows: list[dict], add, med) -> None:
    """The other targets of issue 15: latency of the NOTIFY-free mode (8, paced; 36, burst),
    the watcher's idle cost (37) and the sessions of 8 idle embedded workers (38)."""
    rate = args.sizes.rate
    p50, p99 = med("latency", "trigger_p50_ms"), med("latency", "trigger_p99_ms")
    measured = None
    if p50 is not None and p99 is not None:
        measured = f"p50 {p50:,.1f} ms, p99 {p99:,.1f} ms at R = {rate:g}/s (workload 8)"
        now50, now99 = (
            med("latency-on-write", "trigger_p50_ms"),
            med("latency-on-write", "trigger_p99_ms"),
        )
        if now50 is not None and now99 is not None:
            measured += f"; per-write NOTIFY (35): p50 {now50:,.1f} ms, p99 {now99:,.1f} ms"
        if rate != 200:
            measured += "; the target is at 200/s (`--rate 200`)"
    add(
        15,
        "NOTIFY-free delivery latency at a paced 200 msgs/s: p50 ≤ 15 ms, p99 ≤ 50 ms (8)",
        measured,
        p50 is not None and p99 is not None and rate == 200 and p50 <= 15 and p99 <= 50,
        "latency,latency-on-write",
    )
    done, wanted = _runs(rows, "burst"), args.repeat
    measured = None
    writers = args.sizes.burst_writers
    if done or any(w.name == "burst" for w in args.workloads):
        measured = f"every row exactly once in {done} of {wanted} runs"
        if done:
            measured += (
                f"; {med('burst', 'rows'):,.0f} rows from {writers} writers in "
                f"{writer_seconds(args.sizes.burst_seconds):g} s ({med('burst', 'write_rate'):,.0f} commits/s), "
                f"caught up {med('burst', 'catch_up_s'):,.2f} s after the last insert, "
                f"p50 {med('burst', 'p50_ms'):,.0f} ms, p99 {med('burst', 'p99_ms'):,.0f} ms, "
                f"{med('burst', 'wakeups'):,.0f} wake-ups (36)"
            )
        if writers != 16:
            measured += "; the target is at 16 writers (`--burst-writers 16`)"
    add(
        15,
        "under 16 writers at full speed, every row processed exactly once, a running `listen` "
        "keeping up or catching up (36)",
        measured,
        bool(done) and done == wanted and writers == 16,
        "burst",
    )
    queries, cpu = med("watcher-idle", "queries_per_s"), med("watcher-idle", "cpu_max_ms_per_s")
    measured = None
    if queries is not None and cpu is not None:
        median_cpu = med("watcher-idle", "cpu_median_ms_per_s")
        watcher = med("watcher-idle", "cpu_watcher_ms_per_s")
        measured = (
            f"{queries:,.1f} queries/s in total; CPU per Runtime: busiest {cpu:.2f} ms/s, "
            f"median {median_cpu:.2f} ms/s, the watcher {watcher:.2f} ms/s (37)"
        )
    add(
        15,
        "watcher idle cost in a deployment of 4 Runtimes: ≤ 20 queries/s in total, ≤ 0.5 ms/s "
        "CPU per Runtime (37)",
        measured,
        queries is not None and cpu is not None and queries <= 20 and cpu <= 0.5,
        "watcher-idle",
    )
    start, idle = med("sessions-emb", "start_sessions"), med("sessions-emb", "idle_sessions")
    measured = None
    if start is not None and idle is not None:
        worst = max(
            value
            for row in rows
            if row["name"] == "sessions-emb" and row["key"] in ("start_sessions", "idle_sessions")
            for value in row["ours_runs"]
        )
        busy = med("sessions-emb", "busy_sessions")
        measured = (
            f"{start:.0f} after start, {idle:.0f} once the idle timeout "
            f"({args.sizes.idle_connection_timeout:g} s) passed after work (most in any run: "
            f"{worst:.0f}); {busy:.0f} at most while processing (38)"
        )
    add(
        15,
        "8 idle embedded gunicorn workers hold ≤ 8 + 1 database sessions (38)",
        measured,
        start is not None and idle is not None and max(start, idle) <= 9,
        "sessions-emb",
    )


def _watcher_cpu_exact(results: dict | None) -> str:
    """Whether every run of workload 37 read every Runtime's CPU time in nanoseconds."""
    runs = (results or {}).get("watcher-idle", {}).get("ours", [])
    if runs and not all(run.get("cpu_in_ns") for run in runs):
        tick_ms = 1000.0 / CLOCK_TICKS
        return (
            f"in some runs, clock ticks of {tick_ms:g} ms instead: a process ended, or its "
            "clock was unreadable"
        )
    return "well below the 0.01 ms/s shown"


def per_message_notes(args, results: dict | None = None) -> list[str]:
    """How workloads 29-34 measure."""
    names = {w.name for w in args.workloads}
    notes = []
    if names & {"noop-drain", "trigger-noop-drain", "ping"}:
        notes.append(
            "Workloads 29, 30 and 33: the listener does nothing but count its callbacks in "
            "memory (33: and keep each latency, callback time − send time); once the expected "
            "number ran it writes them to a file the runner reads. Throughput is counted from "
            "the first callback to the last (29, 30) or from the first send to the last "
            "callback (33). Exactly once: as many callbacks as rows, and no stored row left."
        )
    if names & {"raw-drain", "orm-loop"}:
        notes.append(
            f"Workload 31 drains the same N stored rows (first those `notify()` stored, as in "
            f"29, then those the trigger stored, as in 30) in the runner's process: "
            f"`DELETE FROM pgpubsub_notification WHERE id IN (SELECT id … ORDER BY id LIMIT "
            f"{RAW_BATCH} FOR UPDATE SKIP LOCKED) RETURNING payload`, the payloads decoded, one "
            "commit per batch; messages/s of the loop. Workload 32 drains workload 1's K rows "
            "with `orm_loop.py` (Django, the benchmark's `record_event` listener, no pgpubsub "
            "code): the Runtime's batch size (`pgpubsub.store.BATCH_SIZE`) claimed and deleted "
            "in one statement, a savepoint per message, a commit per batch."
        )
    if "writers" in names:
        levels = ", ".join(map(str, args.sizes.writers))
        half = writer_seconds(args.sizes.writer_seconds / 2)
        if "pgbench" in writer_client():
            client = (
                f"`pgbench -n -c N -j N -T {half:g} -f <one INSERT>` (a C client: N connections, "
                "a thread each, autocommit, the simple query protocol as Django sends its "
                "statements; its tps without the initial connection time; `-T` takes whole "
                "seconds, so each half lasts at least 1 s)"
            )
        else:
            client = (
                "Python writer processes (writers.py: psycopg2, a connection each, autocommit; "
                "pgbench is not on the PATH). They run on the same cores as the server: their "
                "own CPU keeps the absolute rates, and the store-only trigger's ratio, below "
                "what pgbench reaches"
            )
        notes.append(
            f"Workload 34: {levels} concurrent writers, one INSERT per transaction, by {client}, "
            "into a fresh database per target, no listener running, in two halves of "
            f"{half:g} s per target and number of writers (a, b, b', c, d, then d, c, b', b, a): "
            "(a) a copy of the Event table without trigger, (b) Event with this "
            "checkout's lockable trigger channel in its default mode (the row stored, no "
            "NOTIFY), (b') the same with `PGPUBSUB_NOTIFY_ON_WRITE = True`, (c) Event in a "
            "database migrated by "
            "django-pgpubsub 1.3.1, (d) a copy of Event whose hand-written trigger stores the "
            "same payload into `pgpubsub_notification` without NOTIFY. Every row the triggers "
            "received is checked to be stored (the writers' transactions = rows of "
            "`pgpubsub_notification`). The ratios to (a) are taken within each run, then their "
            "median."
        )
    if names & {"latency-on-write", "burst", "watcher-idle", "sessions-emb"}:
        notes.append(
            "Workloads 35-38 (issue 15, this checkout only): 35 is workload 8's paced trigger "
            "rows with per-write NOTIFY (workload 8 runs the default mode: the watcher wakes "
            f"the listener); 36: {args.sizes.burst_writers} writers (workload 34's client) for "
            f"{writer_seconds(args.sizes.burst_seconds):g} s while `listen` runs, latency from each row's "
            "commit to its effect (it includes the backlog), every row exactly once, wake-ups "
            "= NOTIFYs on the channel seen by a LISTEN session of the runner; 37: 4 idle "
            f"`listen` processes over {args.sizes.watch_seconds:g} s, queries/s = transactions "
            "of the database in `pg_stat_database` less the runner's own, CPU of each process "
            "in nanoseconds from its CPU-time clock (`clock_getcpuclockid`: every thread's run "
            "time, those that ended included; "
            f"{_watcher_cpu_exact(results)}); "
            "38: 8 gunicorn "
            "workers with `PGPUBSUB_EMBEDDED = True`, `PGPUBSUB_IDLE_CONNECTION_TIMEOUT = "
            f"{args.sizes.idle_connection_timeout:g}`, client sessions of `pg_stat_activity` on "
            "the database but the runner's."
        )
    return notes


def engine_notes(args) -> list[str]:
    """What the threads and embedded workloads run on each side."""
    notes = []
    engines = [w.engine for w in args.workloads if not w.sideless]
    if any(e.threads > 1 and not e.embedded for e in engines):
        notes.append(
            "django-pgpubsub 1.3.1 has no `--threads` option: the `--threads` workloads run on "
            "this checkout only (— in its column)."
        )
    if any(e.embedded for e in engines):
        notes.append(
            f"Embedded workloads (24–28): gunicorn with {EMBEDDED_WEB_WORKERS} sync workers serves "
            "the benchmark project with `PGPUBSUB_EMBEDDED = True`: each worker runs a Runtime "
            f"(a listener thread, {EMBEDDED_THREADS} worker threads, stored rows recovered at "
            "start). Every worker LISTENs, so every notification reaches each of them: a "
            "lockable row is claimed by one (SKIP LOCKED), a plain message is processed by all "
            "(a broadcast; workload 27 checks that each worker received every message once). "
            "django-pgpubsub 1.3.1 has no embedded mode: its column in workloads 24–27 is its "
            f"`listen --processes {EMBEDDED_WEB_WORKERS}` (as many processes receiving each "
            "notification, one thread each); workload 28 runs on this checkout only."
        )
        notes.append(
            "Workload 27 (and the plain rows of the comparison): msgs/s counts messages sent, "
            "each processed by every listening process (M / time from the first send to the "
            'last callback of any process); "callbacks, all processes" counts the '
            "processing of every copy; the latencies are those of every copy."
        )
    return notes


#: One cell of a summary table: workload name, side, metric key, digits, median only.
_Cell = tuple[str, str, str, int, bool]


def _scaling_row(title: str, drain: str, one: str, bulk: str) -> tuple[str, list[_Cell]]:
    return (
        title,
        [
            (drain, "ours", "processing_rate", 0, False),
            (drain, "ours", "threads_used", 0, True),
            (one, "ours", "rate", 0, False),
            (one, "ours", "threads_used", 0, True),
            (bulk, "ours", "rate", 0, False),
            (bulk, "ours", "threads_used", 0, True),
        ],
    )


_SCALING_COLUMNS = (
    "drain, first to last effect (rows/s)",
    "threads that drained",
    "one-per-tx (rows/s)",
    "threads used",
    "bulk (rows/s)",
    "threads used",
)
_SCALING_ROWS = (
    _scaling_row("`listen` (1 process, 1 thread)", "drain", "one-per-tx", "bulk"),
    _scaling_row("`listen --threads 2`", "drain-t2", "one-per-tx-t2", "bulk-t2"),
    _scaling_row("`listen --threads 4`", "drain-t4", "one-per-tx-t4", "bulk-t4"),
    _scaling_row("`listen --processes 2`", "drain-2p", "one-per-tx-2p", "bulk-2p"),
    _scaling_row(
        "`listen --processes 2 --threads 2`", "drain-2p-t2", "one-per-tx-2p-t2", "bulk-2p-t2"
    ),
    _scaling_row(
        f"embedded: gunicorn, {EMBEDDED_WEB_WORKERS} workers × {EMBEDDED_THREADS} threads",
        "drain-emb",
        "one-per-tx-emb",
        "bulk-emb",
    ),
)
_COMPARISON_COLUMNS = (
    f"embedded (gunicorn, {EMBEDDED_WEB_WORKERS} workers × {EMBEDDED_THREADS} threads)",
    "`listen --threads 1`",
    "`listen --threads 2`",
    "1.3.1 `listen`",
    f"1.3.1 `listen --processes {EMBEDDED_WEB_WORKERS}`",
)


def _comparison_row(title: str, names: tuple[str, str, str], key: str, digits: int):
    embedded, one, two = names
    return (
        title,
        [
            (embedded, "ours", key, digits, False),
            (one, "ours", key, digits, False),
            (two, "ours", key, digits, False),
            (one, "theirs", key, digits, False),
            (embedded, "theirs", key, digits, False),
        ],
    )


_COMPARISON_ROWS = tuple(
    _comparison_row(f"{what}: {metric}", names, key, digits)
    for what, names in (
        ("lockable trigger, one row per tx", ("one-per-tx-emb", "one-per-tx", "one-per-tx-t2")),
        ("lockable trigger, bulk", ("bulk-emb", "bulk", "bulk-t2")),
        ("plain end to end", ("broadcast-emb", "plain", "plain-t2")),
    )
    for metric, key, digits in (
        ("msgs/s" if what.startswith("plain") else "rows/s", "rate", 0),
        ("p50 (ms)", "p50_ms", 1),
        ("p99 (ms)", "p99_ms", 1),
    )
)


_WEB_COLUMNS = (
    "gunicorn worker, Runtime off",
    "gunicorn worker, Runtime on",
    "added by the Runtime",
    "`listen` (workload 5)",
    "1.3.1 `listen` (workload 5)",
)


def _web_row(title: str, key: str, digits: int, idle_key: str | None = None):
    """A row of the web table: workload 28 off, on, added; workload 5 of both sides (``-``,
    a key no run has, when workload 5 does not measure it: an empty cell)."""
    return (
        title,
        [
            ("web-emb", "ours", f"off_{key}", digits, False),
            ("web-emb", "ours", f"on_{key}", digits, False),
            ("web-emb", "ours", f"added_{key}", digits, False),
            ("idle", "ours", idle_key or "-", digits, False),
            ("idle", "theirs", idle_key or "-", digits, False),
        ],
    )


_WEB_ROWS = (
    _web_row("RSS (MB; `listen`: its process tree)", "rss_mb", 1, "rss_mb"),
    _web_row("idle CPU (ms/s)", "cpu_ms_per_s", 2, "cpu_ms_per_s"),
    _web_row("idle wake-ups (per s)", "wakeups_per_s", 1, "wakeups_per_s"),
    _web_row("threads", "threads", 0),
    _web_row("database sessions while idle", "sessions", 1),
    _web_row("CPU serving requests (ms/s)", "serve_cpu_ms_per_s", 2),
    _web_row("request latency p50 (ms)", "req_p50_ms", 2),
    _web_row("request latency p99 (ms)", "req_p99_ms", 2),
    _web_row("RSS after serving (MB)", "served_rss_mb", 1),
)


def web_notes(args, results: dict) -> list[str]:
    """How workload 28 measured."""
    runs = results.get("web-emb", {}).get("ours", [])
    if not runs:
        return []
    window = args.sizes.web_seconds
    if all(run["cpu_in_ns"] for run in runs):
        exact = "in nanoseconds, from each process's CPU-time clock"
    else:
        exact = "partly in clock ticks (a process or thread ended, or no clock)"
    return [
        f"Workload 28 starts gunicorn ({EMBEDDED_WEB_WORKERS} sync workers) with "
        "`PGPUBSUB_EMBEDDED = False`, then `True` (the order alternates from run to run; "
        "everything else the same), waits until each worker has loaded the application and, "
        "when on, each worker's Runtime processed a probe message (it LISTENs), then until no "
        "worker's RSS changes over 0.5 s. It then measures each worker (not gunicorn's master): "
        f"RSS (`VmRSS`), CPU over a {window:g} s idle window ({exact}) and wake-ups "
        "(voluntary context switches of its threads), then the same while serving "
        f"{REQUEST_RATE:g} requests per second for {window:g} s (paced, one connection each; "
        "the page makes one query). Values are per worker (the mean of the workers); "
        "\"added\" is on − off within a run. Workload 5's RSS and CPU are those of `listen`'s "
        "whole process tree (3 processes for 1.3.1). django-pgpubsub 1.3.1 has no embedded "
        "mode: nothing to run in its column."
    ]


def grid(columns: tuple[str, ...], rows: tuple, results: dict) -> dict | None:
    """A summary table: each cell the median, min and max of one metric of one workload and
    side; None when none of its workloads ran."""
    out = []
    for title, cells in rows:
        summaries = []
        for name, label, key, digits, brief in cells:
            runs = results.get(name, {}).get(label, [])
            summary = summarize([run[key] for run in runs if key in run])
            if summary is not None:
                summary.update(digits=digits, brief=brief)
            summaries.append(summary)
        if any(summaries):
            out.append({"title": title, "cells": summaries})
    return {"columns": list(columns), "rows": out} if out else None


def idle_notes(args, results: dict) -> list[str]:
    """How precisely idle CPU was measured."""
    runs = [run for label in ("ours", "theirs") for run in results.get("idle", {}).get(label, [])]
    if not runs:
        return []
    window = args.sizes.idle_seconds
    if all(run["cpu_in_ns"] for run in runs):
        return [
            "Idle CPU is read from each process's CPU-time clock (`clock_getcpuclockid`: the "
            "scheduler's run time of all its threads in nanoseconds, those that ended included) "
            f"for the whole process tree at the start and end of a {window:g} s window: well "
            "below the 0.01 ms/s shown."
        ]
    tick_ms = 1000.0 / CLOCK_TICKS
    return [
        f"Idle CPU fell back to clock ticks (utime + stime of `/proc/<pid>/stat`, "
        f"{tick_ms:g} ms each) in some runs: resolution {tick_ms / window:.2f} ms/s over the "
        f"{window:g} s window."
    ]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cell(summary: dict | None, digits: int) -> str:
    if summary is None:
        return "—"
    fmt = f"{{:,.{digits}f}}"
    return (
        f"{fmt.format(summary['median'])} "
        f"[{fmt.format(summary['min'])}–{fmt.format(summary['max'])}]"
    )


def _grid_cell(summary: dict | None) -> str:
    if summary is None:
        return "—"
    if summary["brief"]:
        return f"{summary['median']:,.{summary['digits']}f}"
    return _cell(summary, summary["digits"])


def render_markdown(report: dict) -> str:
    lines = ["# pgpubsub benchmarks", ""]
    lines.append(f"- date: {report['date']}")
    lines.append(f"- command: `{report['command']}`")
    for key, value in report["machine"].items():
        lines.append(f"- {key}: {value}")
    lines.append("- sizes: " + ", ".join(f"{k} {v}" for k, v in report["sizes"].items()))
    lines.append(f"- engine: {report['engine']}")
    for side, versions in report["sides"].items():
        shown = {k: v for k, v in versions.items() if k != "pgpubsub from"}
        lines.append(f"- {side}: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
    lines += [
        "",
        "| # | workload | metric | ours median [min–max] | theirs (1.3.1) median [min–max] | ours/theirs |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        unit = f" ({row['unit']})" if row["unit"] else ""
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "—"
        lines.append(
            f"| {row['workload']} | {row['title']} | {row['metric']}{unit} | "
            f"{_cell(row['ours'], row['digits'])} | {_cell(row['theirs'], row['digits'])} | "
            f"{ratio} |"
        )
    if report["summary"]:
        lines.append("")
        lines += [f"- {line}" for line in report["summary"]]
    measured = [t for t in report["targets"] if not t["verdict"].startswith("not measured")]
    if measured:
        # The driver line says which driver ran, whenever another target was measured.
        measured = [t for t in report["targets"] if not t["verdict"].startswith("not measured in")]
        lines += ["", "Targets of issues 15 and 16, measured in this run (medians):", ""]
        lines += [
            f"- issue {t['issue']}: {t['target']}: {t['measured']} — {t['verdict']}"
            for t in measured
        ]
    if report.get("task_targets"):
        lines += [
            "",
            "Targets of the tasks backend (workloads 29, 39-41), measured in this run:",
            "",
        ]
        lines += [
            f"- {t['target']}: {t['measured']} — {t['verdict']}" for t in report["task_targets"]
        ]
    for key, heading in (
        ("scaling", "Scaling of this checkout: `listen` processes and threads, and embedded"),
        ("comparison", "Embedded vs `listen` on the example workloads"),
        ("web", "What the embedded Runtime adds to a gunicorn worker, and idle listeners"),
        ("writers", "Writers' commits/s, one INSERT per transaction, no listener (workload 34)"),
    ):
        table = report.get(key)
        if table:
            lines += ["", f"{heading} (median [min–max]):", ""]
            lines.append("| | " + " | ".join(table["columns"]) + " |")
            lines.append("|---" * (len(table["columns"]) + 1) + "|")
            for row in table["rows"]:
                cells = [_grid_cell(cell) for cell in row["cells"]]
                lines.append(f"| {row['title']} | " + " | ".join(cells) + " |")
    drivers = report.get("drivers")
    if drivers and drivers["rows"]:
        lines += render_drivers(drivers)
    lines += ["", "Notes:"]
    lines += [f"- {note}" for note in report["notes"]]
    if report["errors"]:
        lines += ["", "Errors:"]
        lines += [f"- {error}" for error in report["errors"]]
    return "\n".join(lines) + "\n"


def render_drivers(table: dict) -> list[str]:
    """The table "psycopg 3 vs psycopg2": this checkout with each driver."""
    ours, other = table["ours driver"], table["ours-psycopg3 driver"]
    lines = [
        "",
        f"psycopg 3 vs psycopg2: this checkout with each driver, in the same run (ours: "
        f"{ours}, ours-psycopg3: {other}; median [min–max]):",
        "",
        f"| # | workload | metric | ours ({ours}) | ours-psycopg3 ({other}) | "
        f"{other} / {ours} | at least as fast |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table["rows"]:
        unit = f" ({row['unit']})" if row["unit"] else ""
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "—"
        if row["met"] is None:
            verdict = "—"
        else:
            verdict = "met" if row["met"] else "not met"
            if row["ranges_overlap"]:
                verdict += " (ranges overlap)"
        lines.append(
            f"| {row['workload']} | {row['name']} | {row['metric']}{unit} | "
            f"{_cell(row['psycopg2'], row['digits'])} | {_cell(row['psycopg 3'], row['digits'])} | "
            f"{ratio} | {verdict} |"
        )
    return lines
