"""A new version started before ``migrate``: pgpubsub's table lacks a column its statements use
(here ``claimed_by``, of migration 0009). The Runtime says so on one line, leaves the stored rows
untouched, tries again after growing pauses, and processes everything once the column is there."""

import logging

import pytest
from django.db import connection
from django.test import override_settings

import pgpubsub
from pgpubsub import scheduler
from tests.processes import wait_for
from tests.testapp import channels
from tests.testapp.listeners import received
from tests.testapp.models import Effect

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(90)]

MESSAGES = 30
PLAIN = {"key": "plain", "text": "still processed"}
ERROR = "pgpubsub's table pgpubsub_notification in database 'default' lacks column claimed_by"


def execute(sql: str) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchall() if cursor.description else []


@pytest.fixture
def without_claimed_by():
    """The table as migration 0008 left it; the column is put back after the test."""
    execute("ALTER TABLE pgpubsub_notification DROP COLUMN claimed_by")
    try:
        yield
    finally:
        execute("ALTER TABLE pgpubsub_notification ADD COLUMN IF NOT EXISTS claimed_by text NULL")


def stored_rows() -> tuple:
    """(rows, most attempts, with an error, with a next attempt, marked failed): read without
    the model, which names the missing column."""
    (row,) = execute(
        "SELECT count(*), coalesce(max(attempts), 0), count(last_error), count(next_attempt_at), "
        "count(failed_at) FROM pgpubsub_notification"
    )
    return row


def test_a_table_not_migrated_is_reported_on_one_line_then_processed_once_migrated(
    without_claimed_by, runtimes, caplog
):
    caplog.set_level(logging.INFO, logger="pgpubsub")
    runtime = runtimes(channels=[channels.Job, channels.Message], workers=2)
    for number in range(MESSAGES):  # one transaction, one NOTIFY each
        pgpubsub.notify(channels.Job, key=f"job-{number}", text="x")
    pgpubsub.notify(channels.Message, **PLAIN)

    def errors() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage().startswith(ERROR)]

    # The first error, then the one after the first pause (1 s): the retries go on.
    wait_for(lambda: len(errors()) >= 2, 30, lambda: f"two errors; log:\n{caplog.text}")
    # Plain channels need no table: they go on meanwhile.
    wait_for(lambda: ("Message", PLAIN) in received, 10, "the plain message")

    found = errors()
    assert len(found) < 5, caplog.text  # once per pause, not once per message
    first = found[0].getMessage()
    assert "\n" not in first and "run `manage.py migrate`" in first, first
    assert "trying again in" in first
    # The pauses grow: 1 s, then 2 s... (with up to 20% jitter off each).
    gaps = [
        later.created - earlier.created for earlier, later in zip(found, found[1:], strict=False)
    ]
    for number, gap in enumerate(gaps):
        assert gap >= 0.75 * scheduler.MIN_SCHEMA_RETRY_DELAY * 2**number, gaps
    pgpubsub_records = [r for r in caplog.records if r.name.startswith("pgpubsub")]
    assert not [r for r in pgpubsub_records if r.exc_info], "no traceback is logged"
    assert not [r for r in pgpubsub_records if r.levelno >= logging.ERROR and r not in found]
    assert stored_rows() == (MESSAGES, 0, 0, 0, 0), "nothing claimed nor charged"
    assert runtime.status()["running"] and runtime.status()["processed"] == 1
    assert not Effect.objects.filter(channel="Job").exists()

    execute("ALTER TABLE pgpubsub_notification ADD COLUMN claimed_by text NULL")  # migrated
    wait_for(
        lambda: Effect.objects.filter(channel="Job").count() == MESSAGES,
        60,
        lambda: f"{MESSAGES} jobs; log:\n{caplog.text}",
    )
    assert stored_rows()[0] == 0
    assert "has every column now: processing again" in caplog.text
    assert runtime.status()["processed"] == MESSAGES + 1
    assert runtime.status()["failed"] == 0


#: What the Runtime logs when the filter's subquery fails, by the way the row reached it: the
#: watcher's wake-up has the channel swept (the sweep reads the due ids through the filter), a
#: per-row NOTIFY has the row claimed (the claim runs the filter).
FILTER_FAILED = {
    "watcher": "Processing tests.testapp.channels.Job failed",
    "notify on write": "Claiming stored notifications",
}


def test_an_undefined_table_of_the_listener_filter_is_not_a_migrate_to_run(
    runtimes, caplog, write_mode
):
    """PGPUBSUB_LISTENER_FILTER's subquery runs inside pgpubsub's reads of stored rows: its
    undefined table is reported as the error it is (it read "run manage.py migrate", every
    second)."""
    caplog.set_level(logging.INFO, logger="pgpubsub")
    with override_settings(PGPUBSUB_LISTENER_FILTER="tests.testapp.filters.MissingTable"):
        runtimes(channels=[channels.Job], workers=1)
        pgpubsub.notify(channels.Job, key="filtered", text="x")
        failed = wait_for(
            lambda: [r for r in caplog.records if FILTER_FAILED[write_mode] in r.getMessage()],
            30,
            lambda: f"the {write_mode} path to fail; log:\n{caplog.text}",
        )
    assert failed[0].levelno == logging.ERROR
    assert "pgpubsub_test_no_such_table" in str(failed[0].exc_info[1])
    assert not [r for r in caplog.records if "manage.py migrate" in r.getMessage()]
    assert stored_rows()[:2] == (1, 0)  # stored, not attempted
