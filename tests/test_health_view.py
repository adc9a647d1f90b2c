"""The health view, through real HTTP requests against a real server."""

import datetime
import json
import os
import sys
import urllib.error
import urllib.request

import pytest
from django.test import Client, override_settings
from django.utils import timezone

import pgpubsub
from pgpubsub.models import Notification
from tests.testapp import channels

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN = "health-token-of-the-tests-0123456789"
#: What an anonymous request gets, and nothing else.
ANONYMOUS_KEYS = {"status", "problems"}


def get(live_server, path="/pgpubsub/health/", headers=None):
    return request_json(live_server.url + path, headers)


def request_json(url, headers=None):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), error.headers


def bearer(token=TOKEN):
    return {"Authorization": f"Bearer {token}"}


def session_cookie(user) -> dict:
    """The Cookie header of a session of ``user`` (stored in the database the server reads)."""
    client = Client()
    client.force_login(user)
    return {"Cookie": f"sessionid={client.cookies['sessionid'].value}"}


@override_settings(PGPUBSUB_HEALTH_TOKEN=TOKEN)
def test_healthy_with_a_fresh_backlog(live_server):
    pgpubsub.notify(channels.Job, key="private-key", text="private text")
    code, body, headers = get(live_server)
    assert (code, body) == (200, {"status": "ok", "problems": []})
    assert "no-cache" in headers["Cache-Control"]
    code, body, headers = get(live_server, headers=bearer())
    assert code == 200
    assert body["status"] == "ok" and body["problems"] == [] and body["details"] == []
    (database,) = body["databases"]
    assert database["database"] == "default" and database["stored"] == 1
    assert database["channels"][0]["channel"] == channels.Job.name()
    assert "private" not in json.dumps(body)  # never a payload
    assert "Authorization" in headers["Vary"]


@override_settings(PGPUBSUB_HEALTH_TOKEN=TOKEN)
def test_failing_when_the_oldest_stored_notification_is_too_old(live_server):
    pgpubsub.notify(channels.Job, key="stuck", text="x")
    Notification.objects.update(created_at=timezone.now() - datetime.timedelta(minutes=10))
    code, body, _ = get(live_server)
    assert (code, body) == (503, {"status": "failing", "problems": ["backlog_too_old"]})
    code, body, _ = get(live_server, headers=bearer())
    assert code == 503 and body["problems"] == ["backlog_too_old"]
    assert body["details"] == [
        "database 'default': oldest stored notification waited 600s (more than 300s)"
    ]
    with override_settings(PGPUBSUB_HEALTH_MAX_BACKLOG_AGE=3600):
        code, body, _ = get(live_server, headers=bearer())
    assert code == 200 and body["max_backlog_age_seconds"] == 3600


@override_settings(PGPUBSUB_HEALTH_TOKEN=TOKEN)
def test_rows_marked_failed_are_reported_but_are_no_backlog(live_server):
    # A message that failed for good waits for a person, not for a listener: a probe that
    # failed for it would take every web process out of service.
    pgpubsub.notify(channels.Job, key="given-up", text="x")
    Notification.objects.update(
        created_at=timezone.now() - datetime.timedelta(days=2), failed_at=timezone.now()
    )
    code, body, _ = get(live_server, headers=bearer())
    assert code == 200 and body["problems"] == []
    (database,) = body["databases"]
    assert (database["stored"], database["failed"]) == (1, 1)
    assert database["oldest_age_seconds"] is None


@override_settings(PGPUBSUB_HEALTH_TOKEN=TOKEN)
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
    code, body, _ = get(live_server, headers=bearer())
    assert code == 200 and body["problems"] == []
    assert body["databases"][0]["oldest_age_seconds"] is None
    # Once due, it waits for a listener from then on (not since it was stored).
    Notification.objects.update(next_attempt_at=now - datetime.timedelta(seconds=30))
    code, body, _ = get(live_server, headers=bearer())
    assert code == 200 and 30 <= body["databases"][0]["oldest_age_seconds"] < 90


def test_only_get_and_head(live_server):
    request = urllib.request.Request(live_server.url + "/pgpubsub/health/", method="POST")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=10)
    assert raised.value.code in (403, 405)  # CSRF refuses it first in this project


@pytest.mark.timeout(60)
@override_settings(PGPUBSUB_HEALTH_TOKEN=TOKEN)
def test_reports_each_runtime_of_the_process(live_server):
    from pgpubsub.runtime import Runtime
    from tests.processes import wait_for

    runtime = Runtime([channels.Job], workers=1).start()
    try:
        wait_for(lambda: runtime.status()["connected"], 30, "the Runtime to listen")
        pgpubsub.notify(channels.Job, key="secret-key", text="secret")
        wait_for(lambda: runtime.status()["processed"] == 1, 30, "the job")
        code, body, _ = get(live_server, headers=bearer())
        assert code == 200, body
        (reported,) = body["runtimes"]
        assert reported["connected"] is True and reported["processed"] == 1
        assert reported["channels"] == [channels.Job.name()]
        assert "secret" not in json.dumps(body)
    finally:
        assert runtime.stop(10)
    code, body, _ = get(live_server, headers=bearer())
    assert code == 200 and body["runtimes"] == []


@pytest.mark.timeout(60)
def test_only_staff_and_the_token_see_what_went_wrong_inside(live_server, django_user_model):
    """A listener's exception carries what the listener put in it (here the message's key):
    an anonymous request gets the status and the problem codes, nothing of the process."""
    from pgpubsub.runtime import Runtime
    from tests.processes import wait_for

    staff = django_user_model.objects.create_user("ops", password="x", is_staff=True)
    member = django_user_model.objects.create_user("member", password="x")
    runtime = Runtime([channels.FailingJob], workers=1).start()
    try:
        wait_for(lambda: runtime.status()["connected"], 30, "the Runtime to listen")
        pgpubsub.notify(channels.FailingJob, key="key-4242-of-a-customer")
        wait_for(lambda: runtime.status()["last_error"], 30, "the job to fail")
        # And a job that no listener has taken for an hour.
        pgpubsub.notify(channels.Job, key="waiting")
        Notification.objects.filter(channel=channels.Job.listen_safe_name()).update(
            created_at=timezone.now() - datetime.timedelta(hours=1)
        )
        private = [
            "key-4242-of-a-customer",
            "RuntimeError",
            channels.FailingJob.name(),
            channels.FailingJob.listen_safe_name(),
            str(os.getpid()),
        ]
        anonymous = {"status": "failing", "problems": ["backlog_too_old"]}

        def text_of(body) -> str:
            return json.dumps(body)

        with override_settings(PGPUBSUB_HEALTH_TOKEN=TOKEN):
            for headers in (
                {},
                bearer("wrong-token"),
                bearer(TOKEN[:-1]),
                {"Authorization": TOKEN},  # no scheme
                {"Authorization": f"Basic {TOKEN}"},
                session_cookie(member),  # logged in, not staff
            ):
                code, body, _ = get(live_server, headers=headers)
                assert (code, body) == (503, anonymous), headers
                assert not any(word in text_of(body) for word in private), headers
            for headers in (bearer(), {"Authorization": f"bearer  {TOKEN}"}, session_cookie(staff)):
                code, body, _ = get(live_server, headers=headers)
                assert code == 503 and body["problems"] == ["backlog_too_old"], headers
                (reported,) = body["runtimes"]
                assert reported["pid"] == os.getpid()
                assert reported["channels"] == [channels.FailingJob.name()]
                assert reported["last_error"] == (
                    "RuntimeError: job key-4242-of-a-customer failed on purpose"
                )
                assert {backlog["channel"] for backlog in body["databases"][0]["channels"]} == {
                    channels.Job.name(),
                    channels.FailingJob.name(),
                }
        # Without PGPUBSUB_HEALTH_TOKEN, no token opens the details; staff still do.
        code, body, _ = get(live_server, headers=bearer())
        assert (code, body) == (503, anonymous)
        code, body, _ = get(live_server, headers={**bearer(), **session_cookie(staff)})
        assert "runtimes" in body
    finally:
        assert runtime.stop(10)


def test_a_token_that_is_no_string_is_a_configuration_error():
    from django.core.exceptions import ImproperlyConfigured

    from pgpubsub import conf

    with override_settings(PGPUBSUB_HEALTH_TOKEN=b"bytes"):
        with pytest.raises(ImproperlyConfigured, match="PGPUBSUB_HEALTH_TOKEN must be a string"):
            conf.health_token()
    with override_settings(PGPUBSUB_HEALTH_TOKEN=""):
        assert conf.health_token() is None  # as unset: an empty token opens nothing


@pytest.mark.timeout(90)
def test_a_web_worker_whose_runtime_cannot_listen_is_failing(processes, django_user_model):
    """gunicorn in embedded mode, its LISTEN alias pointing at a port where no server runs."""
    from tests.processes import free_port, wait_for

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
    staff = session_cookie(
        django_user_model.objects.create_user("ops", password="x", is_staff=True)
    )

    def failing_with_a_runtime():
        try:
            got = request_json(url, staff)
        except OSError:  # the server is starting
            return None
        runtimes = got[1].get("runtimes")
        return got if runtimes and runtimes[0]["last_error"] else None

    code, body, _ = wait_for(failing_with_a_runtime, 60, "a health answer", watch=[server])
    assert code == 503
    (runtime,) = body["runtimes"]
    assert runtime["pid"] in server.children() and runtime["connected"] is False
    assert body["problems"] == ["listener_disconnected"]
    assert body["details"] == [f"Runtime of process {runtime['pid']}: listener not connected"]
    assert "OperationalError" in runtime["last_error"]
    code, body, _ = request_json(url)
    assert (code, body) == (503, {"status": "failing", "problems": ["listener_disconnected"]})
