"""What the log says about each message: a DEBUG line per message (channel, row id, attempt,
duration, outcome), and the attributes ``channel``, ``row_id`` and ``attempt`` on the records
about one message, for formatters that write them out (JSON)."""

import logging
import re

import pytest

import pgpubsub
from pgpubsub.listen import process_notifications
from pgpubsub.models import Notification
from tests.processes import wait_for
from tests.testapp import channels
from tests.testapp.models import Effect

pytestmark = pytest.mark.django_db(transaction=True)

JOBS = 5
#: The DEBUG line of a message, in listen's default format.
DEBUG_LINE = re.compile(
    r"DEBU (?P<channel>[\w.]+): (?P<outcome>\w+) "
    r"\(row (?P<row>\d+|-), attempt (?P<attempt>\d+), (?P<ms>\d+\.\d) ms\)$",
    re.MULTILINE,
)


def test_listen_loglevel_debug_logs_each_message(processes):
    for number in range(JOBS):
        pgpubsub.notify(channels.Job, key=f"job-{number}", text="x")
    stored = sorted(Notification.objects.values_list("pk", flat=True))
    assert len(stored) == JOBS

    listener = processes.start(
        "--channels", "tests.testapp.channels.Job", "--recover", "--loglevel", "debug"
    )
    wait_for(
        lambda: Effect.objects.filter(channel="Job").count() == JOBS,
        30,
        lambda: f"{JOBS} jobs; output:\n{listener.output()}",
        watch=[listener],
    )
    lines = wait_for(
        lambda: len(found := DEBUG_LINE.findall(listener.output())) >= JOBS and found,
        10,
        lambda: f"{JOBS} debug lines; output:\n{listener.output()}",
    )
    assert len(lines) == JOBS, listener.output()  # one per message
    assert sorted(int(row) for _, _, row, _, _ in lines) == stored
    for channel, outcome, _, attempt, milliseconds in lines:
        assert (channel, outcome, attempt) == (channels.Job.name(), "processed", "1")
        assert 0 <= float(milliseconds) < 10_000


def test_records_about_a_failing_lockable_message_carry_its_fields(listening, caplog):
    caplog.set_level(logging.DEBUG, logger="pgpubsub")
    pgpubsub.notify(channels.FailingJob, key="broken")
    row_id = Notification.objects.get().pk
    with pytest.raises(RuntimeError):
        process_notifications(listening)

    failure = next(r for r in caplog.records if r.getMessage().startswith("Listener of"))
    assert failure.levelno == logging.ERROR
    assert (failure.channel, failure.row_id, failure.attempt) == (
        channels.FailingJob.name(),
        row_id,
        1,
    )
    (debug,) = [
        r
        for r in caplog.records
        if r.levelno == logging.DEBUG and getattr(r, "row_id", None) == row_id
    ]
    assert (debug.channel, debug.attempt, debug.outcome) == (
        channels.FailingJob.name(),
        1,
        "retrying",
    )
    assert debug.duration_ms >= 0
    assert "next attempt in" in debug.getMessage()
