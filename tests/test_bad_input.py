"""Bad input never stops a Runtime: each bad message is logged once with what is wrong,
counted, marked failed when it is stored, and the next good message is processed."""

import json
import logging

import pytest
from django.db import connection, transaction

import pgpubsub
from pgpubsub.listen import process_notifications
from pgpubsub.models import Notification
from tests.processes import wait_for
from tests.testapp import channels
from tests.testapp.listeners import received
from tests.testapp.models import Effect

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


def pg_notify(channel, payload: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, %s)", [channel.listen_safe_name(), payload])


def store_row(channel, payload) -> int:
    """A stored row as a producer would write it (with its NOTIFY), whatever the payload."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pgpubsub_store(%s, %s::jsonb)",
            [channel.listen_safe_name(), json.dumps(payload)],
        )
        return cursor.fetchone()[0]


def messages_received() -> list[str]:
    return [kwargs["key"] for name, kwargs in received if name == "Message"]


def warnings_about(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.mark.parametrize(
    ("payload", "what"),
    [
        ("not json at all", "Payload is not JSON"),
        ('{"kwargs": {"key": "k"', "Payload is not JSON"),
        ('{"kwargs": {}}', "payload lacks the field(s) key"),
        ('{"args": [1]}', "payload has no 'kwargs' object"),
        ('{"kwargs": {"key": "k", "text": [1, 2]}}', "Message.text"),
        ("[1, 2, 3]", "payload has no 'kwargs' object"),
    ],
)
def test_a_plain_message_that_cannot_be_read_is_dropped_and_logged_once(
    runtimes, caplog, payload, what
):
    caplog.set_level(logging.WARNING, logger="pgpubsub")
    runtime = runtimes(channels=[channels.Message], workers=1)
    pg_notify(channels.Message, payload)
    pgpubsub.notify(channels.Message, key="good")

    wait_for(lambda: "good" in messages_received(), 30, "the next good message")
    logged = warnings_about(caplog, "cannot be read")
    assert len(logged) == 1
    assert logged[0].startswith("Dropping a message of tests.testapp.channels.Message")
    assert what in logged[0]
    assert not any(r.exc_info for r in caplog.records)  # what is wrong, no traceback
    status = runtime.status()
    assert (status["processed"], status["failed"], status["invalid"]) == (1, 1, 1)
    assert status["running"] and status["connected"]


@pytest.mark.parametrize(
    ("channel", "payload", "what"),
    [
        (channels.Job, "a JSON string, not a message", "Payload is not JSON"),
        (channels.Job, {"kwargs": {"text": "no key"}}, "payload lacks the field(s) key"),
        (channels.Job, {"kwargs": {"key": {"not": "text"}}}, "Job.key"),
        (
            channels.AuthorTrigger,
            {"app": "testapp", "model": "Vanished", "old": None, "new": {"id": 1}},
            "payload names model testapp.Vanished, which is not installed",
        ),
        (
            channels.AuthorTrigger,
            {"app": "nosuchapp", "model": "Author", "old": None, "new": {"id": 1}},
            "payload names model nosuchapp.Author, which is not installed",
        ),
        (channels.AuthorTrigger, {"app": "testapp", "model": "Author", "new": 7}, "not an object"),
        # A trigger payload always names its model: one that lost app or model is not a
        # message of the channel's model (django-pgpubsub 1.3.1 did not process it either).
        (
            channels.AuthorTrigger,
            {"model": "Author", "old": None, "new": {"id": 1, "name": "x"}},
            "trigger payload lacks 'app'",
        ),
        (
            channels.AuthorTrigger,
            {"app": "testapp", "old": None, "new": {"id": 1, "name": "x"}},
            "trigger payload lacks 'model'",
        ),
        (
            channels.AuthorTrigger,
            {"app": "", "model": None, "old": None, "new": {"id": 1, "name": "x"}},
            "trigger payload lacks 'app', 'model'",
        ),
    ],
)
def test_a_stored_message_that_cannot_be_read_is_marked_failed_at_once(
    runtimes, caplog, channel, payload, what
):
    caplog.set_level(logging.WARNING, logger="pgpubsub")
    runtime = runtimes(channels=[channel, channels.Job], workers=1)
    bad = store_row(channel, payload)
    pgpubsub.notify(channels.Job, key="good")

    wait_for(lambda: Effect.objects.filter(key="good").exists(), 30, "the next good message")
    row = wait_for(
        lambda: (row := Notification.objects.filter(pk=bad).first()) and row.failed_at and row,
        10,
        "the bad row to be marked failed",
    )
    assert row.attempts == 1  # not retried: reading it again would fail again
    assert row.last_error.startswith("InvalidPayload: ") and what in row.last_error
    assert "Traceback" in row.last_traceback
    logged = warnings_about(caplog, "cannot be read")
    assert logged == [
        f"Stored notification {bad} of {channel.name()} cannot be read, marked "
        f"failed: {row.last_error}"
    ]
    status = runtime.status()
    assert (status["processed"], status["failed"], status["invalid"]) == (1, 1, 1)


def test_a_column_the_model_no_longer_has_is_ignored(runtimes):
    runtimes(channels=[channels.LockedDocumentTrigger], workers=1)
    payload = {
        "app": "testapp",
        "model": "Document",
        "old": None,
        "new": {"id": 424242, "title": "old row", "body": "four", "dropped_column": "x"},
    }
    store_row(channels.LockedDocumentTrigger, payload)

    effect = wait_for(
        lambda: Effect.objects.filter(key="document-424242").first(), 30, "the old-format row"
    )
    assert effect.value == "4"
    assert not Notification.objects.exists()


@pytest.mark.parametrize("payload", ["not-a-row-id", "12abc", "-5", "²"])
def test_a_lockable_notification_that_is_not_a_row_id_is_ignored(runtimes, caplog, payload):
    caplog.set_level(logging.WARNING, logger="pgpubsub")
    runtime = runtimes(channels=[channels.Job], workers=1)
    pg_notify(channels.Job, payload)
    pgpubsub.notify(channels.Job, key="good")

    wait_for(lambda: Effect.objects.filter(key="good").exists(), 30, "the next good message")
    logged = warnings_about(caplog, "Ignoring a notification")
    assert logged == [
        f"Ignoring a notification on tests.testapp.channels.Job (not a stored notification "
        f"id): {payload!r}"
    ]
    wait_for(lambda: runtime.status()["ignored"] == 1, 5, lambda: str(runtime.status()))


def test_a_notification_of_a_row_that_is_gone_changes_nothing(runtimes):
    runtime = runtimes(channels=[channels.Job], workers=1)
    pg_notify(channels.Job, "987654321")
    pgpubsub.notify(channels.Job, key="good")

    wait_for(lambda: Effect.objects.filter(key="good").exists(), 30, "the next good message")
    status = runtime.status()
    assert (status["processed"], status["failed"]) == (1, 0)


def test_a_notification_on_a_channel_without_listeners_is_ignored(listening, caplog):
    caplog.set_level(logging.WARNING, logger="pgpubsub")
    with connection.cursor() as cursor:
        cursor.execute("LISTEN pgpubsub_00000")
        cursor.execute("SELECT pg_notify('pgpubsub_00000', 'who is there?')")
    pgpubsub.notify(channels.Message, key="good")

    process_notifications(listening)
    assert messages_received() == ["good"]
    assert warnings_about(caplog, "Ignoring a notification") == [
        "Ignoring a notification on pgpubsub_00000 (no listener for that channel here): "
        "'who is there?'"
    ]


def test_a_lockable_notification_of_thousands_of_digits_is_ignored(runtimes):
    runtime = runtimes(channels=[channels.Message, channels.Job], workers=1)
    with transaction.atomic():
        pg_notify(channels.Message, '{"kwargs": {"key": "with-it"}}')
        pg_notify(channels.Job, "9" * 5000)  # int() refuses it; no bigint is that long

    wait_for(lambda: "with-it" in messages_received(), 30, "the plain message sent with it")
    wait_for(lambda: runtime.status()["ignored"] == 1, 5, lambda: str(runtime.status()))
    assert runtime.status()["reconnects"] == 0


def test_a_plain_listener_that_dooms_its_transaction_fails(runtimes):
    runtime = runtimes(channels=[channels.PlainSwallowing], workers=1)
    pgpubsub.notify(channels.PlainSwallowing, key="swallowed")

    wait_for(lambda: runtime.status()["failed"] == 1, 30, lambda: str(runtime.status()))
    assert runtime.status()["processed"] == 0
    assert not Effect.objects.exists()
