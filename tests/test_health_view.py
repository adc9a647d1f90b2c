"""The health view, through real HTTP requests against a real server."""

import datetime
import json
import sys
import urllib.error
import urllib.request

import pytest
from django.test import override_settings
from django.utils import timezone

import pgpubsub
from pgpubsub.models import Notification
from tests.testapp import channels

pytestmark = pytest.mark.django_db(transaction=True)


def get(live_server, path="/pgpubsub/health/"):
    try:
        with urllib.request.urlopen(live_server.url + path, timeout=10) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), error.headers


def test_healthy_with_a_fresh_backlog(live_server):
    pgpubsub.notify(channels.Job, key="private-key", text="private text")
    code, body, headers = get(live_server)
    assert code == 200
    assert body["status"] == "ok" and body["problems"] == []
    assert body["database"]["stored"] == 1
    assert body["database"]["channels"][0]["channel"] == channels.Job.name()
    assert "private" not in json.dumps(body)  # never a payload
    assert "no-cache" in headers["Cache-Control"]


def test_failing_when_the_oldest_stored_notification_is_too_old(live_server):
    pgpubsub.notify(channels.Job, key="stuck", text="x")
    Notification.objects.update(created_at=timezone.now() - datetime.timedelta(minutes=10))
    code, body, _ = get(live_server)
    assert code == 503
    assert body["status"] == "failing"
    assert body["problems"] == ["oldest stored notification waited 600s (more than 300s)"]
    with override_settings(PGPUBSUB_HEALTH_MAX_BACKLOG_AGE=3600):
        code, body, _ = get(live_server)
    assert code == 200 and body["max_backlog_age_seconds"] == 3600


def test_rows_marked_failed_are_reported_but_are_no_backlog(live_server):
    # A message that failed for good waits for a person, not for a listener: a probe that
    # failed for it would take every web process out of service.
    pgpubsub.notify(channels.Job, key="given-up", text="x")
    Notification.objects.update(
        created_at=timezone.now() - datetime.timedelta(days=2), failed_at=timezone.now()
    )
    code, body, _ = get(live_server)
    assert code == 200 and body["problems"] == []
    assert (body["database"]["stored"], body["database"]["failed"]) == (1, 1)
    assert body["database"]["oldest_age_seconds"] is None


def test_a_message_waiting_for_its_next_attempt_is_no_backlog(live_server):
    # As with retry_delay = 30 and max_attempts = 10, after 4 failures: stored 7 minutes ago,
    # due again in 4 minutes.
    pgpubsub.notify(channels.Flaky, key="backing-off")
    now = timezone.now()
    Notification.objects.update(
        created_at=now - datetime.timedelta(minutes=7),
        attempts=4,
        next_attempt_at=now + datetime.timedelta(minutes=4),
    )
    code, body, _ = get(live_server)
    assert code == 200 and body["problems"] == []
    assert body["database"]["oldest_age_seconds"] is None
    # Once due, it waits for a listener from then on (not since it was stored).
    Notification.objects.update(next_attempt_at=now - datetime.timedelta(seconds=30))
    code, body, _ = get(live_server)
    assert code == 200 and 30 <= body["database"]["oldest_age_seconds"] < 90


def test_only_get_and_head(live_server):
    request = urllib.request.Request(live_server.url + "/pgpubsub/health/", method="POST")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=10)
    assert raised.value.code in (403, 405)  # CSRF refuses it first in this project


@pytest.mark.timeout(60)
def test_reports_each_runtime_of_the_process(live_server):
    from pgpubsub.runtime import Runtime
    from tests.processes import wait_for

    runtime = Runtime([channels.Job], workers=1).start()
    try:
        wait_for(lambda: runtime.status()["connected"], 30, "the Runtime to listen")
        pgpubsub.notify(channels.Job, key="secret-key", text="secret")
        wait_for(lambda: runtime.status()["processed"] == 1, 30, "the job")
        code, body, _ = get(live_server)
        assert code == 200, body
        (reported,) = body["runtimes"]
        assert reported["connected"] is True and reported["processed"] == 1
        assert reported["channels"] == [channels.Job.name()]
        assert "secret" not in json.dumps(body)
    finally:
        assert runtime.stop(10)
    code, body, _ = get(live_server)
    assert code == 200 and body["runtimes"] == []


@pytest.mark.timeout(90)
def test_a_web_worker_whose_runtime_cannot_listen_is_failing(processes):
    """gunicorn in embedded mode, its LISTEN alias pointing at a port where no server runs."""
    from tests.processes import free_port, get_json, wait_for

    port = free_port()
    server = processes.start_command(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "tests.wsgi:application",
            "-w",
            "1",
            "-b",
            f"127.0.0.1:{port}",
        ],
        env={
            "PGPUBSUB_TEST_EMBEDDED": "1",
            "PGPUBSUB_TEST_LISTEN_ALIAS": "unreachable-listen",
            "PGPUBSUB_TEST_LISTEN_PORT": "1",
        },
    )
    url = f"http://127.0.0.1:{port}/pgpubsub/health/"

    def failing_with_a_runtime():
        got = get_json(url)
        return (
            got if got and got[1].get("runtimes") and got[1]["runtimes"][0]["last_error"] else None
        )

    code, body = wait_for(failing_with_a_runtime, 60, "a health answer", watch=[server])
    assert code == 503
    (runtime,) = body["runtimes"]
    assert runtime["pid"] in server.children() and runtime["connected"] is False
    assert body["problems"] == [f"Runtime of process {runtime['pid']}: listener not connected"]
    assert "OperationalError" in runtime["last_error"]
