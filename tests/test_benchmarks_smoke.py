"""The benchmark runner works end to end (correctness of the harness, not timings): a quick run of
``python -m benchmarks`` on this checkout only, against the test server."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.workloads import WORKLOADS

ROOT = Path(__file__).resolve().parent.parent


def run_benchmarks(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(300)
def test_quick_run_measures_every_workload(tmp_path):
    output = tmp_path / "results.json"
    result = run_benchmarks(
        "--quick",
        "--skip-theirs",
        "--repeat",
        "1",
        "--backlog",
        "300",  # the backlog workloads run only when given a size with --quick
        "--database-url",
        os.environ["DATABASE_URL"],
        "--output",
        str(output),
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| # | workload | metric | ours median")
    for workload in WORKLOADS:
        rows = [line for line in table if line.startswith(f"| {workload.number} | ")]
        assert len(rows) == len(workload.metrics), (workload.name, result.stdout)
        for row in rows:
            ours = row.split(" | ")[3]
            assert ours != "—", (workload.name, row)
    assert "Errors:" not in result.stdout
    assert "lockable channels published with `notify()` are never processed" in result.stdout

    report = json.loads(output.read_text())
    assert report["errors"] == []
    rates = {row["name"]: row["ours"]["median"] for row in report["rows"] if row["key"] == "rate"}
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
    summary = "\n".join(report["summary"])
    for title in ("share of the hand-written ceiling", "Scaling, `--processes 2`", "Backlog, B"):
        assert title in summary, summary
    assert any(note.startswith("Idle CPU") for note in report["notes"]), report["notes"]
    assert report["sides"]["ours"]["pgpubsub from"] == str(ROOT / "pgpubsub" / "__init__.py")


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
    ],
)
def test_rejects_bad_options(args, message):
    result = run_benchmarks(*args, "--skip-theirs")
    assert result.returncode == 2
    assert message in result.stderr
