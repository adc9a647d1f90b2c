"""A real PgBouncer in front of the test session's PostgreSQL, in transaction or session pooling
mode, for the tests of what a Runtime does behind one.

It listens on 127.0.0.1 on a free port and forwards every database name to the server the tests
run against (its Unix socket directory or host, and port), as the same user, with no password
check (``auth_type = any``). The ``pgbouncer`` program comes from the Debian package of that name
(``apt-get install -y pgbouncer``); without it the fixtures fail, they never skip.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import psycopg2
from django.db import connections

from tests.processes import free_port

#: Seconds PgBouncer gets to accept connections after it starts, and to exit when stopped.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
#: Pause between two connection attempts while PgBouncer starts, in seconds.
CONNECT_INTERVAL = 0.05
#: Where Debian installs the program (not on the PATH of every user).
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def executable() -> str:
    """The path of the ``pgbouncer`` program; AssertionError saying how to install it if none."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path=os.pathsep.join(SBIN))
    if found is None:
        raise AssertionError(
            "pgbouncer is not installed, and the PgBouncer tests need it: apt-get install -y "
            "pgbouncer (Debian/Ubuntu), or put a pgbouncer program on the PATH"
        )
    return found


class PgBouncer:
    """A PgBouncer process in front of the server of ``settings_dict`` (a Django ``DATABASES``
    entry of the test database), running once constructed; ``stop()`` ends it."""

    def __init__(self, settings_dict: dict[str, Any], pool_mode: str, pool_size: int = 1):
        self.upstream = settings_dict
        self.pool_mode = pool_mode
        self.host = "127.0.0.1"
        self.port = free_port()
        self.user = settings_dict["USER"] or "postgres"
        self.database = settings_dict["NAME"]
        self._dir = Path(tempfile.mkdtemp(prefix="pgpubsub-pgbouncer-"))
        self.pool_size = pool_size
        host = settings_dict["HOST"] or "127.0.0.1"
        self._server = f"host={host} port={settings_dict['PORT'] or 5432} user={self.user}"
        if settings_dict.get("PASSWORD"):
            self._server += f" password={settings_dict['PASSWORD']}"
        self._write_config()
        command = [executable(), str(self._dir / "pgbouncer.ini")]
        if os.geteuid() == 0:
            # PgBouncer refuses to run as root. Run it as the owner of the server's socket
            # directory (which only that user may enter), or as nobody for a TCP server.
            user = pwd.getpwuid(os.stat(host).st_uid).pw_name if host.startswith("/") else "nobody"
            shutil.chown(self._dir, user)
            for path in self._dir.iterdir():
                shutil.chown(path, user)
            command[1:1] = ["-u", user]
        self._output = tempfile.TemporaryFile(prefix="pgpubsub-pgbouncer-")
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self._output, stderr=subprocess.STDOUT
        )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def _write_config(self) -> None:
        (self._dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = {self._server}\n"
            "[pgbouncer]\n"
            f"listen_addr = {self.host}\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = any\n"
            f"pool_mode = {self.pool_mode}\n"
            # One server connection per database and user by default: clients of a
            # transaction-pooling PgBouncer then surely share it, one transaction after another.
            f"default_pool_size = {self.pool_size}\n"
            "max_client_conn = 200\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            f"logfile = {self._dir / 'pgbouncer.log'}\n"
            f"pidfile = {self._dir / 'pgbouncer.pid'}\n"
        )

    def reload(self, pool_mode: str) -> None:
        """Switch to ``pool_mode`` as an operator would: edit the configuration, send SIGHUP.
        Clients connecting from then on get it."""
        self.pool_mode = pool_mode
        self._write_config()
        self.process.send_signal(signal.SIGHUP)

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"pgbouncer exited with code {self.process.returncode}")
            try:
                conn = psycopg2.connect(**self.connect_kwargs())
            except psycopg2.OperationalError:
                if time.monotonic() >= deadline:
                    raise AssertionError(
                        f"pgbouncer accepted no connection within {START_TIMEOUT}s{self.output()}"
                    ) from None
                time.sleep(CONNECT_INTERVAL)
                continue
            try:
                with conn.cursor() as cursor:
                    cursor.execute("SELECT 1")
            finally:
                conn.close()
            return

    def connect_kwargs(self, **extra: Any) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "dbname": self.database,
            "user": self.user,
            **extra,
        }

    def connect(self, autocommit: bool = True) -> Any:
        """A new psycopg2 connection to the test database through this PgBouncer."""
        conn = psycopg2.connect(**self.connect_kwargs())
        conn.autocommit = autocommit
        return conn

    def url(self, **params: str) -> str:
        """A ``DATABASE_URL`` of the test database through this PgBouncer."""
        query = f"?{urlencode(params)}" if params else ""
        return (
            f"postgresql://{quote(self.user, safe='')}@{self.host}:{self.port}/"
            f"{quote(self.database, safe='')}{query}"
        )

    def settings(self, **extra: Any) -> dict[str, Any]:
        """A Django ``DATABASES`` entry of the test database through this PgBouncer."""
        options = {
            key: value for key, value in self.upstream.get("OPTIONS", {}).items() if key != "host"
        }
        return {
            **self.upstream,
            "HOST": self.host,
            "PORT": str(self.port),
            "OPTIONS": options,
            "TEST": {"MIRROR": "default"},
            **extra,
        }

    def output(self) -> str:
        """What PgBouncer logged, for assertion messages."""
        parts = []
        with contextlib.suppress(OSError):
            self._output.seek(0)
            parts.append(self._output.read().decode("utf-8", "replace"))
        with contextlib.suppress(OSError):
            parts.append((self._dir / "pgbouncer.log").read_text(errors="replace"))
        return f"\n----- pgbouncer ({self.pool_mode} pooling) -----\n" + "".join(parts)

    def stop(self) -> None:
        """End PgBouncer (and with it its server connections) and delete its files."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # at once: the tests are done with it
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        self._output.close()
        shutil.rmtree(self._dir, ignore_errors=True)


@contextlib.contextmanager
def rerouted(alias: str, settings_dict: dict[str, Any]) -> Iterator[None]:
    """Meanwhile ``DATABASES[alias]`` is ``settings_dict`` (e.g. the test database through a
    PgBouncer), for this thread and those started meanwhile. The test must be allowed to use
    ``alias`` (``django_db(databases=[...])``): a mirror of ``default``, such as ``side``."""
    configured = connections.settings[alias]  # the dict of settings.DATABASES itself
    saved = dict(configured)
    connections[alias].close()
    configured.clear()
    configured.update({**saved, **settings_dict})
    try:
        yield
    finally:
        connections[alias].close()
        configured.clear()
        configured.update(saved)
