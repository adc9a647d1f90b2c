"""Real ``manage.py listen`` processes for acceptance tests: start them against the test
database, wait on conditions with a deadline, look at their database sessions, stop them.

Each process gets its own ``application_name`` (through the ``DATABASE_URL`` it is given), so
the test can find every database session it opened, including those of the children a
``--processes N`` supervisor starts (they inherit the environment).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from django.db import connection

from pgpubsub.connection import LISTENER_TAG

ROOT = Path(__file__).resolve().parent.parent
MANAGE = ROOT / "tests" / "manage.py"

#: Pause between two checks of a condition, in seconds.
POLL_INTERVAL = 0.05
#: Seconds a process gets to exit after SIGTERM when a test cleans up.
CLEANUP_TIMEOUT = 10.0

_names = itertools.count(1)


def database_url(application_name: str | None = None) -> str:
    """A URL of the database the test runs against (the test database), for a subprocess."""
    settings = connection.settings_dict
    user = quote(settings["USER"] or "", safe="")
    password = quote(settings["PASSWORD"] or "", safe="")
    host = settings["HOST"] or ""
    port = str(settings["PORT"] or "")
    query = {key: str(value) for key, value in settings["OPTIONS"].items()}
    if application_name:
        query["application_name"] = application_name
    if host.startswith("/"):  # a Unix socket directory
        query["host"] = host
        host = ""
    elif ":" in host:  # an IPv6 address
        host = f"[{host}]"
    netloc = f"{user}:{password}@{host}" + (f":{port}" if port else "")
    url = f"postgresql://{netloc}/{quote(settings['NAME'], safe='')}"
    return f"{url}?{urlencode(query)}" if query else url


def wait_for(
    condition: Callable[[], Any],
    timeout: float,
    what: str | Callable[[], str],
    watch: Iterable[ServerProcess] = (),
) -> Any:
    """Poll ``condition`` until it returns something truthy (and return that), or fail after
    ``timeout`` seconds. Fails at once if a process in ``watch`` exits meanwhile."""
    watch = list(watch)
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        dead = [process for process in watch if not process.alive]
        if dead or time.monotonic() >= deadline:
            described = what() if callable(what) else what
            reason = (
                ", ".join(f"{p.name} exited with code {p.returncode}" for p in dead)
                if dead
                else f"timed out after {timeout}s"
            )
            raise AssertionError(f"Waiting for {described}: {reason}{outputs(watch)}")
        time.sleep(POLL_INTERVAL)


def outputs(processes: Iterable[ServerProcess]) -> str:
    """The output of each process, for assertion messages."""
    return "".join(
        f"\n----- output of {p.name} (pid {p.pid}) -----\n{p.output()}" for p in processes
    )


#: A WHERE condition on ``pg_stat_activity``: a Runtime's LISTEN session (its last statement
#: was a LISTEN, or one of the statements a Runtime sends on that session); for a query with
#: parameters (``%`` doubled).
LISTEN_SESSION = f"(query ILIKE 'LISTEN%%' OR query LIKE '{LISTENER_TAG}%%')"


def backends(application_name: str, listening: bool = False) -> list[tuple[int, str]]:
    """(backend pid, last query) of the sessions of the test database opened under
    ``application_name``; with ``listening``, only LISTEN sessions (whose last statement was a
    LISTEN, or one of the statements a Runtime sends on its LISTEN session)."""
    params: list = [application_name]
    sql = (
        "SELECT pid, query FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = %s AND pid <> pg_backend_pid()"
    )
    if listening:
        sql += f" AND {LISTEN_SESSION}"
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return list(cursor.fetchall())


def session_states(application_name: str) -> list[str]:
    """The state (``active``, ``idle``, ``idle in transaction``...) of each session of the test
    database opened under ``application_name``."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT state FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = %s",
            [application_name],
        )
        return [row[0] for row in cursor.fetchall()]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gunicorn_command(workers: int, *options: str) -> list[str]:
    """``gunicorn`` serving the test project on a free port of 127.0.0.1 with ``workers`` sync
    workers (and ``options``)."""
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "tests.wsgi:application",
        "--bind",
        f"127.0.0.1:{free_port()}",
        "--workers",
        str(workers),
        *options,
    ]


def get_json(url: str) -> tuple[int, Any] | None:
    """(status, parsed JSON body) of a GET of ``url``, error statuses included; None while
    nothing answers there (a server that is starting)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except OSError:
        return None


def live_processes() -> list[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every live (not zombie) process, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it exited meanwhile
            continue
        # "pid (comm) state ppid pgrp ...": comm may contain spaces and parentheses.
        state, ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        if state not in ("Z", "X"):
            found.append((int(entry.name), int(ppid), int(pgrp)))
    return found


def child_pids(pid: int) -> set[int]:
    """Pids of the live (not zombie) child processes of ``pid``."""
    return {child for child, parent, _ in live_processes() if parent == pid}


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] not in ("Z", "X")


class ServerProcess:
    """A process of the test project (``manage.py listen``, gunicorn, uvicorn, runserver...)
    against the test database, with its output captured and its own ``application_name``."""

    def __init__(self, command: list[str], name: str | None = None, env: dict | None = None):
        extra_env = env
        self.name = name or f"pgpubsub-test-{os.getpid()}-{next(_names)}"
        self.args = list(command)
        self._log = tempfile.TemporaryFile(prefix="pgpubsub-process-")
        env = dict(os.environ)
        env.update(
            DATABASE_URL=database_url(self.name),
            DJANGO_SETTINGS_MODULE="tests.settings",
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
            PYTHONUNBUFFERED="1",
        )
        env.update(extra_env or {})
        self.popen = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, which cleanup can kill whole
        )
        self.pid = self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def send(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """The exit code, once the process has exited within ``timeout`` seconds."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} did not exit within {timeout}s{outputs([self])}"
            ) from None

    def children(self) -> set[int]:
        return child_pids(self.pid)

    def backends(self, listening: bool = False) -> list[tuple[int, str]]:
        return backends(self.name, listening)

    def session_states(self) -> list[str]:
        return session_states(self.name)

    def wait_listening(self, count: int = 1, timeout: float = 30.0) -> list[tuple[int, str]]:
        """Wait until exactly ``count`` of its sessions have LISTENed; returns them."""
        return wait_for(
            lambda: (found := self.backends(listening=True)) and len(found) == count and found,
            timeout,
            lambda: f"{count} LISTEN session(s) of {self.name}, have {self.backends(True)}",
            watch=[self],
        )

    def wait_no_backends(self, timeout: float = 10.0) -> None:
        wait_for(
            lambda: not self.backends(),
            timeout,
            lambda: f"the sessions of {self.name} to end, have {self.backends()}",
        )

    def stop(self) -> None:
        """Stop it and everything it started (SIGTERM, then SIGKILL), and make sure none of
        its database sessions outlives the test. For cleanup; asserts nothing."""
        descendants = self._descendants()
        if self.alive:
            self.send(signal.SIGTERM)
            try:
                self.popen.wait(CLEANUP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        for pid in [self.pid, *descendants]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(CLEANUP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        try:
            self.wait_no_backends(5.0)
        except AssertionError:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND application_name = %s",
                    [self.name],
                )
        self._log.close()

    def _descendants(self) -> set[int]:
        found: set[int] = set()
        todo = [self.pid]
        while todo:
            children = child_pids(todo.pop()) - found
            found |= children
            todo.extend(children)
        return found


class ListenProcess(ServerProcess):
    """``python tests/manage.py listen <args>``."""

    def __init__(self, *args: str, name: str | None = None, env: dict | None = None) -> None:
        super().__init__([sys.executable, str(MANAGE), "listen", *args], name=name, env=env)


class ListenProcesses:
    """The listen processes of one test; ``stop_all()`` ends every one of them."""

    def __init__(self) -> None:
        self.started: list[ListenProcess] = []

    def start(self, *args: str, ready: int | None = 1, env: dict | None = None) -> ListenProcess:
        """Start ``listen <args>`` (with ``env`` added to its environment); unless ``ready`` is
        None, wait until that many of its sessions LISTEN."""
        process = ListenProcess(*args, env=env)
        self.started.append(process)
        if ready is not None:
            process.wait_listening(ready)
        return process

    def start_command(
        self, command: list[str], ready: int | None = None, env: dict | None = None
    ) -> ServerProcess:
        """Start ``command`` in the test project; unless ``ready`` is None, wait until that
        many of its sessions LISTEN."""
        process = ServerProcess(command, env=env)
        self.started.append(process)
        if ready is not None:
            process.wait_listening(ready, timeout=60.0)
        return process

    def stop_all(self) -> None:
        for process in self.started:
            process.stop()


@contextlib.contextmanager
def no_watcher() -> Iterator[None]:
    """The watcher's advisory lock, held by a session of the test's own while in the block: no
    Runtime can watch, so rows stored without a NOTIFY are found only by sweeps (or a NOTIFY
    with their id, or a request to process them)."""
    from pgpubsub.connection import ListenConnection
    from pgpubsub.watcher import LOCK_KEY

    session = ListenConnection("default")
    session.connect()
    try:
        with session.raw.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", list(LOCK_KEY))
            assert cursor.fetchone()[0], "the watcher's lock is held already"
        yield
    finally:
        session.close()
