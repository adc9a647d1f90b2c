"""The benchmark runner works end to end (correctness of the harness, not timings): one quick run
of ``python -m benchmarks`` with every workload, on this checkout only, against the test server,
checked by the tests of this module."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks.harness import BenchmarkError, Processes, Side, ensure_psycopg3_venv
from benchmarks.runner import DEFAULT_VENV_DIR, PSYCOPG3_VENV_NAME, measure, parse_args
from benchmarks.workloads import EMBEDDED, GROUPS, WORKLOADS, Workload, select

ROOT = Path(__file__).resolve().parent.parent
#: The workloads of ``listen`` with one thread (1-12), and the newer ones: ``--threads`` and
#: ``--processes`` scaling and the embedded Runtime under gunicorn (13-28), the library's cost
#: per message against hand-written loops and the writers' commits/s (29-34), and delivery
#: without NOTIFY in the writer's transaction: latency, burst, idle watcher, sessions (35-38), and
#: Django's tasks on pgpubsub against django-tasks-db (39-41).
BASE = [w for w in WORKLOADS if w.number <= 12]
SCALING_AND_EMBEDDED = [w for w in WORKLOADS if 12 < w.number <= 28]
#: The options of the quick run (sizes as small as they go while every workload still measures).
QUICK_OPTIONS = [
    "--quick",
    "--skip-theirs",
    "--repeat",
    "1",
    "--events",
    "50",
    "--messages",
    "50",
    "--idle-seconds",
    "0.5",
    "--paced-seconds",
    "0.5",
    "--web-seconds",
    "0.5",
    "--backlog",
    "300",  # the backlog workloads run only when given a size with --quick
    "--noop-rows",
    "50",
    "--writers",
    "1,2",
    "--writer-seconds",
    "0.3",
    "--burst-writers",
    "4",
    "--burst-seconds",
    "0.3",
    "--watch-seconds",
    "1",
    "--idle-connection-timeout",
    "1",
    "--tasks",
    "20",
    "--task-enqueues",
    "20",
    "--skip-tasks-db",  # django-tasks-db's side: test_tasks_group_measures_django_tasks_db
]


def run_benchmarks(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Every workload once, at tiny sizes: its output, log and JSON report."""
    output = tmp_path_factory.mktemp("bench") / "results.json"
    result = run_benchmarks(
        *QUICK_OPTIONS,
        "--database-url",
        os.environ["DATABASE_URL"],
        "--output",
        str(output),
        timeout=280,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return SimpleNamespace(
        stdout=result.stdout, stderr=result.stderr, report=json.loads(output.read_text())
    )


def assert_table_rows(stdout: str, workloads) -> None:
    """Every metric of every workload has a row in the main table, with a value for this
    checkout (but for the writers' column of django-pgpubsub 1.3.1, not run here)."""
    lines = stdout.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith("| "))
    table = [
        line
        for line in itertools.takewhile(lambda line: line.startswith("|"), lines[start:])
        if line.startswith("| ")
    ]
    assert table[0].startswith("| # | workload | metric | ours median")
    for workload in workloads:
        rows = [line for line in table if line.startswith(f"| {workload.number} | ")]
        assert len(rows) == len(workload.metrics), (workload.name, stdout)
        for row, metric in zip(rows, workload.metrics, strict=True):
            ours = row.split(" | ")[3]
            assert (ours == "—") == metric.key.startswith("theirs_"), (workload.name, row)


@pytest.mark.timeout(300)
def test_quick_run_measures_every_workload(quick_run):
    assert_table_rows(quick_run.stdout, BASE)
    assert "Errors:" not in quick_run.stdout
    assert "lockable channels published with `notify()` are never processed" in quick_run.stdout

    report = quick_run.report
    assert report["errors"] == []
    rates = {
        row["name"]: row["ours"]["median"]
        for row in report["rows"]
        if row["key"] == "rate" and row["workload"] <= 12
    }
    assert set(rates) == {
        "drain",
        "one-per-tx",
        "notify",
        "plain",
        "ceiling",
        "bulk",
        "drain-2p",
        "one-per-tx-2p",
        "backlog",
        "bulk-backlog",
    }
    assert all(rate > 0 for rate in rates.values()), rates
    latencies = {
        row["key"]: row["ours"]["median"] for row in report["rows"] if row["workload"] == 8
    }
    assert set(latencies) == {"trigger_p50_ms", "trigger_p99_ms", "plain_p50_ms", "plain_p99_ms"}
    assert all(0 < value < 60_000 for value in latencies.values()), latencies
    idle = {row["key"]: row["ours"]["median"] for row in report["rows"] if row["name"] == "idle"}
    assert idle["processes"] == 1 and idle["rss_mb"] > 0 and idle["cpu_ms_per_s"] >= 0, idle
    assert report["sizes"]["B (backlog)"] == 300
    assert report["sizes"]["K (events)"] == 50
    summary = "\n".join(report["summary"])
    for title in ("share of the hand-written ceiling", "Scaling, `--processes 2`", "Backlog, B"):
        assert title in summary, summary
    assert any(note.startswith("Idle CPU") for note in report["notes"]), report["notes"]
    assert report["sides"]["ours"]["pgpubsub from"] == str(ROOT / "pgpubsub" / "__init__.py")


@pytest.mark.timeout(300)
def test_quick_run_measures_threads_processes_and_embedded(quick_run):
    """Workloads 13-28: ``listen --threads``/``--processes`` and gunicorn with the embedded
    Runtime, and the tables that put them side by side."""
    assert_table_rows(quick_run.stdout, SCALING_AND_EMBEDDED)
    # The runs said which engine they used.
    assert "27. broadcast-emb [ours] with gunicorn, 2 sync workers" in quick_run.stderr
    assert "17. one-per-tx-t4 [ours] with `listen --threads 4`" in quick_run.stderr
    assert "15. drain-2p-t2 [ours] with `listen --processes 2 --threads 2`" in quick_run.stderr
    assert "workload 1 with `listen --recover --processes 2 --threads 2`" in quick_run.stdout

    report = quick_run.report
    assert report["sides"]["ours"]["gunicorn"], report["sides"]
    assert any(note.startswith("Embedded workloads") for note in report["notes"])
    assert any("no `--threads` option" in note for note in report["notes"])
    rows = {(row["name"], row["key"]): row for row in report["rows"]}
    # The broadcast reached both web workers (the run checks that each received every message
    # once): twice as many callbacks as messages.
    broadcast = rows[("broadcast-emb", "rate")]["ours"]["median"]
    callbacks = rows[("broadcast-emb", "delivery_rate")]["ours"]["median"]
    assert broadcast > 0 and abs(callbacks - 2 * broadcast) < 1e-6 * callbacks, rows

    scaling = {row["title"]: row["cells"] for row in report["scaling"]["rows"]}
    assert list(scaling) == [
        "`listen` (1 process, 1 thread)",
        "`listen --threads 2`",
        "`listen --threads 4`",
        "`listen --processes 2`",
        "`listen --processes 2 --threads 2`",
        "embedded: gunicorn, 2 workers × 2 threads",
    ]
    most_threads = [1, 2, 4, 2, 4, 4]
    for (title, cells), most in zip(scaling.items(), most_threads, strict=True):
        rates, threads = cells[0::2], cells[1::2]  # drain, one-per-tx, bulk
        assert all(cell["median"] > 0 for cell in rates), (title, cells)
        # At least one thread took part, at most every thread of every process.
        assert all(1 <= cell["median"] <= most for cell in threads), (title, cells)
    comparison = report["comparison"]
    assert comparison["columns"][:3] == [
        "embedded (gunicorn, 2 workers × 2 threads)",
        "`listen --threads 1`",
        "`listen --threads 2`",
    ]
    assert len(comparison["rows"]) == 9
    for row in comparison["rows"]:
        assert all(cell is not None for cell in row["cells"][:3]), row
        assert row["cells"][3:] == [None, None], row  # no 1.3.1 without it
    for heading in ("Scaling of this checkout", "Embedded vs `listen` on the example workloads"):
        assert heading in quick_run.stdout


@pytest.mark.timeout(300)
def test_quick_run_measures_the_cost_per_message_and_the_writers(quick_run):
    """Workloads 29-34 (issues 15 and 16): the no-op drains beside the raw drain of the same
    rows, the ORM loop, plain messages to a no-op listener, the writers' commits/s; and each
    target printed beside its measurement."""
    sized = [w for w in parse_args(QUICK_OPTIONS).workloads if 28 < w.number <= 34]
    assert [w.name for w in sized] == [
        "noop-drain",
        "trigger-noop-drain",
        "raw-drain",
        "orm-loop",
        "ping",
        "writers",
    ]
    assert_table_rows(quick_run.stdout, sized)
    report = quick_run.report
    rows = {(row["name"], row["key"]): row["ours"] for row in report["rows"]}
    for name, key in (
        ("noop-drain", "rate"),
        ("trigger-noop-drain", "rate"),
        ("raw-drain", "rate"),
        ("raw-drain", "trigger_rate"),
        ("orm-loop", "processing_rate"),
        ("ping", "rate"),
        ("ping", "send_rate"),
    ):
        assert rows[name, key]["median"] > 0, (name, key, rows)
    assert 0 < rows["ping", "p50_ms"]["median"] <= rows["ping", "p99_ms"]["median"] < 60_000
    # Writers: (a), (b), (b') and (d) at 1 and 2 connections, and (b), (b'), (d) as shares of
    # (a); (c) needs django-pgpubsub 1.3.1 (--skip-theirs).
    for n in (1, 2):
        for key in ("plain", "trigger", "notify", "stored"):
            assert rows["writers", f"{key}_c{n}"]["median"] > 0, rows
        for key in ("trigger", "notify", "stored"):
            ratio = rows["writers", f"{key}_ratio_c{n}"]["median"]
            assert 0 < ratio < 10, rows
        assert rows["writers", f"theirs_c{n}"] is None
    assert "34. writers [ours]\n" in quick_run.stderr  # no listener to name

    def target(start: str) -> dict:
        (found,) = [t for t in report["targets"] if t["target"].startswith(start)]
        return found

    noop = target("no-op lockable drain ≥ 50% of the raw drain")
    assert noop["measured"].endswith("msgs/s)") and noop["verdict"] in ("met", "not met"), noop
    writer = target("16 writers into a model with a lockable trigger channel: (b)/(a) ≥ 0.70")
    assert "the target is at 16 writers" in writer["measured"], writer
    assert writer["verdict"] == "not met", writer
    assert "Targets of issues 15 and 16, measured in this run" in quick_run.stdout
    assert "- issue 16: no-op lockable drain ≥ 50% of the raw drain (29 / 31): " in quick_run.stdout
    assert "Writers' commits/s, one INSERT per transaction" in quick_run.stdout
    summary = "\n".join(report["summary"])
    assert "No-op drains as a share of the raw drain" in summary, summary
    assert report["sizes"]["N (no-op rows)"] == 50 and report["sizes"]["writers"] == "1,2"
    assert report["sides"]["ours"]["driver"] in ("psycopg2", "psycopg 3")


@pytest.mark.timeout(300)
def test_quick_run_measures_delivery_without_notify_on_write(quick_run):
    """Workloads 35-38 (issue 15): paced latency with per-write NOTIFY, a burst of writers
    while `listen` runs (every row exactly once), the idle cost of a deployment of 4 Runtimes
    with its elected watcher, the sessions of 8 idle embedded gunicorn workers; each target of
    issue 15 printed beside its measurement."""
    sized = [w for w in parse_args(QUICK_OPTIONS).workloads if 34 < w.number <= 38]
    assert [w.name for w in sized] == ["latency-on-write", "burst", "watcher-idle", "sessions-emb"]
    assert_table_rows(quick_run.stdout, sized)
    assert "38. sessions-emb [ours] with gunicorn, 8 sync workers" in quick_run.stderr
    report = quick_run.report
    rows = {
        (row["name"], row["key"]): row["ours"]["median"] for row in report["rows"] if row["ours"]
    }
    assert (
        0
        < rows["latency-on-write", "trigger_p50_ms"]
        <= rows["latency-on-write", "trigger_p99_ms"]
        < 60_000
    ), rows
    # The burst: rows written by 4 writers, every one processed (the run checks exactly once),
    # and the listeners woken by the watcher (the writers sent no NOTIFY).
    assert rows["burst", "rows"] > 0 and rows["burst", "write_rate"] > 0, rows
    assert 0 < rows["burst", "p50_ms"] <= rows["burst", "p99_ms"], rows
    assert rows["burst", "wakeups"] >= 1, rows
    # One of the 4 Runtimes watches; the others only listen.
    assert rows["watcher-idle", "watchers"] == 1, rows
    assert rows["watcher-idle", "queries_per_s"] > 0, rows
    assert (
        0 <= rows["watcher-idle", "cpu_median_ms_per_s"] <= rows["watcher-idle", "cpu_max_ms_per_s"]
    ), rows
    # Each of the 8 web workers holds at least its LISTEN session.
    for key in ("start_sessions", "busy_sessions", "idle_sessions"):
        assert rows["sessions-emb", key] >= 8, (key, rows)
    assert rows["sessions-emb", "busy_sessions"] >= rows["sessions-emb", "idle_sessions"], rows
    issue15 = [t["target"] for t in report["targets"] if t["issue"] == 15]
    assert len(issue15) == 5, issue15
    assert all(t["verdict"] in ("met", "not met") for t in report["targets"] if t["issue"] == 15)
    assert "- issue 15: watcher idle cost in a deployment of 4 Runtimes" in quick_run.stdout
    assert "(b') the same with per-write NOTIFY" in quick_run.stdout
    assert report["sizes"]["idle connection timeout (38)"] == 1


@pytest.mark.timeout(300)
def test_quick_run_measures_what_the_runtime_adds_to_a_web_worker(quick_run):
    """Workload 28: gunicorn with PGPUBSUB_EMBEDDED off, then on; each worker's RSS, CPU,
    wake-ups, threads and sessions, idle and serving requests, next to the idle listeners of
    workload 5."""
    assert "28. web-emb [ours] with gunicorn, 2 sync workers" in quick_run.stderr
    report = quick_run.report
    web = {row["key"]: row["ours"]["median"] for row in report["rows"] if row["name"] == "web-emb"}
    # Off: a sync worker is one thread and holds no connection while idle (CONN_MAX_AGE = 0).
    assert web["off_threads"] == 1 and web["off_sessions"] == 0, web
    # On: the listener thread and PGPUBSUB_WORKERS (2) worker threads; one listening connection
    # and at most one per worker thread.
    assert web["on_threads"] == 4, web
    assert 1 < web["on_sessions"] <= 3, web
    # The issue's target: the Runtime adds at most 15 MB to a web process.
    assert 0 < web["off_rss_mb"] and 0 < web["on_rss_mb"], web
    assert abs(web["added_rss_mb"] - (web["on_rss_mb"] - web["off_rss_mb"])) < 1e-9, web
    assert web["added_rss_mb"] < 15, web
    for key in ("off_cpu_ms_per_s", "on_cpu_ms_per_s", "off_wakeups_per_s", "on_wakeups_per_s"):
        assert web[key] >= 0, (key, web)
    for mode in ("off", "on"):
        assert web[f"{mode}_serve_cpu_ms_per_s"] > 0, web  # the requests were served
        assert 0 < web[f"{mode}_req_p50_ms"] <= web[f"{mode}_req_p99_ms"] < 30_000, web

    table = report["web"]
    assert table["columns"] == [
        "gunicorn worker, Runtime off",
        "gunicorn worker, Runtime on",
        "added by the Runtime",
        "`listen` (workload 5)",
        "1.3.1 `listen` (workload 5)",
    ]
    rows = {row["title"]: row["cells"] for row in table["rows"]}
    idle_cpu = rows["idle CPU (ms/s)"]
    assert [cell is not None for cell in idle_cpu] == [True, True, True, True, False], idle_cpu
    assert idle_cpu[2]["median"] == web["added_cpu_ms_per_s"]
    assert "What the embedded Runtime adds to a gunicorn worker" in quick_run.stdout
    summary = "\n".join(report["summary"])
    assert "The embedded Runtime adds" in summary and "an idle `listen`" in summary, summary
    assert any(note.startswith("Workload 28 starts gunicorn") for note in report["notes"])
    assert report["sizes"]["web seconds"] == 0.5


#: The metrics of workloads 39-41 that need django-tasks-db's side.
TASKS_DB_KEYS = {
    ("task-drain", "db_rate"),
    ("task-drain", "db_from_start"),
    ("task-drain", "ratio"),
    ("task-latency", "db_p50_ms"),
    ("task-latency", "db_p99_ms"),
    ("task-enqueue", "db_enqueue_us"),
    ("task-enqueue", "db_enqueue_tx_us"),
}


def task_rows(report: dict) -> dict:
    return {
        (row["name"], row["key"]): row["ours"] and row["ours"]["median"]
        for row in report["rows"]
        if row["workload"] in (39, 40, 41)
    }


@pytest.mark.timeout(300)
def test_quick_run_measures_tasks_without_django_tasks_db(quick_run):
    """Workloads 39-41 with ``--skip-tasks-db``: this checkout's tasks backend alone (no-op
    tasks drained by ``listen``, enqueue-to-start latency, enqueue cost against a lockable
    ``notify()``); django-tasks-db's metrics stay empty, and no venv is made for it."""
    rows = task_rows(quick_run.report)
    assert len(rows) == 17, rows
    for key, value in rows.items():
        assert (value is None) == (key in TASKS_DB_KEYS), (key, rows)
    assert rows["task-drain", "rate"] > 0 and rows["task-drain", "from_start"] > 0, rows
    assert 0 < rows["task-latency", "p50_ms"] <= rows["task-latency", "p99_ms"] < 60_000, rows
    enqueue, notify = rows["task-enqueue", "enqueue_us"], rows["task-enqueue", "notify_us"]
    assert 0 < enqueue < rows["task-enqueue", "enqueue_tx_us"], rows
    assert abs(rows["task-enqueue", "ratio"] - enqueue / notify) < 1e-9, rows
    assert "preparing django-tasks-db" not in quick_run.stderr
    assert "tasks-db" not in quick_run.report["sides"]
    targets = {t["target"].split(":")[0]: t for t in quick_run.report["task_targets"]}
    drain = targets["no-op tasks, one `listen` process"]
    assert "django-tasks-db not measured" in drain["measured"], drain
    assert drain["verdict"] == "not met", drain
    assert len(targets) == 4, targets  # 29 ran too: the comparison with lockable channels
    assert "Targets of the tasks backend (workloads 29, 39-41)" in quick_run.stdout


@pytest.mark.timeout(300)
def test_tasks_group_measures_django_tasks_db(tmp_path):
    """``--only tasks``: each run of 39-41 measures django-tasks-db (its venv made once from
    PyPI, ``db_worker``) beside this checkout, and the report judges the tasks targets."""
    output = tmp_path / "results.json"
    result = run_benchmarks(
        *["--quick", "--skip-theirs", "--repeat", "1", "--only", "tasks"],
        *["--noop-rows", "50", "--tasks", "20", "--task-enqueues", "20"],
        *["--paced-seconds", "0.5", "--database-url", os.environ["DATABASE_URL"]],
        *["--output", str(output)],
        timeout=280,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(output.read_text())
    versions = report["sides"]["tasks-db"]
    assert versions["django-tasks-db"] and versions["django"].startswith("5.2"), versions
    rows = task_rows(report)
    assert all(value is not None and value > 0 for value in rows.values()), rows
    assert 0 < rows["task-latency", "db_p50_ms"] <= rows["task-latency", "db_p99_ms"], rows
    ratio = rows["task-drain", "rate"] / rows["task-drain", "db_rate"]
    assert abs(rows["task-drain", "ratio"] - ratio) < 1e-9, rows
    assert [t["verdict"] in ("met", "not met") for t in report["task_targets"]] == [True] * 4
    assert "39. task-drain [ours] with `listen`" in result.stderr
    assert "django-tasks-db (0." in result.stdout  # the notes name its version


def test_a_workload_of_this_checkout_only_runs_without_the_other_side():
    """1.3.1 has no embedded mode: workload 28 never runs for it, even when it is measured."""
    runs = []
    workload = Workload(
        99,
        "recorded",
        "records its runs",
        (),
        lambda ctx, side, engine: runs.append(side.name) or {},
        EMBEDDED,
        ours_only=True,
    )
    sides = [Side("ours", sys.executable, ROOT, None), Side("theirs", sys.executable, ROOT, None)]
    results = measure(None, [workload], sides, repeat=2)
    assert runs == ["ours", "ours"]
    assert results["recorded"] == {"errors": [], "ours": [{}, {}]}
    assert select("web-emb")[0].ours_only


def test_the_psycopg3_side_runs_what_ours_runs_in_alternating_order():
    """With ``--psycopg3``, the third side runs every workload ours runs, this checkout's only
    ones too, but not those that time no side's driver; the sides' order reverses from one
    repetition to the next."""
    runs = []

    def workload(name: str, **options) -> Workload:
        return Workload(
            99,
            name,
            name,
            (),
            lambda ctx, side, engine: runs.append((name, side.name)) or {},
            **options,
        )

    workloads = [
        workload("both"),
        workload("checkout-only", ours_only=True),
        workload("driver-free", ours_only=True, listens=False, driver_free=True),
    ]
    sides = [
        Side("ours", sys.executable, ROOT, None),
        Side("ours-psycopg3", sys.executable, ROOT, None),
        Side("theirs", sys.executable, ROOT, None),
    ]
    results = measure(None, workloads, sides, repeat=2)
    assert runs == [
        ("both", "ours"),
        ("both", "ours-psycopg3"),
        ("both", "theirs"),
        ("checkout-only", "ours"),
        ("checkout-only", "ours-psycopg3"),
        ("driver-free", "ours"),
        ("both", "theirs"),
        ("both", "ours-psycopg3"),
        ("both", "ours"),
        ("checkout-only", "ours-psycopg3"),
        ("checkout-only", "ours"),
        ("driver-free", "ours"),
    ]
    assert set(results["checkout-only"]) == {"errors", "ours", "ours-psycopg3"}
    assert [w.name for w in WORKLOADS if w.driver_free] == ["raw-drain", "writers"]
    assert not parse_args(["--skip-theirs"]).psycopg3  # the default run has two sides


@pytest.fixture(scope="module")
def psycopg3_venv(tmp_path_factory) -> str:
    """The venv of ``--psycopg3`` (this checkout, editable, with psycopg 3), made once and
    reused; the test fails when it cannot be made (it needs PyPI the first time)."""
    venv = DEFAULT_VENV_DIR.parent / PSYCOPG3_VENV_NAME
    try:
        return ensure_psycopg3_venv(venv, Processes(tmp_path_factory.mktemp("venv-logs")))
    except (BenchmarkError, OSError) as error:
        pytest.fail(f"Could not make {venv} (it needs PyPI the first time):\n{error}", False)


@pytest.mark.timeout(300)
def test_psycopg3_option_measures_this_checkout_with_each_driver(psycopg3_venv, tmp_path):
    """``--psycopg3``: this checkout runs a workload on its own venv with psycopg 3 and no
    psycopg2, in the same run as ours; the report compares the two drivers and judges the
    target of issue 16."""
    output = tmp_path / "results.json"
    result = run_benchmarks(
        *["--quick", "--skip-theirs", "--repeat", "1", "--only", "plain", "--psycopg3"],
        *["--database-url", os.environ["DATABASE_URL"], "--output", str(output)],
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4. plain [ours-psycopg3] with `listen`" in result.stderr
    report = json.loads(output.read_text())
    versions = report["sides"]["ours-psycopg3"]
    assert versions["driver"] == "psycopg 3" and "psycopg2-binary" not in versions, versions
    assert versions["pgpubsub from"] == str(ROOT / "pgpubsub" / "__init__.py")
    assert report["sides"]["ours"]["pgpubsub from"] == versions["pgpubsub from"]
    # The main table keeps ours against theirs; the drivers' table has both of this checkout.
    assert_table_rows(result.stdout, select("plain"))
    drivers = {row["metric"]: row for row in report["drivers"]["rows"]}
    assert list(drivers) == ["throughput", "latency p50", "latency p99"]
    for row in drivers.values():
        assert row["psycopg2"]["median"] > 0 and row["psycopg 3"]["median"] > 0, row
        assert row["ratio"] == row["psycopg 3"]["median"] / row["psycopg2"]["median"], row
    throughput = drivers["throughput"]
    assert throughput["speed"] == "throughput" and throughput["met"] == (throughput["ratio"] >= 1)
    p99 = drivers["latency p99"]
    assert p99["speed"] == "time" and p99["met"] == (p99["ratio"] <= 1)
    assert "psycopg 3 vs psycopg2: this checkout with each driver" in result.stdout
    (target,) = [t for t in report["targets"] if t["target"].startswith("psycopg 3 at least")]
    if report["sides"]["ours"]["driver"] == "psycopg2":
        assert target["measured"].startswith("psycopg 3 / psycopg2, medians ("), target
        assert "4 plain throughput " in target["measured"], target
        assert target["verdict"] == (
            "met" if all(r["met"] for r in drivers.values()) else "not met"
        )
    else:  # the runner's Python has psycopg too: ours ran psycopg 3 as well
        assert target["verdict"] == "not judged here", target
    assert f"- issue 16: {target['target']}: {target['measured']}" in result.stdout


def test_groups_select_workloads():
    assert [w.name for w in select("embedded")] == [
        "drain-emb",
        "one-per-tx-emb",
        "bulk-emb",
        "broadcast-emb",
        "web-emb",
    ]
    assert {w.number for w in select("scaling")} == {1, 2, 7, 9, 10} | set(range(13, 23))
    assert [w.number for w in select("2,compare")] == [2, 4, 7, 16, 19, 23, 25, 26, 27]
    assert [w.number for w in select("per-message")] == [1, 4, 29, 30, 31, 32, 33]
    assert [w.number for w in select("issue15")] == [8, 34, 35, 36, 37, 38]
    assert [w.number for w in select("tasks")] == [29, 39, 40, 41]
    assert set(GROUPS) == {"scaling", "embedded", "compare", "per-message", "issue15", "tasks"}


def test_quick_run_skips_the_backlog_workloads_without_a_size():
    result = run_benchmarks(
        "--quick",
        "--skip-theirs",
        "--only",
        "backlog,bulk-backlog",
        "--database-url",
        os.environ["DATABASE_URL"],
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipping 11. backlog" in result.stderr
    assert "skipping 12. bulk-backlog" in result.stderr
    assert not [line for line in result.stdout.splitlines() if line.startswith("| 1")]
    assert "B (backlog) not run" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--only", "1,nosuch"], "unknown workload(s) nosuch"),
        (["--rate", "0"], "--rate must be positive"),
        (["--backlog", "1"], "--backlog must be at least 2"),
        (["--writers", "1,0"], "--writers must be a comma-separated list of positive numbers"),
        (["--noop-rows", "1"], "--noop-rows must be at least 2"),
        (["--burst-writers", "0"], "--burst-writers must be at least 1"),
        (["--watch-seconds", "0"], "--watch-seconds must be positive"),
        (["--task-rate", "0"], "--task-rate must be positive"),
        (["--tasks", "1"], "--tasks must be at least 2"),
    ],
)
def test_rejects_bad_options(args, message):
    result = run_benchmarks(*args, "--skip-theirs")
    assert result.returncode == 2
    assert message in result.stderr
