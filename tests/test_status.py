"""``manage.py pgpubsub status``: the stored backlog, never a payload."""

import datetime
import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

import pgpubsub
from pgpubsub.models import Notification
from tests.testapp import channels

pytestmark = pytest.mark.django_db(transaction=True)


def status(*args: str) -> str:
    out = StringIO()
    call_command("pgpubsub", "status", *args, stdout=out)
    return out.getvalue()


def test_an_empty_backlog():
    assert status().splitlines() == [
        "Database 'default': 0 stored notification(s), 0 failed, oldest -; notification queue "
        "0.0% full"
    ]


def test_the_backlog_per_channel_oldest_first_without_payloads():
    for number in range(3):
        pgpubsub.notify(channels.Job, key=f"secret-{number}", text="do not show me")
    pgpubsub.notify(channels.FailingJob, key="secret-x")
    hour_ago = timezone.now() - datetime.timedelta(hours=1, minutes=5)
    Notification.objects.filter(channel=channels.FailingJob.listen_safe_name()).update(
        created_at=hour_ago
    )
    # A row django-pgpubsub 1.x stored under the dotted name, before created_at existed.
    Notification.objects.create(channel="some.old.Channel", payload={"kwargs": {}})
    Notification.objects.filter(channel="some.old.Channel").update(created_at=None)
    # A failed row is kept, but is no backlog: it is older than the others and not counted in
    # the oldest age.
    pgpubsub.notify(channels.Job, key="secret-failed", text="do not show me")
    Notification.objects.filter(payload__kwargs__key="secret-failed").update(
        failed_at=timezone.now(), attempts=5, created_at=hour_ago - datetime.timedelta(days=3)
    )

    report = json.loads(status("--json"))
    assert report["database"] == "default"
    assert report["stored"] == 6
    assert report["failed"] == 1
    assert 3900 <= report["oldest_age_seconds"] < 4000
    assert 0.0 <= report["notification_queue_usage"] < 0.01
    assert [(c["channel"], c["stored"], c["failed"]) for c in report["channels"]] == [
        (channels.FailingJob.name(), 1, 0),
        (channels.Job.name(), 4, 1),
        ("some.old.Channel", 1, 0),
    ]
    assert report["channels"][2]["oldest_age_seconds"] is None

    table = status()
    assert table.splitlines()[0].startswith(
        "Database 'default': 6 stored notification(s), 1 failed, oldest 1h 05m"
    )
    rows = [line.split() for line in table.splitlines()[1:]]
    assert rows[0] == ["channel", "stored", "failed", "oldest"]
    assert rows[1][:3] == [channels.FailingJob.name(), "1", "0"] and rows[1][3:] == ["1h", "05m"]
    assert rows[2][:3] == [channels.Job.name(), "4", "1"]
    assert rows[3] == ["some.old.Channel", "1", "0", "-"]
    assert "secret" not in table and "do not show me" not in table
    assert "secret" not in json.dumps(report)


def test_an_unknown_database_alias_is_an_error():
    with pytest.raises(CommandError, match="Unknown database alias 'nope'"):
        status("--database", "nope")


def test_an_action_is_required():
    with pytest.raises(CommandError):
        call_command("pgpubsub")
