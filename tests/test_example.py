"""Acceptance test of the example project: ``python example/manage.py demo`` as a user runs it,
against a database of its own on the test session's server."""

from __future__ import annotations

import http.cookiejar
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlencode, urlparse

import psycopg2
import pytest

from pgpubsub.testing.postgres import django_database

ROOT = Path(__file__).resolve().parent.parent
MANAGE = ROOT / "example" / "manage.py"
NAMES = ["Ann", "Bob", "Chiara"]
READS = {"Ann": 3, "Bob": 1, "Chiara": 2}  # what the demo reads, see example/blog/.../demo.py

#: Seconds a run of the demo may take (it gives its listener 30 s per step).
DEMO_TIMEOUT = 100
#: Seconds the server gets to end the demo's sessions once the demo has exited.
SESSIONS_TIMEOUT = 10.0


def connect(url: str):
    params = django_database(url)
    options = {
        "dbname": params["NAME"],
        "user": params["USER"],
        "password": params["PASSWORD"],
        "host": params["HOST"],
        "port": params["PORT"],
        **params["OPTIONS"],
    }
    connection = psycopg2.connect(**{key: value for key, value in options.items() if value})
    connection.autocommit = True
    return connection


def query(url: str, sql: str, params=()) -> list[tuple]:
    connection = connect(url)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()
    finally:
        connection.close()


@pytest.fixture
def example_database_url():
    """The URL of a new, empty database on the test session's server; dropped afterwards."""
    server_url = os.environ["DATABASE_URL"]
    name = f"example_{uuid.uuid4().hex[:12]}"
    admin = connect(server_url)
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        yield urlparse(server_url)._replace(path=f"/{name}").geturl()
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def demo_env(database_url: str) -> dict[str, str]:
    env = {**os.environ, "DATABASE_URL": database_url}
    env.pop("DJANGO_SETTINGS_MODULE", None)  # pytest-django's; the example has its own
    # This checkout may not be installed in the interpreter that runs the tests.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_demo(database_url: str) -> subprocess.CompletedProcess:
    process = start_demo(database_url, [], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = process.communicate(timeout=DEMO_TIMEOUT)
    finally:
        kill_group(process)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def start_demo(database_url: str, args: list[str], **kwargs) -> subprocess.Popen:
    # In a session of its own, so that a failing test can kill it with its listener.
    return subprocess.Popen(
        [sys.executable, str(MANAGE), "demo", *args],
        cwd=ROOT,
        env=demo_env(database_url),
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        **kwargs,
    )


def kill_group(process: subprocess.Popen) -> None:
    """If the demo is still running (the test failed), kill it and its listener."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def described(result: subprocess.CompletedProcess) -> str:
    return f"exit code {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"


def sessions(server_url: str, database: str) -> int:
    return query(
        server_url, "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [database]
    )[0][0]


def assert_demo_worked(result: subprocess.CompletedProcess, database_url: str) -> None:
    """The output reports the listener's work, the database holds it, and the listener is gone."""
    assert result.returncode == 0, described(result)
    assert result.stderr == "", described(result)  # no warnings, no tracebacks

    written = dict(
        re.findall(
            r"Author '(\w+)' created -> listener wrote post #(\d+) 'Welcome \1'", result.stdout
        )
    )
    assert sorted(written) == sorted(NAMES), described(result)
    counted = {
        name: int(count)
        for number, name, count in re.findall(
            r"Post #(\d+) 'Welcome (\w+)' read \w+(?: times)? -> listener counted read_count=(\d+)",
            result.stdout,
        )
        if written.get(name) == number
    }
    assert counted == READS, described(result)
    assert "Stopped the listener (exit code 0)" in result.stdout, described(result)

    # What the listener wrote is in the database: one welcome post per author, reads counted,
    # and no stored author message left behind.
    rows = query(
        database_url,
        "SELECT p.id, a.name, p.title, p.read_count FROM blog_post p JOIN blog_author a "
        "ON a.id = p.author_id WHERE p.id = ANY(%s)",
        [[int(number) for number in written.values()]],
    )
    assert sorted(rows) == sorted(
        (int(written[name]), name, f"Welcome {name}", READS[name]) for name in NAMES
    )
    assert query(database_url, "SELECT count(*) FROM pgpubsub_notification") == [(0,)]

    assert_no_sessions_left(database_url)


def assert_no_sessions_left(database_url: str) -> None:
    """Once the demo has exited, nothing (such as its listener) is connected to its database."""
    server_url = os.environ["DATABASE_URL"]
    database = urlparse(database_url).path.lstrip("/")
    deadline = time.monotonic() + SESSIONS_TIMEOUT
    while sessions(server_url, database) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sessions(server_url, database) == 0, "the demo left sessions (its listener?) behind"


@pytest.mark.timeout(120)
def test_demo_shows_the_listener_at_work_and_can_run_again(example_database_url):
    first = run_demo(example_database_url)
    assert_demo_worked(first, example_database_url)
    assert "Migrated" in first.stdout

    # Against a database that already holds the demo's tables and rows (a user's DATABASE_URL),
    # a second run works the same way, on new authors.
    second = run_demo(example_database_url)
    assert_demo_worked(second, example_database_url)
    assert query(example_database_url, "SELECT count(*) FROM blog_author") == [(2 * len(NAMES),)]
    assert query(example_database_url, "SELECT count(*) FROM blog_post") == [(2 * len(NAMES),)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Browser:
    """Fetches the example's pages, keeping cookies (for the CSRF token)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        )

    def get(self, path: str) -> str:
        with self.opener.open(self.base + path, timeout=5) as response:
            return response.read().decode()

    def post(self, path: str, data: dict[str, str]) -> str:
        page = self.get("/")
        data = {
            **data,
            "csrfmiddlewaretoken": re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)[
                1
            ],
        }
        with self.opener.open(self.base + path, urlencode(data).encode(), timeout=5) as response:
            return response.read().decode()

    def posts(self) -> dict[str, tuple[int, int]]:
        """Title -> (post id, read count), as the index page lists them."""
        return {
            title: (int(number), int(count))
            for number, title, count in re.findall(
                r'<a href="/posts/(\d+)/">([^<]+)</a> \((\d+) reads?\)', self.get("/")
            )
        }


def wait_for(condition, what: str, process: subprocess.Popen, output, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = condition()
        except OSError:  # the server is not up yet
            result = None
        if result:
            return result
        if process.poll() is not None or time.monotonic() >= deadline:
            output.seek(0)
            raise AssertionError(
                f"Waiting for {what}: demo exit code {process.poll()}\n{output.read()}"
            )
        time.sleep(0.1)


@pytest.mark.timeout(120)
def test_demo_serve_shows_pages_while_the_listener_works(example_database_url, tmp_path):
    port = free_port()
    browser = Browser(f"http://127.0.0.1:{port}")
    with open(tmp_path / "output", "w+") as output:
        process = start_demo(
            example_database_url,
            ["--serve", f"127.0.0.1:{port}"],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            posts = wait_for(browser.posts, "the index page", process, output, timeout=60)
            ann, reads = posts["Welcome Ann"]
            assert reads == READS["Ann"]

            # Reading a post in the browser sends PostReads; the listener counts the read.
            assert "Welcome Ann" in browser.get(f"/posts/{ann}/")
            wait_for(
                lambda: browser.posts()["Welcome Ann"] == (ann, READS["Ann"] + 1),
                "the page read to be counted",
                process,
                output,
            )
            # An author created through the form gets a welcome post from the listener.
            browser.post("/authors/", {"name": "Dora"})
            wait_for(
                lambda: "Welcome Dora" in browser.posts(), "Dora's welcome post", process, output
            )

            process.send_signal(signal.SIGTERM)  # what a process manager sends (Ctrl-C works too)
            assert process.wait(timeout=30) == 0
        finally:
            kill_group(process)
        output.seek(0)
        text = output.read()
    assert "Stopped the listener (exit code 0)" in text, text
    assert "Traceback" not in text, text
    assert_no_sessions_left(example_database_url)
