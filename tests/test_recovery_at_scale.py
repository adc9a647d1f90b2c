"""Acceptance test of recovery at scale: ``manage.py listen --recover`` over 100,000 stored
rows runs in bounded memory, commits as it goes (a kill midway keeps the progress) and reports
its progress."""

import json
import re
import signal
import time
from pathlib import Path

import pytest
from django.db import connection

from pgpubsub.models import Notification
from tests.processes import outputs, wait_for
from tests.testapp import channels
from tests.testapp.models import Effect

pytestmark = pytest.mark.django_db(transaction=True)

#: Stored rows of the backlog.
ROWS = 100_000
#: Characters of padding in each message: the backlog holds ~100 MB of payloads, so a
#: listener that loaded it whole would need far more memory than BOUND allows.
PADDING = 1024
#: Effects after which the first listener is killed (a good part of the backlog, not all).
KILL_AFTER = 15_000
#: Most the peak RSS of a listener may exceed its RSS once it listens, in kB.
BOUND = 60 * 1024
# SlowJob (with no pause) rather than Job: the Job listener also keeps every message it ran in
# a list of the listening process (``received``), which alone grows it by ~1.4 kB a message.
CHANNEL = channels.SlowJob

PROGRESS = re.compile(
    rf"Sweeping {re.escape(CHANNEL.name())}: (\d+) stored notifications processed so far "
    r"\(read up to id (\d+)\)"
)


def store_backlog() -> None:
    """ROWS stored messages, as ``SlowJob(key=...).serialize()`` would write them plus a
    ``padding`` field the channel does not declare (its listener never sees it), with no
    NOTIFY: only a recovery sweep finds them."""
    repeats = PADDING // 32  # an md5 hex digest has 32 characters
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {Notification._meta.db_table} (channel, payload) "
            "SELECT %s, jsonb_build_object('kwargs', jsonb_build_object("
            "'key', 'scale-' || i, 'seconds', 0.0, 'padding', repeat(md5(i::text), %s))) "
            "FROM generate_series(1, %s) AS i",
            [CHANNEL.listen_safe_name(), repeats, ROWS],
        )
        # No ANALYZE: a backlog that appears at once has no statistics (and autovacuum may be
        # off), and recovery must not depend on them.
    first = Notification.objects.order_by("pk").first()
    expected = json.loads(CHANNEL(key="scale-1").serialize())
    expected["kwargs"]["padding"] = "c4ca4238a0b923820dcc509a6f75849b" * repeats  # md5("1")
    assert first.payload == expected


def stored() -> int:
    return Notification.objects.filter(channel=CHANNEL.listen_safe_name()).count()


def effects() -> int:
    return Effect.objects.filter(key__startswith="scale-").count()


def processed_and_stored() -> int:
    """Stored rows whose message also has an effect (processed, yet not acknowledged)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT count(*) FROM {Notification._meta.db_table} AS n "
            f"JOIN {Effect._meta.db_table} AS e ON e.key = n.payload -> 'kwargs' ->> 'key'"
        )
        return cursor.fetchone()[0]


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a live process, in kB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return {
        name: int(re.search(rf"^{name}:\s+(\d+) kB$", status, re.MULTILINE).group(1))
        for name in ("VmRSS", "VmHWM")
    }


def progress(process) -> list[tuple[int, int]]:
    """(rows taken so far, up to id) of each progress line the process logged."""
    return [(int(count), int(last)) for count, last in PROGRESS.findall(process.output())]


def first_sweep(lines: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The progress lines up to the first whose count is lower than the one before (a new
    sweep's)."""
    for number in range(1, len(lines)):
        if lines[number][0] < lines[number - 1][0]:
            return lines[:number]
    return lines


def assert_increasing(lines: list[tuple[int, int]]) -> None:
    """Each line took more rows than the one before, further along the table."""
    counts, ids = [count for count, _ in lines], [last for _, last in lines]
    assert counts == sorted(set(counts)) and ids == sorted(set(ids)), lines


@pytest.mark.timeout(420)
def test_recover_a_large_backlog_in_bounded_memory_keeping_progress(processes):
    started = time.monotonic()
    store_backlog()
    assert stored() == ROWS
    print(f"stored {ROWS} rows in {time.monotonic() - started:.1f}s")

    # First listener: killed once a good part is done.
    first = processes.start("--recover", "--threads", "2", "--loglevel", "info")
    first_start = memory(first.pid)
    first_started = time.monotonic()
    wait_for(
        lambda: effects() >= KILL_AFTER,
        120,
        lambda: f"{KILL_AFTER} effects; have {effects()}",
        watch=[first],
    )
    first_peak = memory(first.pid)
    first.send(signal.SIGKILL)
    first.wait(10)
    first_seconds = time.monotonic() - first_started
    first.wait_no_backends(30)  # its open transaction is rolled back, its locks released
    # What committed stays committed, once: each message either has its effect or is stored.
    done, left = effects(), stored()
    print(f"killed after {first_seconds:.1f}s ({done / first_seconds:.0f}/s): {left} left")
    assert done >= KILL_AFTER and left > 0
    assert done + left == ROWS
    assert processed_and_stored() == 0
    first_lines = progress(first)
    assert first_lines, outputs([first])
    assert_increasing(first_lines)

    # Second listener: recovers the rest.
    second = processes.start("--recover", "--threads", "2", "--loglevel", "info")
    second_start = memory(second.pid)
    second_started = time.monotonic()
    # Counting the effects is cheap; the stored rows commit their deletion with them.
    wait_for(
        lambda: effects() == ROWS,
        240,
        lambda: f"{ROWS} effects; have {effects()}, and {stored()} stored rows",
        watch=[second],
    )
    second_seconds = time.monotonic() - second_started
    assert stored() == 0
    second_peak = memory(second.pid)  # read while it is alive
    print(f"recovered {left} rows in {second_seconds:.1f}s ({left / second_seconds:.0f}/s)")
    print(f"first listener: {first_start} at start, {first_peak} when killed")
    print(f"second listener: {second_start} at start, {second_peak} at the end")
    assert Effect.objects.filter(key__startswith="scale-").values("key").distinct().count() == ROWS
    # The recovery's own progress lines; a later, short sweep (a wake-up, or the rows of the
    # killed listener's claims once their lease ran out) starts counting again.
    second_lines = first_sweep(progress(second))
    assert len(second_lines) >= 2, outputs([second])
    assert_increasing(second_lines)
    assert "Traceback" not in first.output() + second.output(), outputs([first, second])

    for start, peak in ((first_start, first_peak), (second_start, second_peak)):
        assert peak["VmHWM"] - start["VmRSS"] < BOUND, (start, peak)
