"""Nothing that arrives from the network or from stored rows becomes SQL; channel names are
validated before they reach a statement; a setting that imports a class fails at start-up."""

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.test import override_settings

import pgpubsub
from pgpubsub.connection import ListenConnection, quote_channel
from pgpubsub.exceptions import ChannelNotFound
from pgpubsub.models import Notification
from pgpubsub.runtime import Runtime
from tests.processes import wait_for
from tests.testapp import channels
from tests.testapp.models import Document, Effect

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

HOSTILE = [
    "'); DROP TABLE pgpubsub_notification; --",
    "x' OR '1'='1",
    "$$; DELETE FROM testapp_effect; $$",
    "$pgpubsub$ ; SELECT pg_sleep(10); $pgpubsub$",
    '"; LISTEN "pgpubsub_00000',
    "\\'; COMMIT; --",
    "%s %(key)s %%",
]


def table_exists(name: str) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [name])
        return cursor.fetchone()[0]


def test_hostile_text_travels_as_data_through_every_path(runtimes):
    runtime = runtimes(channels=[channels.Job, channels.LockedDocumentTrigger], workers=2)
    for text in HOSTILE:
        pgpubsub.notify(channels.Job, key=text, text=text)
        pgpubsub.set_notification_context({"who": text})
        Document.objects.create(title=text, body=text)

    wait_for(
        lambda: Effect.objects.count() == 2 * len(HOSTILE),
        30,
        lambda: f"{Effect.objects.count()} effects; {runtime.status()}",
    )
    assert sorted(Effect.objects.filter(channel="Job").values_list("key", flat=True)) == sorted(
        HOSTILE
    )
    lengths = Effect.objects.filter(channel="LockedDocumentTrigger").values_list("value", flat=True)
    assert sorted(lengths) == sorted(str(len(text)) for text in HOSTILE)
    assert table_exists("pgpubsub_notification") and not Notification.objects.exists()
    assert runtime.status()["failed"] == 0


@override_settings(PGPUBSUB_LISTENER_FILTER="tests.testapp.filters.SkipMarkedRows")
def test_hostile_text_meets_the_listener_filter_as_data(runtimes):
    # The filter's SQL (built by the ORM) joins the claim queries, its values as parameters.
    runtimes(channels=[channels.Job], workers=2)
    for text in [*HOSTILE, "skip'; --"]:
        pgpubsub.notify(channels.Job, key=text, text=text)

    wait_for(lambda: Effect.objects.count() == len(HOSTILE), 30, "the jobs the filter allows")
    assert sorted(Effect.objects.values_list("key", flat=True)) == sorted(HOSTILE)
    assert [row.payload["kwargs"]["key"] for row in Notification.objects.all()] == ["skip'; --"]


def test_hostile_text_in_failures_and_retries_is_data(runtimes):
    runtimes(channels=[channels.Flaky], workers=1)
    text = HOSTILE[0]
    pgpubsub.notify(channels.Flaky, key=text, failures=99)
    row = wait_for(
        lambda: (row := Notification.objects.first()) and row.failed_at and row,
        30,
        "the row to be marked failed",
    )
    assert row.last_error == f"RuntimeError: flaky {text} failed on attempt 3"
    assert pgpubsub.retry_failed(ids=[row.pk]) == 1
    with pytest.raises(ChannelNotFound):
        pgpubsub.retry_failed(channels=[text])
    assert table_exists("pgpubsub_notification")


@pytest.mark.parametrize("name", [*HOSTILE, "", "pgpubsub_" + "x" * 60, "1abc", "a b"])
def test_channel_names_that_are_not_identifiers_never_reach_a_statement(name):
    with pytest.raises(ValueError, match="is not a valid channel name"):
        quote_channel(name)
    conn = ListenConnection("default")
    conn.connect()
    try:
        with pytest.raises(ValueError, match="is not a valid channel name"):
            conn.listen([name])
        assert conn.channels == []
    finally:
        conn.close()
    with pytest.raises(ChannelNotFound):
        pgpubsub.notify(name, key="k")


def test_listen_names_are_made_by_pgpubsub():
    for channel in (channels.Job, channels.AuthorTrigger, channels.Message):
        name = channel.listen_safe_name()
        assert quote_channel(name) == f'"{name}"'
        assert len(name) == len("pgpubsub_") + 5


@override_settings(PGPUBSUB_LISTENER_FILTER="tests.testapp.filters.Nowhere")
def test_a_listener_filter_that_cannot_be_imported_stops_a_runtime_at_start():
    runtime = Runtime(channels=[channels.Job])
    with pytest.raises(ImproperlyConfigured, match="PGPUBSUB_LISTENER_FILTER = .*Nowhere"):
        runtime.start()
    assert not runtime.running
    with override_settings(PGPUBSUB_LISTENER_FILTER="tests.testapp.channels.Job"):
        with pytest.raises(ImproperlyConfigured, match="Job.* cannot be instantiated"):
            Runtime(channels=[channels.Job]).start()


@pytest.mark.parametrize(
    ("path", "what"),
    [
        ("tests.testapp.filters.Nowhere", "cannot be imported"),
        ("collections.OrderedDict", "has no get_filter() method"),
        ("tests.testapp.channels.Job", "cannot be instantiated"),
    ],
)
def test_listen_refuses_to_start_with_a_broken_listener_filter(processes, path, what):
    listener = processes.start(ready=None, env={"PGPUBSUB_TEST_LISTENER_FILTER": path})
    assert listener.wait(30) == 1
    output = listener.output()
    # The command's system checks stop it first, saying what is wrong.
    assert f"(pgpubsub.E006) PGPUBSUB_LISTENER_FILTER = '{path}'" in output, output
    assert what in output and "Traceback" not in output, output
    assert listener.backends(listening=True) == []
