"""Channels on a database of their own (``database = "other"``): published, stored, listened to
and processed there, next to channels on the default database."""

import datetime
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from io import StringIO

import pytest
from django.core.management import call_command
from django.test import override_settings
from django.utils import timezone

import pgpubsub
from pgpubsub.channel import Channel, registry
from pgpubsub.models import Notification
from pgpubsub.runtime import Runtime
from tests.processes import LISTEN_SESSION, wait_for
from tests.testapp import channels
from tests.testapp.models import Effect

pytestmark = [
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.timeout(60),
]


@dataclass
class OtherJob(Channel):
    lock_notifications = True
    database = "other"
    key: str


@dataclass
class OtherNews(Channel):
    database = "other"
    key: str


@pytest.fixture
def other_listeners():
    """Listeners of the two channels, registered for this test only."""

    @pgpubsub.listener(OtherJob)
    def run_other_job(key: str) -> None:
        Effect.objects.using("other").create(key=key, channel="OtherJob")

    @pgpubsub.listener(OtherNews)
    def record_other_news(key: str) -> None:
        Effect.objects.using("other").create(key=key, channel="OtherNews")

    yield
    del registry[OtherJob]
    del registry[OtherNews]


def test_notify_stores_and_a_runtime_processes_on_the_channels_database(other_listeners):
    pgpubsub.notify(OtherJob, key="stored-before-start")
    assert Notification.objects.using("other").count() == 1
    assert not Notification.objects.exists()  # nothing on the default database

    runtime = Runtime([OtherJob, OtherNews, channels.Job], workers=2, recover=True).start()
    try:
        wait_for(lambda: runtime.status()["connected"], 30, "the Runtime to listen")
        for number in range(10):
            pgpubsub.notify(OtherJob, key=f"other-{number}")
            pgpubsub.notify(OtherNews, key=f"news-{number}")
            pgpubsub.notify(channels.Job, key=f"default-{number}")

        def done() -> bool:
            return (
                Effect.objects.using("other").count() == 21
                and Effect.objects.filter(channel="Job").count() == 10
            )

        wait_for(done, 30, lambda: f"31 effects; {runtime.status()}")
        other = set(Effect.objects.using("other").values_list("key", flat=True))
        assert other == {
            "stored-before-start",
            *(f"other-{n}" for n in range(10)),
            *(f"news-{n}" for n in range(10)),
        }
        assert not Notification.objects.using("other").exists()
        assert not Notification.objects.exists()
        assert runtime.status()["processed"] == 31 and runtime.status()["failed"] == 0
    finally:
        assert runtime.stop(10)


def test_process_stored_notifications_asks_on_the_channels_database(other_listeners):
    runtime = Runtime([OtherJob], workers=1).start()
    try:
        wait_for(lambda: runtime.status()["connected"], 30, "the Runtime to listen")
        # Stored without a NOTIFY (as if it was sent while no one listened).
        Notification.objects.using("other").create(
            channel=OtherJob.listen_safe_name(), payload={"kwargs": {"key": "quiet"}}
        )
        pgpubsub.process_stored_notifications([OtherJob])
        wait_for(
            lambda: Effect.objects.using("other").filter(key="quiet").exists(),
            30,
            "the stored job",
        )
    finally:
        assert runtime.stop(10)


def stored_on_other(count: int, waited: float) -> None:
    """``count`` rows of OtherJob on database ``other`` that have waited ``waited`` seconds for a
    listener (none runs)."""
    Notification.objects.using("other").bulk_create(
        Notification(channel=OtherJob.listen_safe_name(), payload={"kwargs": {"key": f"k{n}"}})
        for n in range(count)
    )
    Notification.objects.using("other").update(
        created_at=timezone.now() - datetime.timedelta(seconds=waited)
    )


def test_status_covers_every_database_a_channel_uses(other_listeners):
    stored_on_other(9, 16)
    pgpubsub.notify(channels.Job, key="on-default")

    out = StringIO()
    call_command("pgpubsub", "status", "--json", stdout=out)
    report = json.loads(out.getvalue())
    assert [(db["database"], db["stored"]) for db in report["databases"]] == [
        ("default", 1),
        ("other", 9),
    ]
    assert report["stored"] == 10 and report["errors"] == []
    assert 16 <= report["oldest_age_seconds"] < 60
    assert report["databases"][1]["channels"][0]["channel"] == OtherJob.name()

    out = StringIO()
    call_command("pgpubsub", "status", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("Database 'default': 1 stored notification(s)")
    assert "Database 'other': 9 stored notification(s), 0 failed, oldest 1" in out.getvalue()
    assert any(line.split()[:2] == [OtherJob.name(), "9"] for line in lines)

    # --database still narrows it to one.
    out = StringIO()
    call_command("pgpubsub", "status", "--json", "--database", "other", stdout=out)
    assert [db["database"] for db in json.loads(out.getvalue())["databases"]] == ["other"]


@override_settings(PGPUBSUB_HEALTH_MAX_BACKLOG_AGE=10, PGPUBSUB_HEALTH_TOKEN="token-of-the-test")
def test_the_health_view_fails_for_a_backlog_on_another_database(other_listeners, live_server):
    url = live_server.url + "/pgpubsub/health/"
    stored_on_other(9, 16)

    def health(headers: dict) -> tuple[int, dict]:
        request = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    assert health({}) == (503, {"status": "failing", "problems": ["backlog_too_old"]})
    code, body = health({"Authorization": "Bearer token-of-the-test"})
    assert code == 503
    assert [(db["database"], db["stored"]) for db in body["databases"]] == [
        ("default", 0),
        ("other", 9),
    ]
    (detail,) = body["details"]
    assert detail.startswith("database 'other': oldest stored notification waited 1")

    Notification.objects.using("other").update(created_at=timezone.now())
    assert health({}) == (200, {"status": "ok", "problems": []})


@pytest.fixture
def other_listen_alias():
    """LISTEN for the channels on ``other`` through the alias ``other_listen`` (tests/settings.py:
    the same database, its sessions named apart); yields their application_name."""
    from django.db import connections

    with override_settings(PGPUBSUB_LISTEN_ALIASES={"other": "other_listen"}):
        yield connections["other_listen"].settings_dict["OPTIONS"]["application_name"]


def listening_sessions(application_name: str) -> list[str]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT datname FROM pg_stat_activity WHERE application_name = %s "
            f"AND {LISTEN_SESSION}",
            [application_name],
        )
        return [row[0] for row in cursor.fetchall()]


@pytest.mark.django_db(transaction=True, databases=["default", "other", "other_listen"])
def test_channels_on_another_database_listen_through_its_listen_alias(
    other_listeners, other_listen_alias
):
    runtime = Runtime([OtherNews, OtherJob], workers=1).start()
    try:
        wait_for(lambda: runtime.status()["connected"], 30, "the Runtime to listen")
        wait_for(
            lambda: listening_sessions(other_listen_alias),
            10,
            "a LISTEN session through the alias other_listen",
        )
        assert listening_sessions(other_listen_alias) == [connections_settings_name("other")], (
            "one LISTEN session, on the database of 'other'"
        )
        pgpubsub.notify(OtherNews, key="through-the-listen-alias")
        pgpubsub.notify(OtherJob, key="stored-through-the-listen-alias")
        wait_for(lambda: Effect.objects.using("other").count() == 2, 30, "both messages processed")
    finally:
        assert runtime.stop(10)


def connections_settings_name(alias: str) -> str:
    from django.db import connections

    return connections[alias].settings_dict["NAME"]
