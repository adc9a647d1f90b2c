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

from benchmarks.harness import (
    CLOCK_TICKS,
    EMBEDDED_THREADS,
    EMBEDDED_WEB_WORKERS,
    ROOT,
    BenchmarkError,
    Databases,
    Processes,
    Server,
    Side,
    ensure_gunicorn,
    ensure_theirs_venv,
    prepare_side,
)
from benchmarks.workloads import GROUPS, REQUEST_RATE, Context, Sizes, Workload, select

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/test"
DEFAULT_VENV_DIR = Path(tempfile.gettempdir()) / "pgpubsub-bench" / "venv-django-pgpubsub-1.3.1"
FULL = Sizes(
    events=2000,
    messages=2000,
    idle_seconds=30.0,
    batch=100,
    backlog=10000,
    rate=200.0,
    paced_seconds=10.0,
    web_seconds=10.0,
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
        f"{QUICK.web_seconds:g}s, no backlog workload "
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
        "--only",
        help="Comma-separated workload numbers or names, e.g. 1,2,ceiling, or groups: "
        + ", ".join(GROUPS)
        + ".",
    )
    parser.add_argument(
        "--skip-theirs", action="store_true", help="Measure this checkout only (no 1.3.1 venv)."
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
    for name in ("events", "messages", "backlog"):
        if getattr(args, name) is not None and getattr(args, name) < 2:
            parser.error(f"--{name} must be at least 2")
    for name in ("rate", "paced_seconds", "idle_seconds", "web_seconds"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
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
    )
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
        sides = [Side("ours", sys.executable, workdir / "ours", str(ROOT))]
        if not args.skip_theirs:
            python = ensure_theirs_venv(args.venv_dir, processes)
            sides.append(Side("theirs", python, workdir / "theirs", None))
        needs_sides = any(not w.sideless for w in args.workloads)
        if needs_sides:
            for side in sides:
                log(f"preparing {side.name} ({side.python})")
                prepare_side(side, server, databases, processes)
        if any(w.engine.embedded for w in args.workloads):
            ensure_gunicorn(sides[0], args.venv_dir.parent, processes)
        context = Context(server, databases, processes, args.sizes)
        results = measure(context, args.workloads, sides, args.repeat)
        report = build_report(args, server, sides, results)
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
    Sides alternate: ours first on even repetitions, theirs first on odd ones. A side whose
    engine cannot run a workload (1.3.1 has no ``--threads``), or a workload of this checkout
    only (28), leaves it out."""
    results: dict = {w.name: {"errors": []} for w in workloads}
    for rep in range(repeat):
        order = sides if rep % 2 == 0 else list(reversed(sides))
        for workload in workloads:
            for side in [None] if workload.sideless else order:
                label = "ceiling" if side is None else side.name
                engine = None if side is None else workload.engine.for_side(side.name)
                if side is not None and (engine is None or workload.ours_only and label != "ours"):
                    continue
                shown = "" if engine is None else f" with {engine.describe()}"
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


def summarize(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def build_report(args, server: Server, sides: list[Side], results: dict) -> dict:
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
            for label in ("ours", "theirs", "ceiling"):
                values = [run[metric.key] for run in runs.get(label, [])]
                row[label] = summarize(values)
                row[f"{label}_runs"] = values
            if workload.sideless:
                row["ours"], row["ceiling"] = row["ceiling"], None
                row["ours_runs"] = row.pop("ceiling_runs")
            ours, theirs = row["ours"], row["theirs"]
            row["ratio"] = (
                ours["median"] / theirs["median"] if ours and theirs and theirs["median"] else None
            )
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
            "repeat": args.repeat,
        },
        "engine": ENGINE_LINE,
        "sides": {side.name: side.versions for side in sides},
        "rows": rows,
        "summary": summary_lines(rows),
        "scaling": grid(_SCALING_COLUMNS, _SCALING_ROWS, results),
        "comparison": grid(_COMPARISON_COLUMNS, _COMPARISON_ROWS, results),
        "web": grid(_WEB_COLUMNS, _WEB_ROWS, results),
        "notes": NOTES + engine_notes(args) + idle_notes(args, results) + web_notes(args, results),
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
        exact = "in nanoseconds per thread (schedstat)"
    else:
        exact = "partly in clock ticks (a thread ended, or no schedstat)"
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
            f"Idle CPU is read per thread from `/proc/<pid>/task/<tid>/schedstat` (the "
            f"scheduler's run time in nanoseconds) for the whole process tree at the start and end "
            f"of a {window:g} s window: well below the 0.01 ms/s shown."
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
    for key, heading in (
        ("scaling", "Scaling of this checkout: `listen` processes and threads, and embedded"),
        ("comparison", "Embedded vs `listen` on the example workloads"),
        ("web", "What the embedded Runtime adds to a gunicorn worker, and idle listeners"),
    ):
        table = report.get(key)
        if table:
            lines += ["", f"{heading} (median [min–max]):", ""]
            lines.append("| | " + " | ".join(table["columns"]) + " |")
            lines.append("|---" * (len(table["columns"]) + 1) + "|")
            for row in table["rows"]:
                cells = [_grid_cell(cell) for cell in row["cells"]]
                lines.append(f"| {row['title']} | " + " | ".join(cells) + " |")
    lines += ["", "Notes:"]
    lines += [f"- {note}" for note in report["notes"]]
    if report["errors"]:
        lines += ["", "Errors:"]
        lines += [f"- {error}" for error in report["errors"]]
    return "\n".join(lines) + "\n"
