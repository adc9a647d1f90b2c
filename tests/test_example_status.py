"""The example project's status page and health view, through its real web server: a request
from outside INTERNAL_IPS without the token learns whether the Runtime runs, nothing of it."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys

import pytest

from tests.processes import ROOT, free_port, wait_for
from tests.test_example import example_database_url  # noqa: F401 (a fixture)

MANAGE = ROOT / "example" / "manage.py"
TOKEN = "example-health-token-0123456789"
#: Another address of this host: its requests are not from INTERNAL_IPS.
OUTSIDE = "127.0.0.3"

pytestmark = [pytest.mark.django_db, pytest.mark.timeout(120)]


def get(port: int, path: str, source: str = "127.0.0.1", headers=None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=10, source_address=(source, 0)
    )
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_the_status_page_shows_details_to_internal_ips_and_the_token_only(
    processes,
    example_database_url,  # noqa: F811
):
    env = {
        "DATABASE_URL": example_database_url,
        "DJANGO_SETTINGS_MODULE": "exampleproject.settings",
    }
    migrated = subprocess.run(
        [sys.executable, str(MANAGE), "migrate", "-v", "0"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert migrated.returncode == 0, migrated.stderr
    port = free_port()
    server = processes.start_command(
        [sys.executable, str(MANAGE), "runserver", "--noreload", f"127.0.0.1:{port}"],
        env={**env, "PGPUBSUB_HEALTH_TOKEN": TOKEN},
    )

    def listening():
        try:
            code, body = get(port, "/pgpubsub/status/")
        except OSError:  # not serving yet
            return None
        return body if code == 200 and body["connected"] else None

    status = wait_for(listening, 60, "the example's Runtime to listen", watch=[server])
    # DEBUG is on and the request comes from 127.0.0.1 (as the demo's do): everything.
    assert status["pid"] == server.pid and "blog.channels.PostReads" in status["channels"]
    assert "last_error" in status

    # From another address: whether it runs and listens, no pid, no channel, no error.
    assert get(port, "/pgpubsub/status/", OUTSIDE) == (200, {"running": True, "connected": True})
    assert get(port, "/pgpubsub/status/", OUTSIDE, {"Authorization": "Bearer wrong"}) == (
        200,
        {"running": True, "connected": True},
    )
    code, body = get(port, "/pgpubsub/status/", OUTSIDE, {"Authorization": f"Bearer {TOKEN}"})
    assert code == 200 and body["pid"] == server.pid

    # The health view (from pgpubsub) gives its details to the token only.
    assert get(port, "/pgpubsub/health/") == (200, {"status": "ok", "problems": []})
    code, body = get(port, "/pgpubsub/health/", OUTSIDE, {"Authorization": f"Bearer {TOKEN}"})
    assert code == 200 and body["runtimes"][0]["pid"] == server.pid
