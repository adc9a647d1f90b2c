"""Acceptance test of the example project: ``python example/manage.py demo`` as a user runs it,
against a database of its own on the test session's server. The demo runs the example in
embedded mode: it starts the web server as a real process, with pgpubsub's Runtime inside."""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import signal
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
from tests.processes import LISTEN_SESSION, free_port

ROOT = Path(__file__).resolve().parent.parent
MANAGE = ROOT / "example" / "manage.py"
NAMES = ["Ann", "Bob", "Chiara"]
READS = {"Ann": 3, "Bob": 1, "Chiara": 2}  # what the demo reads, see example/blog/.../demo.py
CHANNELS = (
    "pgpubsub.tasks.default.default, pgpubsub.tasks.default.emails, "  # TASKS' queues
    "blog.channels.AuthorTriggerChannel, blog.channels.PostReads"
)

#: Seconds a run of the demo may take (it gives each step 30 s, the server 20 s to stop).
DEMO_TIMEOUT = 100
#: Seconds the server gets to end the demo's sessions once the demo has exited.
SESSIONS_TIMEOUT = 10.0
#: What the demo prints once its web server runs, with the server's pid.
SERVER_STARTED = re.compile(
    r"Started the web server: manage\.py runserver --noreload 127\.0\.0\.1:(\d+) \(pid (\d+)\)\."
)


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
    env.pop("PGAPPNAME", None)  # the demo names its web server's sessions
    # This checkout may not be installed in the interpreter that runs the tests.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class Demo:
    """``manage.py demo`` in a session of its own, its output in a file. ``stop_all()`` kills
    whatever is left of it (the demo and its web server, which has a session of its own)."""

    def __init__(self, database_url: str, args: list[str], output_path: Path) -> None:
        self.output_file = open(output_path, "w+")
        self.errors_file = open(output_path.with_suffix(".err"), "w+")
        self.server_pid: int | None = None
        self.process = subprocess.Popen(
            [sys.executable, str(MANAGE), "demo", *args],
            cwd=ROOT,
            env=demo_env(database_url),
            stdin=subprocess.DEVNULL,
            stdout=self.output_file,
            stderr=self.errors_file,
            text=True,
            start_new_session=True,
        )

    def output(self) -> str:
        self.output_file.seek(0)
        return self.output_file.read()

    def errors(self) -> str:
        self.errors_file.seek(0)
        return self.errors_file.read()

    def described(self) -> str:
        return (
            f"demo exit code {self.process.poll()}\n--- stdout ---\n{self.output()}\n"
            f"--- stderr ---\n{self.errors()}"
        )

    def wait_for(self, condition, what: str, timeout: float = 30.0):
        """``condition()``'s first true value; fails if the demo exits or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = condition()
            except OSError:  # the server does not answer (yet)
                result = None
            if result:
                return result
            if self.process.poll() is not None or time.monotonic() >= deadline:
                raise AssertionError(f"Waiting for {what}: {self.described()}")
            time.sleep(0.05)

    def wait_for_output(self, pattern: str | re.Pattern, timeout: float = 60.0) -> re.Match:
        found = self.wait_for(
            lambda: re.search(pattern, self.output()), f"{pattern!r} in the output", timeout
        )
        if self.server_pid is None and (started := SERVER_STARTED.search(self.output())):
            self.server_pid = int(started[2])
        return found

    def stop_all(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if self.server_pid is not None and alive(self.server_pid):
            os.killpg(self.server_pid, signal.SIGKILL)
        self.output_file.close()
        self.errors_file.close()


@pytest.fixture
def demos(tmp_path):
    """Starts demos (``demos.start(url, *args)``); kills what is left of them after the test."""
    started: list[Demo] = []

    class Demos:
        @staticmethod
        def start(database_url: str, *args: str) -> Demo:
            demo = Demo(database_url, list(args), tmp_path / f"demo-{len(started)}.out")
            started.append(demo)
            return demo

    yield Demos
    for demo in started:
        demo.stop_all()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def sessions(server_url: str, database: str) -> int:
    return query(
        server_url, "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [database]
    )[0][0]


def listening_sessions(database_url: str) -> list[str]:
    """The application names of the sessions that LISTEN in the database."""
    return [
        name
        for (name,) in query(
            database_url,
            "SELECT application_name FROM pg_stat_activity WHERE datname = current_database() "
            f"AND {LISTEN_SESSION} AND pid <> pg_backend_pid()",
        )
    ]


def assert_no_sessions_left(database_url: str) -> None:
    """Once the demo has exited, nothing (such as its web server) is connected to its database."""
    server_url = os.environ["DATABASE_URL"]
    database = urlparse(database_url).path.lstrip("/")
    deadline = time.monotonic() + SESSIONS_TIMEOUT
    while sessions(server_url, database) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sessions(server_url, database) == 0, "the demo left sessions (its web server?) behind"


def run_demo(demos, database_url: str) -> tuple[Demo, str]:
    demo = demos.start(database_url)
    try:
        demo.process.wait(DEMO_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"The demo still runs after {DEMO_TIMEOUT}s: {demo.described()}")
    assert demo.process.returncode == 0, demo.described()
    assert demo.errors() == "", demo.described()  # no warnings, no tracebacks
    demo.wait_for_output(SERVER_STARTED, timeout=0)
    return demo, demo.output()


def assert_demo_worked(demo: Demo, output: str, database_url: str) -> None:
    """The output shows the web server's Runtime at work, the database holds what its listeners
    wrote, and the server is gone with its sessions."""
    server = demo.server_pid
    assert server is not None and server != demo.process.pid, output

    # The Runtime runs inside the web server's process.
    assert (
        f"GET /pgpubsub/status/ -> pid {server}, running, connected, 2 worker threads, "
        f"listening on {CHANNELS}"
    ) in output, output
    assert re.search(r"Its database sessions \(application_name [\w-]+\): 1 listening", output)

    # A trigger message per author: the listener in the web server wrote the first post.
    written = {
        name: (number, int(pid))
        for name, number, pid, where in re.findall(
            r"Author '(\w+)' created -> listener wrote post #(\d+) 'Welcome \1' in process (\d+) "
            r"\(([\w ]+)\)",
            output,
        )
        if where == "the web server"
    }
    assert sorted(written) == sorted(NAMES), output
    assert {pid for _, pid in written.values()} == {server}, output
    assert "one post per author; stored author messages left: 0" in output, output
    # A plain message per read: the listener in the web server counted it.
    counted = {
        name: int(count)
        for number, name, count in re.findall(
            r"Post #(\d+) 'Welcome (\w+)' read \w+(?: times)? -> listener counted read_count=(\d+)",
            output,
        )
        if written.get(name, (None,))[0] == number
    }
    assert counted == READS, output
    # A welcome email task per author, enqueued by the view with the insert: the web server's
    # Runtime ran it once, and its result (kept in pgpubsub_taskresult) says so.
    emails = {
        name: (int(result), int(pid))
        for name, result, pid in re.findall(
            r"Author '(\w+)' -> task result (\d+): SUCCESSFUL in process (\d+) \(the web server\), "
            r"returned 'Welcome to the blog, \1'",
            output,
        )
    }
    assert sorted(emails) == sorted(NAMES), output
    assert {pid for _, pid in emails.values()} == {server}, output
    for name in NAMES:
        assert re.search(
            rf"INFO blog\.tasks: Sent the welcome email of author \d+ in process {server}: "
            rf"'Hello {name}, welcome to the blog!",
            output,
        ), output
    results = query(
        database_url,
        "SELECT r.id, a.name, r.status, r.return_value #>> '{}', jsonb_array_length(r.worker_ids) "
        "FROM pgpubsub_taskresult r JOIN blog_author a ON a.id = (r.payload -> 'args' ->> 0)::int "
        "WHERE r.task_path = 'blog.tasks.send_welcome_email' AND r.id = ANY(%s)",
        [[result for result, _ in emails.values()]],
    )
    assert sorted(results) == sorted(
        (emails[name][0], name, "SUCCESSFUL", f"Welcome to the blog, {name}", 1) for name in NAMES
    ), results
    processed = 2 * len(NAMES) + sum(READS.values())  # trigger messages, tasks, reads
    assert (
        f"The Runtime of the web server (pid {server}): processed {processed} messages, "
        "failed 0, queue depth 0, in flight 0."
    ) in output, output
    assert (
        "Stopped the web server (sent it SIGINT, as Ctrl-C does; exit code 0): its Runtime "
        "stopped with it; database sessions left: 0."
    ) in output, output

    # What the listeners wrote is in the database: one welcome post per author, written in the
    # web server's process, reads counted, and no stored author message left behind.
    rows = query(
        database_url,
        "SELECT p.id, a.name, p.title, p.read_count, p.content FROM blog_post p "
        "JOIN blog_author a ON a.id = p.author_id WHERE p.id = ANY(%s)",
        [[int(number) for number, _ in written.values()]],
    )
    assert sorted(row[:4] for row in rows) == sorted(
        (int(written[name][0]), name, f"Welcome {name}", READS[name]) for name in NAMES
    )
    assert all(row[4].endswith(f"in process {server}.") for row in rows), rows
    assert query(database_url, "SELECT count(*) FROM pgpubsub_notification") == [(0,)]

    assert not alive(server), f"the web server (pid {server}) still runs"
    assert_no_sessions_left(database_url)


@pytest.mark.timeout(2 * DEMO_TIMEOUT + 30)
def test_demo_runs_the_listeners_inside_the_web_server_and_can_run_again(
    demos, example_database_url
):
    demo, output = run_demo(demos, example_database_url)
    assert_demo_worked(demo, output, example_database_url)
    assert "Migrated" in output

    # Against a database that already holds the demo's tables and rows (a user's DATABASE_URL),
    # a second run works the same way, on new authors, with a new web server.
    again, output = run_demo(demos, example_database_url)
    assert_demo_worked(again, output, example_database_url)
    assert again.server_pid != demo.server_pid
    assert query(example_database_url, "SELECT count(*) FROM blog_author") == [(2 * len(NAMES),)]
    assert query(example_database_url, "SELECT count(*) FROM blog_post") == [(2 * len(NAMES),)]


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


@pytest.mark.timeout(DEMO_TIMEOUT + 30)
def test_demo_serve_keeps_the_web_server_and_its_runtime_until_stopped(demos, example_database_url):
    port = free_port()
    browser = Browser(f"http://127.0.0.1:{port}")
    demo = demos.start(example_database_url, "--serve", f"127.0.0.1:{port}")
    demo.wait_for_output(rf"Serving the blog on http://127\.0\.0\.1:{port}/ \(pid (\d+)\)")
    server = demo.server_pid
    assert f"127.0.0.1:{port} (pid {server})" in demo.output()

    # The page served is the one the demo wrote to and read, through the web server.
    ann, reads = browser.posts()["Welcome Ann"]
    assert reads == READS["Ann"]
    status = json.loads(browser.get("/pgpubsub/status/"))
    assert status["pid"] == server and status["running"] and status["connected"]
    # One process LISTENs to the database: the web server (not the demo itself).
    assert [
        name.startswith("pgpubsub-demo-web-") for name in listening_sessions(example_database_url)
    ] == [True]

    # Reading a post in the browser sends PostReads; the web server's Runtime counts the read.
    assert "Welcome Ann" in browser.get(f"/posts/{ann}/")
    demo.wait_for(
        lambda: browser.posts()["Welcome Ann"] == (ann, READS["Ann"] + 1),
        "the page read to be counted",
    )
    # An author created through the form gets a welcome post written in the web server.
    browser.post("/authors/", {"name": "Dora"})
    dora = demo.wait_for(lambda: browser.posts().get("Welcome Dora"), "Dora's welcome post")
    assert f"in process {server}." in browser.get(f"/posts/{dora[0]}/")

    demo.process.send_signal(signal.SIGTERM)  # what a process manager sends (Ctrl-C works too)
    assert demo.process.wait(timeout=30) == 0
    output = demo.output()
    assert (
        "Stopped the web server (SIGTERM received; sent it SIGINT, as Ctrl-C does; exit code "
        "0): its Runtime stopped with it; database sessions left: 0."
    ) in output, demo.described()
    assert demo.errors() == "", demo.described()
    assert not alive(server)
    assert_no_sessions_left(example_database_url)


@pytest.mark.timeout(DEMO_TIMEOUT + 30)
def test_interrupted_demo_stops_its_web_server(demos, example_database_url):
    demo = demos.start(example_database_url)
    demo.wait_for_output(SERVER_STARTED)
    server = demo.server_pid

    demo.process.send_signal(signal.SIGINT)  # Ctrl-C, whatever the demo is doing
    assert demo.process.wait(timeout=30) == 1, demo.described()
    assert demo.errors() == (
        "CommandError: Interrupted (SIGINT); the web server and its Runtime are stopped.\n"
    ), demo.described()
    assert not alive(server)
    assert_no_sessions_left(example_database_url)
