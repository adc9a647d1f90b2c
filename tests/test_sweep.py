"""While no Runtime can be the watcher, the periodic sweep finds stored messages whose NOTIFY
nobody got, and until it is due they wait; with a watcher they are processed without a sweep;
sweeps of many Runtimes never process a row twice; messages published by listeners are processed like any other;
a failing plain listener is logged and counted and the Runtime goes on."""

import json
import logging

import pytest
from django.db import connection
from django.test import override_settings

import pgpubsub
from pgpubsub.listen import process_notifications
from pgpubsub.models import Notification
from pgpubsub.runtime import Runtime
from tests.processes import no_watcher, wait_for
from tests.testapp import channels
from tests.testapp.listeners import received
from tests.testapp.models import Effect

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


def store_silently(count: int, prefix: str) -> None:
    """Stored Job rows without a NOTIFY, as if every listener had missed it."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO pgpubsub_notification (channel, payload) "
            "SELECT %s, jsonb_build_object('kwargs', jsonb_build_object('key', %s || n, "
            "'text', 'swept')) FROM generate_series(1, %s) AS n",
            [channels.Job.listen_safe_name(), prefix, count],
        )


def job_effects() -> int:
    return Effect.objects.filter(channel="Job").count()


@override_settings(PGPUBSUB_SWEEP_INTERVAL=0.5)
def test_the_periodic_sweep_processes_rows_whose_notify_was_missed(runtimes):
    with no_watcher():
        runtime = runtimes(channels=[channels.Job], workers=2)  # no recover: only sweeps
        store_silently(50, "missed-")

        wait_for(lambda: job_effects() == 50, 30, "the sweep to process the rows")
        assert not Notification.objects.exists()
        status = runtime.status()
        assert status["processed"] == 50 and not status["watching"]


def test_without_a_sweep_due_a_missed_row_waits(runtimes, notify_on_write):
    # The counterpart: with no watcher and the default interval (30 s) the row is still there
    # a while later, when a message published after it (its NOTIFY sent on write, with its
    # row's id) has been processed.
    with no_watcher():
        runtimes(channels=[channels.Job], workers=1)
        store_silently(1, "waiting-")
        pgpubsub.notify(channels.Job, key="published")
        wait_for(lambda: Effect.objects.filter(key="published").exists(), 30, "the published one")
        assert Notification.objects.count() == 1
        assert not Effect.objects.filter(key__startswith="waiting-").exists()


@override_settings(PGPUBSUB_SWEEP_INTERVAL=300)
def test_with_a_watcher_a_missed_row_is_processed_without_a_sweep(runtimes):
    # Rows stored without a NOTIFY (the default for lockable writers now) are found by the
    # watcher within a second or so, long before a sweep is due.
    runtime = runtimes(channels=[channels.Job], workers=1)
    wait_for(lambda: runtime.status()["watching"], 30, "the Runtime to become the watcher")
    store_silently(3, "watched-")
    wait_for(
        lambda: job_effects() == 3 and not Notification.objects.exists(),
        10,
        lambda: f"3 rows processed by the watcher's wake-up; {job_effects()} effects",
    )
    assert runtime.status()["processed"] == 3


@override_settings(PGPUBSUB_SWEEP_INTERVAL=0.2)
def test_sweeps_of_many_runtimes_never_process_a_row_twice(runtimes):
    started = [runtimes(channels=[channels.Job], workers=2) for _ in range(3)]
    store_silently(2000, "shared-")

    # Effect keys are unique: a row processed twice would fail its second time, and stay.
    wait_for(lambda: job_effects() == 2000, 50, lambda: f"{job_effects()} of 2000 effects")
    wait_for(lambda: not Notification.objects.exists(), 10, "every row acknowledged")
    statuses = [runtime.status() for runtime in started]
    assert sum(status["processed"] for status in statuses) == 2000
    assert sum(status["failed"] for status in statuses) == 0
    assert sum(1 for status in statuses if status["processed"]) >= 2  # the work was shared


def test_a_sweep_interval_that_is_not_a_positive_number_is_refused(settings):
    settings.PGPUBSUB_SWEEP_INTERVAL = 0
    with pytest.raises(Exception, match="PGPUBSUB_SWEEP_INTERVAL must be a positive number"):
        Runtime(channels=[channels.Job])


def test_messages_published_by_listeners_are_processed(runtimes):
    runtimes(channels=[channels.Relay, channels.LockedRelay, channels.Job, channels.Message])
    pgpubsub.notify(channels.Relay, key="plain", again=2)  # plain -> lockable, three deep
    pgpubsub.notify(channels.LockedRelay, key="locked")  # lockable -> lockable and plain

    expected = {"plain-relayed", "plain+-relayed", "plain++-relayed", "locked-relayed", "locked"}
    wait_for(
        lambda: set(Effect.objects.values_list("key", flat=True)) == expected,
        30,
        lambda: f"effects {sorted(Effect.objects.values_list('key', flat=True))}",
    )
    wait_for(
        lambda: ("Message", {"key": "locked-relayed", "text": "relayed"}) in received,
        10,
        "the plain message the lockable listener sent",
    )
    assert not Notification.objects.exists()


def test_messages_published_by_listeners_reach_process_notifications(listening):
    # 1.x's loop: the listeners run on the LISTENing connection, which also receives what
    # they publish; one call processes the whole chain.
    pgpubsub.notify(channels.Relay, key="chain", again=1)
    process_notifications(listening)
    assert sorted(Effect.objects.values_list("key", flat=True)) == [
        "chain+-relayed",
        "chain-relayed",
    ]
    assert not Notification.objects.exists()


def test_a_failing_plain_listener_is_logged_and_counted(runtimes, caplog):
    caplog.set_level(logging.ERROR, logger="pgpubsub")
    runtime = runtimes(channels=[channels.Message], workers=1)
    pgpubsub.notify(channels.Message, key="bad", text="write-then-fail")
    pgpubsub.notify(channels.Message, key="next")

    wait_for(lambda: runtime.status()["processed"] == 1, 30, lambda: str(runtime.status()))
    assert not Effect.objects.filter(key="bad").exists()  # its write rolled back
    (record,) = [r for r in caplog.records if "failed on message" in r.getMessage()]
    assert record.getMessage().startswith("Listener of tests.testapp.channels.Message failed")
    assert json.loads(record.args[1])["kwargs"]["key"] == "bad"
    assert "message bad failed on purpose" in str(record.exc_info[1])
    status = runtime.status()
    assert (status["failed"], status["invalid"], status["running"]) == (1, 0, True)
