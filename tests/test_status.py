"""``manage.py pgpubsub status``: the stored backlog, never a payload."""

import datetime
import json
import os
import subprocess
import sys
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

import pgpubsub
from pgpubsub.models import Notification
from tests.processes import MANAGE, ROOT, free_port
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

    everything = json.loads(status("--json"))
    assert everything["errors"] == []
    (report,) = everything["databases"]
    assert (everything["stored"], everything["failed"]) == (6, 1)
    assert everything["oldest_age_seconds"] == report["oldest_age_seconds"]
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
    assert "secret" not in json.dumps(everything)


def test_an_unknown_database_alias_is_an_error():
    with pytest.raises(CommandError, match="Unknown database alias 'nope'"):
        status("--database", "nope")


def manage(*args: str, database_url: str) -> subprocess.CompletedProcess:
    """``manage.py <args>`` of the test project, on the database ``database_url`` names."""
    return subprocess.run(
        [sys.executable, str(MANAGE), *args],
        env={**os.environ, "DATABASE_URL": database_url, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def closed_port_url() -> str:
    return f"postgresql://postgres@127.0.0.1:{free_port()}/nothing-listens-here"


def test_an_action_is_required_and_the_error_lists_them():
    with pytest.raises(CommandError, match="an action is required"):
        call_command("pgpubsub")
    # From the command line: the usage, the actions with what each does, exit code 2.
    done = manage("pgpubsub", database_url=closed_port_url())
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.startswith("usage: manage.py pgpubsub ")
    assert "{status,retry}" in done.stderr
    assert "error: an action is required, one of:" in done.stderr
    assert "  status  show the stored backlog" in done.stderr
    assert "  retry   give the stored notifications marked failed new attempts" in done.stderr
    assert "Traceback" not in done.stderr
    helped = manage("pgpubsub", "--help", database_url=closed_port_url())
    assert helped.returncode == 0
    assert "status" in helped.stdout and "show the stored backlog" in helped.stdout


def test_a_database_that_cannot_be_reached_is_one_error_not_a_traceback():
    url = closed_port_url()
    port = url.split(":")[-1].split("/")[0]

    done = manage("pgpubsub", "status", "--json", database_url=url)
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert (report["databases"], report["stored"]) == ([], 0)
    (error,) = report["errors"]
    assert error["database"] == "default"
    assert error["error"].startswith("OperationalError: ") and port in error["error"]
    assert "Traceback" not in done.stderr

    for args in (["status"], ["retry"]):
        done = manage("pgpubsub", *args, database_url=url)
        assert done.returncode == 1, done.stderr
        assert done.stdout == ""
        (line,) = done.stderr.splitlines()
        assert line.startswith("CommandError: cannot ") and "OperationalError" in line
        assert port in line
