"""``python -m benchmarks.profiling``: where the time of one message goes, in the no-op
lockable drain (workload 29: N rows stored with ``notify()``, a listener that does nothing,
``listen --recover``, one process, default threads), for this checkout as it is in the working
tree.

    python -m benchmarks.profiling                        # N = 10,000, 3 timed runs
    python -m benchmarks.profiling --kind row             # the trigger channel (workload 30)
    python -m benchmarks.profiling --py-spy               # also sample with py-spy (installed)
    python -m benchmarks.profiling --output profile.md    # also write the report

Four passes over fresh copies of the same stored rows:

1. the drain as workload 29 runs it (``--repeat`` times): microseconds per message, unprofiled;
2. every SQL statement and commit of the worker threads timed at the driver (psycopg2), by
   kind: round trips per message and the time they take, with little overhead;
3. cProfile in every thread the Runtime starts: the worker threads' time by function and by
   group (self time), and the top functions by cumulative and self time; cProfile makes Python
   slower, so the groups are also given as shares of the Python time of pass 2;
4. with ``--py-spy``: py-spy samples the same drain (wall clock, waits included) and each
   sample of the per-message path is charged to its innermost pgpubsub function.
"""

from __future__ import annotations

import argparse
import json
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import (
    ROOT,
    BenchmarkError,
    Databases,
    Engine,
    Processes,
    Server,
    Side,
    git_revision,
    prepare_side,
    wait_for,
)
from benchmarks.runner import DEFAULT_DATABASE_URL, log
from benchmarks.workloads import (
    Context,
    Sizes,
    noop_drain,
    read_tallies,
    scalar,
    store_noop,
    tally_env,
)

#: What each function's own time (cProfile's tottime) is charged to: the first rule whose
#: path fragment (or, for built-ins, name fragment) matches.
GROUPS = (
    ("psycopg2", "SQL: psycopg2 execute/commit (round trips, server time)"),
    ("_json", "deserialisation: JSON"),
    ("json/", "deserialisation: JSON"),
    ("pgpubsub/store.py", "claim/acknowledge SQL building (pgpubsub.store, retries)"),
    ("pgpubsub/retries.py", "claim/acknowledge SQL building (pgpubsub.store, retries)"),
    ("pgpubsub/processing.py", "processing loop (pgpubsub.processing, batches, failures)"),
    ("pgpubsub/batches.py", "processing loop (pgpubsub.processing, batches, failures)"),
    ("pgpubsub/failures.py", "processing loop (pgpubsub.processing, batches, failures)"),
    ("pgpubsub/channel.py", "channel building, deserialisation (channel, codec, row_images)"),
    ("pgpubsub/codec.py", "channel building, deserialisation (channel, codec, row_images)"),
    ("pgpubsub/row_images.py", "channel building, deserialisation (channel, codec, row_images)"),
    ("pgpubsub/wire.py", "channel building, deserialisation (channel, codec, row_images)"),
    ("pgpubsub/listeners.py", "channel building, deserialisation (channel, codec, row_images)"),
    ("pgpubsub/signals.py", "signals"),
    ("django/dispatch", "signals"),
    ("logging/", "logging"),
    ("pgpubsub/", "pgpubsub: runtime, deliveries, other"),
    ("django/db/transaction.py", "Django: atomic(), savepoints"),
    ("django/db/backends", "Django: connection handling, cursor wrappers"),
    ("django/db/utils.py", "Django: connection handling, cursor wrappers"),
    ("django/db/__init__.py", "Django: connection handling, cursor wrappers"),
    ("django/utils/connection.py", "Django: connection handling, cursor wrappers"),
    ("asgiref", "Django: connection handling, cursor wrappers"),
    ("django/db/models", "Django: models (instances, fields)"),
    ("django/", "Django: other"),
    ("benchapp/", "the listener (benchapp)"),
    ("threading.py", "threads: waits, locks"),
    ("queue.py", "threads: waits, locks"),
    ("acquire", "threads: waits, locks"),
    ("wait", "threads: waits, locks"),
)
#: Groups that are not work done for a message (a worker waiting for the next one).
IDLE_GROUPS = {"threads: waits, locks"}


def group_of(function: tuple[str, int, str]) -> str:
    filename, _, name = function
    where = name if filename == "~" else filename.replace("\\", "/")
    for fragment, group in GROUPS:
        if fragment in where:
            return group
    return "other (stdlib, builtins)"


def short(function: tuple[str, int, str]) -> str:
    filename, line, name = function
    if filename == "~":
        return name
    for marker in ("site-packages/", "/lib/python3", str(ROOT) + "/"):
        if marker in filename:
            filename = filename.split(marker, 1)[1]
            break
    if "/benchapp/" in filename:
        filename = "benchapp/" + filename.split("/benchapp/", 1)[1]
    return f"{name} ({filename}:{line})"


def run_wrapped(ctx: Context, side: Side, kind: str, mode: str, workdir: Path) -> dict:
    """One drain under ``profiled_listen.py MODE``; what it wrote."""
    rows = ctx.sizes.noop_rows
    with ctx.fresh_database(side) as (dbname, conn):
        store_noop(ctx, side, dbname, conn, kind, rows)
        _, env = tally_env(side, rows)
        out = workdir / f"{mode}-{kind}"
        process = ctx.processes.start(
            f"profiled-{mode}",
            side.script("profiled_listen.py", mode, kind, str(out)),
            side.project,
            {**side.env(ctx.server, dbname, f"bench-{side.name}-listener"), **env},
        )
        try:
            wait_for(
                lambda: process.popen.poll() is not None,
                ctx.sizes.wait_timeout(rows) * 3,
                f"the {mode} drain",
            )
        finally:
            ctx.processes.stop(process)
        if process.popen.returncode != 0 or not out.with_suffix(".json").exists():
            raise BenchmarkError(f"the {mode} drain failed:\n{process.log_tail()}")
        result = json.loads(out.with_suffix(".json").read_text())
        if result.get("count") != rows or scalar(
            conn, "SELECT count(*) FROM pgpubsub_notification"
        ):
            raise BenchmarkError(f"the {mode} drain did not process {rows} rows once: {result}")
        result["prof"] = str(out.with_suffix(".prof"))
        return result


def py_spy_drain(ctx: Context, side: Side, kind: str, workdir: Path) -> Path:
    """The drain under ``py-spy record --idle`` (wall-clock samples, waits included); the raw
    (collapsed) stacks file."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    rows = ctx.sizes.noop_rows
    out = workdir / f"py-spy-{kind}.txt"
    with ctx.fresh_database(side) as (dbname, conn):
        store_noop(ctx, side, dbname, conn, kind, rows)
        directory, env = tally_env(side, rows)
        args = [py_spy, "record", "--idle", "--threads", "--rate", "1000", "--format", "raw"]
        args += ["--output", str(out), "--", *side.manage("listen", "--recover")]
        full_env = {**side.env(ctx.server, dbname, f"bench-{side.name}-listener"), **env}
        process = ctx.processes.start("py-spy", args, side.project, full_env)
        try:
            wait_for(
                lambda: (
                    sum(t["count"] for t in read_tallies(directory, kind)) >= rows
                    and not scalar(conn, "SELECT count(*) FROM pgpubsub_notification")
                ),
                ctx.sizes.wait_timeout(rows) * 3,
                "the py-spy drain",
                watch=[process],
            )
            # SIGTERM to listen alone: py-spy writes its file once its child exited.
            for pid in process.children():
                subprocess.run(["kill", "-TERM", str(pid)], check=False)
            wait_for(lambda: not process.alive(), 60.0, "py-spy to write its samples")
        finally:
            ctx.processes.stop(process)
    if not out.exists():
        raise BenchmarkError(f"py-spy wrote nothing:\n{process.log_tail()}")
    return out


def py_spy_table(path: Path) -> list[tuple[str, float, float]]:
    """(innermost pgpubsub frame with its line, share of the per-message path's samples, share
    of those in the driver: below a Django execute or commit, or with no Python frame below
    the pgpubsub one, as when it calls the driver's cursor itself) from py-spy's collapsed
    stacks. The per-message path is every sample with a frame of pgpubsub/processing.py."""
    by_frame: dict[str, list[int]] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if "pgpubsub/processing.py" not in stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        index = max((i for i, f in enumerate(frames) if "pgpubsub/" in f), default=-1)
        inner = frames[index]
        name = inner.split(" (")[0] + " (" + inner.split("pgpubsub/")[-1].rstrip(")") + ")"
        entry = by_frame.setdefault(name, [0, 0])
        entry[0] += count
        below = frames[index + 1 :]
        in_driver = not below or any(
            ("django/db/backends/utils.py" in f and "_execute" in f)
            or ("django/db/backends/base/base.py" in f and "_commit" in f)
            for f in below
        )
        entry[1] += count if in_driver else 0
    return sorted(
        ((name, n / total, leaf / n) for name, (n, leaf) in by_frame.items()),
        key=lambda item: -item[1],
    )


def report(args, rates: list[float], sql: dict, prof: dict, spy: Path | None) -> str:
    rows = args.rows
    per_message = 1e6 / statistics.median(rates)
    lines = [
        f"# Where the time goes per message: no-op lockable drain ({args.kind})",
        "",
        f"- command: `python -m benchmarks.profiling {' '.join(sys.argv[1:])}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- pgpubsub: working tree at {git_revision()}",
        f"- N = {rows:,} stored rows, `listen --recover`, one process, default threads",
        f"- unprofiled: {', '.join(f'{r:,.0f}' for r in rates)} msgs/s, median "
        f"{per_message:,.0f} µs per message",
        "",
    ]
    drain = sql["last"] - sql["first"]
    sql_total = sum(seconds for _, seconds in sql["statements"].values())
    sql_us = 1e6 * sql_total / rows
    timed = 1e6 * drain / rows
    lines += [
        f"## SQL of the worker threads (pass 2: {timed:,.0f} µs per message with timing on)",
        "",
        "| statement | per message | µs per message | µs each |",
        "|---|---|---|---|",
    ]
    for kind, (count, seconds) in sorted(sql["statements"].items(), key=lambda kv: -kv[1][1]):
        lines.append(
            f"| {kind} | {count / rows:.3f} | {1e6 * seconds / rows:,.1f} | "
            f"{1e6 * seconds / count:,.1f} |"
        )
    statements = sum(count for count, _ in sql["statements"].values())
    lines += [
        f"| **all** | {statements / rows:.3f} | {sql_us:,.1f} | |",
        "",
        f"Outside SQL (Python in the worker, the hand-offs): {timed - sql_us:,.0f} µs per message.",
        "",
    ]
    stats = pstats.Stats(prof["prof"])
    groups: dict[str, float] = {}
    for function, (_, _, tottime, _, _) in stats.stats.items():
        group = group_of(function)
        groups[group] = groups.get(group, 0.0) + tottime
    busy = sum(t for g, t in groups.items() if g not in IDLE_GROUPS)
    python = sum(t for g, t in groups.items() if g not in IDLE_GROUPS and not g.startswith("SQL"))
    lines += [
        "## The worker threads' own time by group (pass 3, cProfile)",
        "",
        f"cProfile: {1e6 * busy / rows:,.0f} µs per message busy in the worker threads "
        f"(threads: {', '.join(f'{k} {v:.2f} s' for k, v in sorted(prof['thread_seconds'].items()))}). "
        "Self time of each function, by group; the last column spreads pass 2's time outside "
        "SQL over the Python groups in cProfile's proportions.",
        "",
        "| group | µs per message (cProfile) | share of busy | µs per message, scaled |",
        "|---|---|---|---|",
    ]
    outside = timed - sql_us
    for group, seconds in sorted(groups.items(), key=lambda kv: -kv[1]):
        if group in IDLE_GROUPS:
            scaled = "(waiting)"
        elif group.startswith("SQL"):
            scaled = f"{sql_us:,.1f} (pass 2)"
        else:
            scaled = f"{outside * seconds / python:,.1f}"
        share = "—" if group in IDLE_GROUPS else f"{seconds / busy:.0%}"
        lines.append(f"| {group} | {1e6 * seconds / rows:,.1f} | {share} | {scaled} |")
    for title, key in (("cumulative", "cumulative"), ("self", "tottime")):
        lines += [
            "",
            f"### Top {args.top} functions by {title} time (worker threads, cProfile)",
            "",
            "| function | calls per message | self µs/msg | cumulative µs/msg |",
            "|---|---|---|---|",
        ]
        ordered = sorted(
            stats.stats.items(), key=lambda kv: -kv[1][3 if key == "cumulative" else 2]
        )
        for function, (_, ncalls, tottime, cumtime, _) in ordered[: args.top]:
            lines.append(
                f"| `{short(function)}` | {ncalls / rows:.2f} | {1e6 * tottime / rows:,.1f} | "
                f"{1e6 * cumtime / rows:,.1f} |"
            )
    if spy is not None:
        lines += [
            "",
            "## py-spy: wall-clock samples of the per-message path by innermost pgpubsub "
            "frame (pass 4)",
            "",
            "| innermost pgpubsub frame (line) | share of samples | of which in the driver "
            "(a Django execute/commit or no Python frame below) |",
            "|---|---|---|",
        ]
        for name, share, in_sql in py_spy_table(spy)[: args.top]:
            lines.append(f"| `{name}` | {share:.1%} | {in_sql:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profiling", description=__doc__)
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--rows", type=int, default=10000, help="N stored rows (10,000).")
    parser.add_argument(
        "--kind",
        choices=("job", "row"),
        default="job",
        help="job: notify() rows (workload 29); row: trigger rows (workload 30).",
    )
    parser.add_argument("--repeat", type=int, default=3, help="Unprofiled runs (3).")
    parser.add_argument("--top", type=int, default=25, help="Functions listed (25).")
    parser.add_argument("--py-spy", action="store_true", help="Also sample with py-spy.")
    parser.add_argument("--output", type=Path, help="Also write the report (Markdown).")
    parser.add_argument("--keep-temp", action="store_true")
    args = parser.parse_args(argv)
    server = Server.from_url(args.database_url)
    workdir = Path(tempfile.mkdtemp(prefix="pgpubsub-profile-"))
    (workdir / "logs").mkdir()
    processes = Processes(workdir / "logs")
    databases = Databases(server)
    try:
        side = Side("ours", sys.executable, workdir / "ours", str(ROOT))
        log("preparing ours")
        prepare_side(side, server, databases, processes)
        if side.versions.get("driver") != "psycopg2":
            raise BenchmarkError("the SQL timing pass needs psycopg2 (Django uses psycopg 3)")
        sizes = Sizes(0, 0, 0.0, 100, 0, 1.0, 1.0, noop_rows=args.rows)
        ctx = Context(server, databases, processes, sizes, {"ours": side})
        rates = []
        for n in range(args.repeat):
            rates.append(noop_drain(ctx, side, Engine(), args.kind)["rate"])
            log(f"unprofiled run {n + 1}: {rates[-1]:,.0f} msgs/s")
        sql = run_wrapped(ctx, side, args.kind, "sql", workdir)
        log("SQL timing pass done")
        prof = run_wrapped(ctx, side, args.kind, "cprofile", workdir)
        log("cProfile pass done")
        spy = py_spy_drain(ctx, side, args.kind, workdir) if args.py_spy else None
        text = report(args, rates, sql, prof, spy)
        print(text)
        if args.output:
            args.output.write_text(text)
            shutil.copy(prof["prof"], args.output.with_suffix(".prof"))
            log(f"wrote {args.output} and {args.output.with_suffix('.prof')}")
        return 0
    except BenchmarkError as exc:
        log(f"error: {exc}")
        args.keep_temp = True
        return 1
    finally:
        processes.stop_all()
        databases.drop_all()
        if args.keep_temp:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
