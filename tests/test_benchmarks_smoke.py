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


@pytest.mark.timeout(300)
def test_quick_run_measures_every_workload(tmp_path):
    output = tmp_path / "results.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--skip-theirs",
            "--repeat",
            "1",
            "--database-url",
            os.environ["DATABASE_URL"],
            "--output",
            str(output),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
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
    assert set(rates) == {"drain", "one-per-tx", "notify", "plain", "ceiling"}
    assert all(rate > 0 for rate in rates.values()), rates
    assert report["sides"]["ours"]["pgpubsub from"] == str(ROOT / "pgpubsub" / "__init__.py")


def test_rejects_an_unknown_workload():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "1,nosuch", "--skip-theirs"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "unknown workload(s) nosuch" in result.stderr
