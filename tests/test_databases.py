"""Channels on a database of their own (``database = "other"``): published, stored, listened to
and processed there, next to channels on the default database."""

from dataclasses import dataclass

import pytest

import pgpubsub
from pgpubsub.channel import Channel, registry
from pgpubsub.models import Notification
from pgpubsub.runtime import Runtime
from tests.processes import wait_for
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
