"""``manage.py demo``: migrate, start the blog's web server as a real process, with pgpubsub's
Runtime inside it (embedded mode), make writes through its pages, and show what the listeners
running in that process did."""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from django.conf import settings
from django.core.management import BaseCommand, CommandError, call_command
from django.db import connection
from django.db.models import Count, Max

from blog.channels import AuthorTriggerChannel
from blog.models import Author, Post
from blog.tasks import send_welcome_email
from pgpubsub.connection import LISTENER_TAG
from pgpubsub.models import Notification, TaskResultRecord

MANAGE = Path(__file__).resolve().parents[3] / "manage.py"

#: Seconds each step may take: the server to serve with its Runtime listening, the posts to be
#: written, the reads to be counted, the sessions to end.
STEP_TIMEOUT = 30.0
#: Pause between two checks of a condition, in seconds.
POLL_INTERVAL = 0.1
#: Seconds the server gets to exit after Ctrl-C (its Runtime gives running callbacks
#: PGPUBSUB_SHUTDOWN_TIMEOUT, 10 s by default) before it is killed.
STOP_TIMEOUT = 20.0
#: Seconds an HTTP request to the server may take.
HTTP_TIMEOUT = 10.0

#: The authors the demo creates, and how many times it reads each one's welcome post.
READS = {"Ann": 3, "Bob": 1, "Chiara": 2}


class Command(BaseCommand):
    help = (
        "Run the example end to end in embedded mode: migrate, start the web server (with "
        "pgpubsub's Runtime inside), create authors and read posts through its pages, and show "
        "what the listeners did."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--serve",
            nargs="?",
            const="127.0.0.1:8000",
            metavar="ADDRPORT",
            help="Serve the blog on this address (default 127.0.0.1:8000) and, after the demo, "
            "keep serving it until Ctrl-C.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        started = time.monotonic()
        self.verbosity = options["verbosity"]
        if not settings.PGPUBSUB_EMBEDDED:
            raise CommandError("The demo shows embedded mode: set PGPUBSUB_EMBEDDED = True.")
        # SIGTERM ends the demo like Ctrl-C does: the web server is stopped, the throwaway
        # database server (if any) deleted. SIGINT too, even when it came in ignored (a
        # background job of a script): the web server inherits that, and stops on SIGINT.
        self.received: str | None = None  # the signal that ended the demo, said when stopping
        signal.signal(signal.SIGTERM, self._interrupt)
        signal.signal(signal.SIGINT, self._interrupt)
        self.say(f"Database: {describe_database()}")
        call_command("migrate", verbosity=max(0, self.verbosity - 1), interactive=False)
        self.say("Migrated: tables created, author insert trigger installed.")
        connection.close()  # the demo's own session is opened again when needed

        server = WebServer(options["serve"] or f"127.0.0.1:{free_port()}")
        try:
            server.start()
            self.say(
                f"\nStarted the web server: manage.py runserver --noreload {server.addrport} "
                f"(pid {server.pid})."
            )
            status, took = server.wait_for_runtime()
            self.say(
                f"PGPUBSUB_EMBEDDED = True: pgpubsub's Runtime runs inside it (after {took:.1f}s)."
                f"\n  GET /pgpubsub/status/ -> pid {status['pid']}, running, connected, "
                f"{status['workers']} worker threads, listening on {', '.join(status['channels'])}"
                f"\n  Its database sessions (application_name {server.application_name}): "
                f"{server.sessions(listening=True)} listening, {server.sessions()} in all."
            )
            posts = self.create_authors(server)
            self.show_welcome_emails(server, posts)
            self.read_posts(server, posts)
            status = server.status()
            self.say(
                f"\nThe Runtime of the web server (pid {status['pid']}): processed "
                f"{status['processed']} messages, failed {status['failed']}, queue depth "
                f"{status['queue_depth']}, in flight {status['in_flight']}."
            )
            if options["serve"]:
                self.serve(server)
        except KeyboardInterrupt:
            server.stop()
            raise CommandError(
                f"Interrupted ({self.received}); the web server and its Runtime are stopped."
            )
        except BaseException:
            server.stop()
            raise
        code = server.stop()
        if self.verbosity >= 2:
            self.say("\nWeb server output:\n" + server.output())
        if code != 0:
            raise CommandError(f"The web server exited with code {code}.\n{server.described()}")
        left = server.wait_for_no_sessions()
        why = f"{self.received} received; " if self.received else ""
        self.say(
            f"\nStopped the web server ({why}sent it SIGINT, as Ctrl-C does; exit code {code}): "
            f"its Runtime stopped with it; database sessions left: {left}."
        )
        self.say(f"Done in {time.monotonic() - started:.1f}s.")

    def create_authors(self, server: WebServer) -> dict[str, Post]:
        self.say(
            "\nCreating authors through the web page (POST /authors/). In the web server, each "
            "insert fires the\nauthor trigger, which stores a message in the same transaction; "
            "the Runtime in that process\nclaims it and writes the author's first post:"
        )
        before = Author.objects.aggregate(last=Max("pk"))["last"] or 0
        started = time.monotonic()
        for name in READS:
            server.post("/authors/", {"name": name})
        # Authors of earlier runs (against your DATABASE_URL) may have the same names.
        new = dict(Author.objects.filter(pk__gt=before, name__in=READS).values_list("name", "pk"))
        if sorted(new) != sorted(READS):
            raise CommandError(
                f"The web server created the authors {sorted(new)}, not {list(READS)}"
            )

        def posts_written() -> bool:
            return Post.objects.filter(author_id__in=new.values()).values(
                "author_id"
            ).distinct().count() == len(new)

        server.wait_for(posts_written, "a first post for each new author")
        took = time.monotonic() - started
        posts = {}
        for name in READS:
            post = Post.objects.filter(author_id=new[name]).order_by("pk").first()
            posts[name] = post
            found = re.search(r"in process (\d+)", post.content)
            writer = int(found[1]) if found else None
            where = "the web server" if writer == server.pid else "another process"
            self.say(
                f"  Author '{name}' created -> listener wrote post #{post.pk} '{post.title}' "
                f"in process {writer} ({where})"
            )
        posts_each = sorted(
            set(
                Post.objects.filter(author_id__in=new.values())
                .values("author_id")
                .annotate(n=Count("pk"))
                .values_list("n", flat=True)
            )
        )
        each = "one post" if posts_each == [1] else f"{posts_each} posts"
        left = Notification.from_channel(AuthorTriggerChannel).count()
        self.say(
            f"  ({took:.2f}s from the first POST; {each} per author; stored author messages "
            f"left: {left})"
        )
        return posts

    def show_welcome_emails(self, server: WebServer, posts: dict[str, Post]) -> None:
        self.say(
            "\nThe same POST enqueued the task send_welcome_email(author_id) in the transaction "
            "that inserted the\nauthor (Django's tasks framework, pgpubsub's backend); the "
            "Runtime in the web server ran it:"
        )
        authors = {post.author_id: name for name, post in posts.items()}
        path = send_welcome_email.module_path
        found: dict[str, int] = {}

        def done() -> bool:
            # A task's result id is that of its stored row; pgpubsub_taskresult keeps its
            # result. The demo did not enqueue the tasks (the web server did): it finds them.
            for record in TaskResultRecord.objects.filter(task_path=path, status="SUCCESSFUL"):
                args = record.payload.get("args") or [None]
                if args[0] in authors:
                    found[authors[args[0]]] = record.pk
            return len(found) == len(authors)

        server.wait_for(done, "the welcome email tasks to run")
        for name in READS:
            result = send_welcome_email.get_result(str(found[name]))
            pid = worker_pid(result.worker_ids[-1])
            where = "the web server" if pid == server.pid else "another process"
            self.say(
                f"  Author '{name}' -> task result {result.id}: {result.status.name} in process "
                f"{pid} ({where}), returned {result.return_value!r}"
            )
        lines = [line for line in server.output().splitlines() if "Sent the welcome email" in line]
        self.say("  The web server's log:" + "".join(f"\n    {line}" for line in lines))

    def read_posts(self, server: WebServer, posts: dict[str, Post]) -> None:
        self.say(
            "\nReading posts through the web page (GET /posts/<id>/). Each read sends a PostReads "
            "message with\nnotify() (a plain channel); the Runtime in the web server counts it:"
        )
        expected = {}
        started = time.monotonic()
        for name, post in posts.items():
            for _ in range(READS[name]):
                server.get(f"/posts/{post.pk}/")
            expected[post.pk] = post.read_count + READS[name]

        def counts() -> dict[int, int]:
            return dict(Post.objects.filter(pk__in=expected).values_list("pk", "read_count"))

        server.wait_for(
            lambda: all(counts()[pk] >= count for pk, count in expected.items()),
            "the reads to be counted",
        )
        took = time.monotonic() - started
        now = counts()
        for name, post in posts.items():
            times = "once" if READS[name] == 1 else f"{READS[name]} times"
            self.say(
                f"  Post #{post.pk} '{post.title}' read {times} -> listener counted "
                f"read_count={now[post.pk]}"
            )
        self.say(f"  ({took:.2f}s from the first read)")

    def serve(self, server: WebServer) -> None:
        """Keep the web server running until Ctrl-C or SIGTERM (then return normally)."""
        self.say(
            f"\nServing the blog on http://{server.addrport}/ (pid {server.pid}), with its "
            "Runtime: create authors and\nread posts there; /pgpubsub/status/ shows the Runtime. "
            "Ctrl-C stops it."
        )
        try:
            while server.process.poll() is None:
                time.sleep(POLL_INTERVAL * 5)
        except KeyboardInterrupt:
            return
        raise CommandError(
            f"The web server exited with code {server.process.returncode}.\n{server.described()}"
        )

    def _interrupt(self, signum: int, frame: Any) -> None:
        """SIGTERM ends the demo as Ctrl-C (SIGINT) does; which one came is said at the end."""
        self.received = signal.Signals(signum).name
        raise KeyboardInterrupt

    def say(self, text: str) -> None:
        if self.verbosity >= 1:
            self.stdout.write(text)
            self.stdout.flush()  # each line as it happens, also into a pipe (| tee, a log)


class WebServer:
    """``manage.py runserver --noreload ADDRPORT`` as a subprocess. With ``PGPUBSUB_EMBEDDED``,
    pgpubsub starts a Runtime in it; its database sessions carry an application name of their
    own, so that ``pg_stat_activity`` tells them apart."""

    def __init__(self, addrport: str) -> None:
        host, _, port = addrport.rpartition(":")
        if not port.isdigit():
            raise CommandError(f"--serve takes an address like 127.0.0.1:8000, not {addrport!r}")
        self.addrport = addrport if host else f"127.0.0.1:{port}"
        host = (host or "127.0.0.1").strip("[]")
        self.base = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        self.application_name = f"pgpubsub-demo-web-{os.getpid()}"
        self.process: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
        # Keeps the CSRF cookie, as a browser does.
        self._opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        # The child inherits DATABASE_URL (exported by the settings even for a throwaway server)
        # and so uses the same database; libpq reads PGAPPNAME for its application_name. In a
        # session of its own: Ctrl-C reaches the demo, which stops the server once.
        env = {**os.environ, "PGAPPNAME": self.application_name, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, str(MANAGE), "runserver", "--noreload", self.addrport],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    # -- HTTP ------------------------------------------------------------------------------

    def get(self, path: str) -> str:
        with self._opener.open(self.base + path, timeout=HTTP_TIMEOUT) as response:
            return response.read().decode()

    def post(self, path: str, data: dict[str, str]) -> str:
        """Submit a form of the blog, with the CSRF token of its home page."""
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', self.get("/"))
        data = {**data, "csrfmiddlewaretoken": token[1] if token else ""}
        with self._opener.open(
            self.base + path, urlencode(data).encode(), timeout=HTTP_TIMEOUT
        ) as response:
            return response.read().decode()

    def status(self) -> dict[str, Any]:
        """The answer of /pgpubsub/status/: the Runtime of the process that serves."""
        try:
            return json.loads(self.get("/pgpubsub/status/"))
        except urllib.error.HTTPError as exc:  # 503: no Runtime (yet)
            return json.loads(exc.read().decode())

    def wait_for_runtime(self) -> tuple[dict[str, Any], float]:
        """The status once the server answers and its Runtime is listening; and the seconds
        that took."""
        found: dict[str, Any] = {}

        def ready() -> bool:
            try:
                found.update(self.status())
            except OSError:  # not serving yet
                return False
            return bool(found.get("running") and found.get("connected"))

        took = self.wait_for(ready, "the web server to serve, with its Runtime listening")
        return found, took

    # -- the database's view ---------------------------------------------------------------

    def sessions(self, listening: bool = False) -> int:
        """The server's sessions in PostgreSQL; with ``listening``, those that LISTEN (their
        last statement is the LISTEN, or one that pgpubsub sends on its LISTEN session)."""
        sql = (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = %s"
        )
        params = [self.application_name]
        if listening:
            sql += " AND (query ILIKE 'LISTEN%%' OR query LIKE %s)"
            params.append(LISTENER_TAG + "%")
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone()[0]

    def wait_for_no_sessions(self) -> int:
        """Once the server has exited: its sessions left after PostgreSQL noticed (0)."""
        deadline = time.monotonic() + STEP_TIMEOUT
        while self.sessions() and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        return self.sessions()

    # -- waiting and stopping --------------------------------------------------------------

    def wait_for(self, condition: Callable[[], bool], what: str) -> float:
        """Seconds until ``condition()`` held; a CommandError if the server exits first or
        ``STEP_TIMEOUT`` passes."""
        started = time.monotonic()
        deadline = started + STEP_TIMEOUT
        while not condition():
            if self.process.poll() is not None:
                raise CommandError(
                    f"Waiting for {what}: the web server exited with code "
                    f"{self.process.returncode}.\n{self.described()}"
                )
            if time.monotonic() >= deadline:
                raise CommandError(
                    f"Waiting for {what}: still not done after {STEP_TIMEOUT:.0f}s.\n"
                    f"{self.described()}"
                )
            time.sleep(POLL_INTERVAL)
        return time.monotonic() - started

    def stop(self) -> int | None:
        """Ctrl-C (SIGINT: runserver exits, and its Runtime lets running callbacks finish),
        then SIGKILL after ``STOP_TIMEOUT``; returns the exit code."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read()

    def described(self) -> str:
        text = self.output().strip() or "(no output)"
        return f"Output of the web server (pid {self.pid}):\n{text}"


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_pid(worker_id: str) -> int | None:
    """The process of a task result's worker id (``host:pid:thread``)."""
    found = re.search(r":(\d+):", worker_id)
    return int(found[1]) if found else None


def describe_database() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        version = cursor.fetchone()[0].split()[0]
    if getattr(settings, "EXAMPLE_THROWAWAY_DATABASE", False):
        return f"a throwaway PostgreSQL {version} server, deleted when the demo exits"
    params = connection.settings_dict
    host = params["HOST"]
    where = f"the socket in {host}" if host.startswith("/") else host or "the local socket"
    if params["PORT"]:
        where += f":{params['PORT']}"
    return f"PostgreSQL {version} at {where}, database {params['NAME']!r} (from DATABASE_URL)"
