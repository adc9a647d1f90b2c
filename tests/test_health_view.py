"""The health view, through real HTTP requests against a real server."""

import datetime
import json
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


def test_only_get_and_head(live_server):
    request = urllib.request.Request(live_server.url + "/pgpubsub/health/", method="POST")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=10)
    assert raised.value.code in (403, 405)  # CSRF refuses it first in this project
