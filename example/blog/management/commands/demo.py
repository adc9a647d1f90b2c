"""``manage.py demo``: migrate, start a real ``manage.py listen`` process, give it work through
a database trigger and through ``notify()``, and show what it did."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import BaseCommand, CommandError, call_command
from django.core.servers.basehttp import get_internal_wsgi_application, run
from django.db import connection
from django.db.models import Count

from blog.channels import AuthorTriggerChannel
from blog.models import Author, Post
from pgpubsub.models import Notification

MANAGE = Path(__file__).resolve().parents[3] / "manage.py"

#: Seconds the listener gets for each step: to start listening, to write posts, to count reads.
STEP_TIMEOUT = 30.0
#: Pause between two checks of a condition, in seconds.
POLL_INTERVAL = 0.1
#: Seconds the listener gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0

#: The authors the demo creates, and how many times it reads each one's welcome post.
READS = {"Ann": 3, "Bob": 1, "Chiara": 2}


class Command(BaseCommand):
    help = (
        "Run the example end to end: migrate, start 'manage.py listen', create authors and "
        "read posts, and show what the listener did."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--serve",
            nargs="?",
            const="127.0.0.1:8000",
            metavar="ADDRPORT",
            help="Afterwards, keep the listener running and serve the blog's pages "
            "(default address 127.0.0.1:8000) until Ctrl-C.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        started = time.monotonic()
        self.verbosity = options["verbosity"]
        # SIGTERM ends the demo like Ctrl-C does: the listener is stopped, the throwaway server
        # (if any) deleted.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        self.say(f"Database: {describe_database()}")
        call_command("migrate", verbosity=max(0, self.verbosity - 1), interactive=False)
        self.say("Migrated: tables created, author insert trigger installed.")

        listener = Listener()
        try:
            listener.start()
            self.say(f"Started the listener: manage.py listen (pid {listener.pid}).")
            took = listener.wait_until_listening()
            self.say(f"It is listening (after {took:.1f}s).")
            authors = self.create_authors(listener)
            self.read_posts(listener, authors)
            if options["serve"]:
                self.serve(options["serve"])
        except KeyboardInterrupt:
            listener.stop()
            raise CommandError("Interrupted; the listener is stopped.")
        except BaseException:
            listener.stop()
            raise
        code = listener.stop()
        if self.verbosity >= 2:
            self.say("\nListener output:\n" + listener.output())
        if code not in (0, -signal.SIGTERM):
            raise CommandError(
                f"The listener exited with code {code}.\n{listener.described_output()}"
            )
        self.say(f"\nStopped the listener (exit code {code}).")
        self.say(f"Done in {time.monotonic() - started:.1f}s.")

    def serve(self, addrport: str) -> None:
        """Serve the blog in this process until Ctrl-C or SIGTERM (then return normally)."""
        host, _, port = addrport.rpartition(":")
        if not port.isdigit():
            raise CommandError(f"--serve takes an address like 127.0.0.1:8000, not {addrport!r}")
        host = host.strip("[]") or "127.0.0.1"
        self.say(
            f"\nServing the blog on http://{addrport}/ with the listener still running: create "
            "authors and read posts there. Ctrl-C stops both."
        )
        # Django's development server (runserver without its reloader and os._exit on errors).
        try:
            run(host, int(port), get_internal_wsgi_application(), ipv6=":" in host, threading=True)
        except OSError as exc:
            raise CommandError(f"Cannot serve on {addrport}: {exc}")
        except KeyboardInterrupt:
            pass

    def create_authors(self, listener: Listener) -> list[Author]:
        self.say(
            "\nCreating authors. For each insert, the trigger stores a message in the same "
            "transaction\nand notifies the listener, which writes the author's first post:"
        )
        authors = [Author.objects.create(name=name) for name in READS]
        ids = [author.pk for author in authors]

        def all_have_posts() -> bool:
            return Post.objects.filter(author_id__in=ids).values(
                "author_id"
            ).distinct().count() == len(ids)

        took = listener.wait_for(all_have_posts, "a first post for each new author")
        for author in authors:
            post = Post.objects.filter(author=author).order_by("pk").first()
            self.say(
                f"  Author '{author.name}' created -> listener wrote post #{post.pk} '{post.title}'"
            )
        posts_each = sorted(
            set(
                Post.objects.filter(author_id__in=ids)
                .values("author_id")
                .annotate(n=Count("pk"))
                .values_list("n", flat=True)
            )
        )
        each = "one post" if posts_each == [1] else f"{posts_each} posts"
        left = Notification.from_channel(AuthorTriggerChannel).count()
        self.say(f"  ({took:.1f}s; {each} per author; stored author messages left: {left})")
        return authors

    def read_posts(self, listener: Listener, authors: list[Author]) -> None:
        self.say(
            "\nReading posts. Each read sends a PostReads message with notify(); the listener "
            "counts it:"
        )
        posts = {
            author.name: Post.objects.filter(author=author).order_by("pk").first()
            for author in authors
        }
        expected = {}
        for name, post in posts.items():
            for _ in range(READS[name]):
                Post.fetch(post.pk)
            expected[post.pk] = post.read_count + READS[name]

        def counts() -> dict[int, int]:
            return dict(Post.objects.filter(pk__in=expected).values_list("pk", "read_count"))

        took = listener.wait_for(
            lambda: all(counts()[pk] >= count for pk, count in expected.items()),
            "the reads to be counted",
        )
        now = counts()
        for name, post in posts.items():
            times = "once" if READS[name] == 1 else f"{READS[name]} times"
            self.say(
                f"  Post #{post.pk} '{post.title}' read {times} -> listener counted "
                f"read_count={now[post.pk]}"
            )
        self.say(f"  ({took:.1f}s)")

    def say(self, text: str) -> None:
        if self.verbosity >= 1:
            self.stdout.write(text)


class Listener:
    """A ``manage.py listen`` subprocess, found in ``pg_stat_activity`` by its application name."""

    def __init__(self) -> None:
        self.application_name = f"pgpubsub-demo-listener-{os.getpid()}"
        self.process: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        # The child inherits DATABASE_URL (exported by the settings even for a throwaway server)
        # and so uses the same database; libpq reads PGAPPNAME for its application_name.
        env = {**os.environ, "PGAPPNAME": self.application_name, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, str(MANAGE), "listen"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def listening(self) -> bool:
        """True once the listener's connection has completed a LISTEN (and so receives)."""
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = %s AND state = 'idle' AND query ILIKE 'LISTEN%%'",
                [self.application_name],
            )
            return cursor.fetchone()[0] > 0

    def wait_until_listening(self) -> float:
        return self.wait_for(self.listening, "the listener to start listening")

    def wait_for(self, condition: Callable[[], bool], what: str) -> float:
        """Seconds until ``condition()`` held; a CommandError if the listener exits first or
        ``STEP_TIMEOUT`` passes."""
        started = time.monotonic()
        deadline = started + STEP_TIMEOUT
        while not condition():
            if self.process.poll() is not None:
                raise CommandError(
                    f"Waiting for {what}: the listener exited with code "
                    f"{self.process.returncode}.\n{self.described_output()}"
                )
            if time.monotonic() >= deadline:
                raise CommandError(
                    f"Waiting for {what}: still not done after {STEP_TIMEOUT:.0f}s.\n"
                    f"{self.described_output()}"
                )
            time.sleep(POLL_INTERVAL)
        return time.monotonic() - started

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after ``STOP_TIMEOUT``; returns the exit code."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read()

    def described_output(self) -> str:
        text = self.output().strip() or "(no output)"
        return f"Output of the listener (pid {self.pid}):\n{text}"


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
