"""The LISTEN side of a database connection, over psycopg2 or psycopg 3 (whichever Django uses).

:class:`ListenConnection` is a dedicated autocommit connection built from the Django settings
of one alias; it only LISTENs and waits, callbacks never run on it. :func:`drain` reads what has
arrived on any raw connection without a round trip to the server. :func:`probe_channel` and
:func:`send_notification` let a Runtime prove that notifications reach a LISTEN connection (they
do not through a transaction-pooling PgBouncer). :func:`sqlstate` reads the SQLSTATE of an error
of either driver.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import select
from collections.abc import Iterable
from typing import Any

from django.db import connections
from django.db.backends.postgresql import psycopg_any
from django.db.utils import InterfaceError, OperationalError

logger = logging.getLogger(__name__)

#: libpq TCP keepalive settings of LISTEN connections: probe after 30 s of silence, every 10 s,
#: give up after 3 unanswered probes.
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

#: The start of the name of a probe channel: a channel of one LISTEN connection's own.
PROBE_PREFIX = "pgpubsub_probe_"


def quote_channel(name: str) -> str:
    """``name`` quoted for LISTEN/UNLISTEN; names that are not plain identifiers are refused."""
    if not _IDENTIFIER.match(name):
        raise ValueError(f"{name!r} is not a valid channel name (letters, digits, _; max 63)")
    return f'"{name}"'


def probe_channel() -> str:
    """A new channel name that no one else LISTENs on (39 characters, a plain identifier)."""
    return PROBE_PREFIX + secrets.token_hex(12)


def send_notification(alias: str, channel: str, payload: str, timeout: float) -> None:
    """NOTIFY ``channel`` with ``payload`` as producers do: through ``alias``, on a session of
    its own (closed at once), committed. Connecting gives up after ``timeout`` seconds."""
    db = connections.create_connection(alias)
    # libpq's default is to wait for ever; the alias's own connect_timeout wins.
    db.settings_dict = {
        **db.settings_dict,
        "OPTIONS": {
            "connect_timeout": max(2, round(timeout)),
            **db.settings_dict.get("OPTIONS", {}),
        },
    }
    try:
        with db.cursor() as cursor:  # autocommit, as Django's connections are by default
            cursor.execute("SELECT pg_notify(%s, %s)", [channel, payload])
        if not db.get_autocommit():
            db.commit()
    finally:
        db.close()


def one_line(exc: BaseException) -> str:
    """``exc``'s text on one line: drivers' messages span several (``server closed the
    connection unexpectedly\n\tThis probably means...``), and one event is one log line."""
    return " ".join(str(exc).split())


# The notification type of the driver Django uses (psycopg 3 when both are installed), as
# pgpubsub.compatibility exposes it.
if psycopg_any.is_psycopg3:
    from psycopg import Notify  # noqa: F401
else:
    from psycopg2.extensions import Notify  # noqa: F401


def is_psycopg3(raw: Any) -> bool:
    return hasattr(raw, "pgconn")


#: SQLSTATEs of a statement that names a column (``42703``) or a table (``42P01``) the database
#: does not have.
UNDEFINED_COLUMN = "42703"
UNDEFINED_TABLE = "42P01"


def sqlstate(exc: BaseException | None) -> str | None:
    """The SQLSTATE of a database error: Django's (the driver's error is its ``__cause__``) or
    the driver's own, psycopg2 (``pgcode``) or psycopg 3 (``sqlstate``). None for other errors."""
    while exc is not None:
        code = getattr(exc, "pgcode", None) or getattr(exc, "sqlstate", None)
        if code:
            return code
        exc = exc.__cause__
    return None


class NotifyBuffer:
    """Notifications a psycopg 3 connection delivered while it ran a statement, appended to
    ``items`` as they arrive (psycopg 2 keeps them in ``connection.notifies`` itself)."""

    def __init__(self, raw: Any) -> None:
        self.items: list[Any] = []
        self._raw = raw
        raw.add_notify_handler(self._received)

    def _received(self, notification: Any) -> None:
        self.items.append(notification)  # ``items`` may be replaced: look it up each time

    def close(self) -> None:
        try:
            self._raw.remove_notify_handler(self._received)
        except ValueError:
            pass


class Received:
    """The notifications a Django connection receives while it runs queries, in the mutable
    list ``items`` that :meth:`poll` extends: psycopg 2's own ``connection.notifies``, or, for
    psycopg 3, a :class:`NotifyBuffer`'s list."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self._buffer = NotifyBuffer(raw) if is_psycopg3(raw) else None

    @property
    def items(self) -> list[Any]:
        return self.raw.notifies if self._buffer is None else self._buffer.items

    @items.setter
    def items(self, value: list[Any]) -> None:
        if self._buffer is None:
            self.raw.notifies = value
        else:
            self._buffer.items = value

    def poll(self) -> None:
        """Read what has arrived into ``items``, without a round trip."""
        if self._buffer is None:
            self.raw.poll()
        else:
            self._buffer.items.extend(drain(self.raw))

    def close(self) -> None:
        if self._buffer is not None:
            self._buffer.close()


def drain(raw: Any, buffer: NotifyBuffer | None = None) -> list[Any]:
    """Every notification received so far on ``raw``, oldest first; never blocks.

    Each item has ``channel``, ``payload`` and ``pid``. Raises the driver's OperationalError
    when the connection is broken.
    """
    if not is_psycopg3(raw):
        raw.poll()
        items = list(raw.notifies)
        del raw.notifies[:]
        return items
    import psycopg

    items = []
    if buffer is not None:
        items.extend(buffer.items)
        del buffer.items[:]
    pgconn = raw.pgconn
    pgconn.consume_input()
    if pgconn.status != psycopg.pq.ConnStatus.OK:
        raise psycopg.OperationalError("the connection to the server was lost")
    encoding = raw.info.encoding or "utf-8"
    while True:
        item = pgconn.notifies()
        if item is None:
            return items
        items.append(
            psycopg.Notify(item.relname.decode(encoding), item.extra.decode(encoding), item.be_pid)
        )


#: Starts every statement a Runtime sends on its LISTEN session besides LISTEN itself (the
#: watcher's, the looks for due rows), so that ``pg_stat_activity`` tells that session apart.
LISTENER_TAG = "/* pgpubsub listener */ "


class ListenConnection:
    """A dedicated autocommit connection that LISTENs on channels and waits for notifications."""

    def __init__(self, alias: str = "default") -> None:
        self.alias = alias
        self._db = None
        self._buffer: NotifyBuffer | None = None
        self.channels: list[str] = []

    @property
    def raw(self) -> Any:
        return self._db.connection

    @property
    def connected(self) -> bool:
        return self._db is not None and self._db.connection is not None

    def connect(self) -> None:
        """Open the connection (closing any previous one)."""
        self.close()
        db = connections.create_connection(self.alias)
        # TCP keepalives find a peer that vanished (a network partition) while we only wait;
        # the alias's own OPTIONS win.
        db.settings_dict = {
            **db.settings_dict,
            "OPTIONS": {**KEEPALIVES, **db.settings_dict.get("OPTIONS", {})},
        }
        try:
            db.ensure_connection()
            if not db.get_autocommit():
                db.set_autocommit(True)
        except BaseException:
            db.close()
            raise
        self._db = db
        if is_psycopg3(self.raw):
            self._buffer = NotifyBuffer(self.raw)

    def listen(self, channels: Iterable[str]) -> None:
        """LISTEN on each channel (in addition to the current ones)."""
        names = [name for name in channels if name not in self.channels]
        if not names:
            return
        statement = "; ".join(f"LISTEN {quote_channel(name)}" for name in names)
        with self.raw.cursor() as cursor:
            cursor.execute(statement)
        self.channels.extend(names)

    def ping(self) -> None:
        """A round trip to the server (raises when the connection is broken)."""
        with self.raw.cursor() as cursor:
            cursor.execute("SELECT 1")

    def drain(self) -> list[Any]:
        """Notifications received so far; never blocks."""
        return drain(self.raw, self._buffer)

    def close(self) -> None:
        """UNLISTEN and close; safe to call on a broken or closed connection."""
        db, self._db = self._db, None
        buffer, self._buffer = self._buffer, None
        if buffer is not None:
            buffer.close()
        if db is None:
            return
        try:
            if db.connection is not None and self.channels:
                with db.connection.cursor() as cursor:
                    cursor.execute("UNLISTEN *")
        except Exception:  # the connection may already be gone; closing is what matters
            logger.debug("UNLISTEN failed while closing", exc_info=True)
        try:
            db.close()
        except Exception:
            logger.debug("Closing the listen connection failed", exc_info=True)
        finally:
            self.channels = []


def wait_any(
    listening: list[ListenConnection], timeout: float, wakeup: int | None = None
) -> list[Any]:
    """Notifications that arrive on any of ``listening`` within ``timeout`` seconds; returns
    early (maybe with none) when something is written to the file descriptor ``wakeup``."""
    items = [item for conn in listening for item in conn.drain()]
    if items:
        return items
    by_fd = {conn.raw.fileno(): conn for conn in listening}
    readable, _, _ = select.select(
        [*by_fd, *([wakeup] if wakeup is not None else [])], [], [], timeout
    )
    if wakeup is not None and wakeup in readable:
        try:
            while os.read(wakeup, 4096):
                pass
        except BlockingIOError:
            pass
    return [item for fd in readable if fd in by_fd for item in by_fd[fd].drain()]


# -- Django connections of the threads that process messages -------------------------------


def is_connection_error(exc: BaseException | None) -> bool:
    """True for a lost or refused connection, from Django or straight from either driver (whose
    classes are matched by name: psycopg2 and psycopg 3 do not share a base class)."""
    while exc is not None:
        if isinstance(exc, OSError | InterfaceError | OperationalError):
            return True
        if any(cls.__name__ in ("OperationalError", "InterfaceError") for cls in type(exc).__mro__):
            return True
        exc = exc.__cause__
    return False


def is_broken(raw: Any) -> bool:
    """True when the driver connection ``raw`` was closed or found broken: psycopg2 sets
    ``closed``, psycopg 3 ``broken``, when an operation on it failed for that reason."""
    return bool(getattr(raw, "closed", False)) or bool(getattr(raw, "broken", False))


def open_raw(alias: str) -> Any:
    """The driver connection of this thread's Django connection to ``alias`` (opened if need
    be): what a unit of work runs on, to tell afterwards whether it was lost."""
    db = connections[alias]
    db.ensure_connection()
    return db.connection


def lost(alias: str, used: Any | None) -> bool:
    """After a failure: True when the connection the work ran on (``used``; None if the work
    did not need one) broke. A broken connection is closed; Django may already have replaced it
    (``atomic()`` does when its rollback fails).

    The driver tells, without a query: in a transaction that a listener's database error
    aborted, a query would fail too, and that is no lost connection."""
    db = connections[alias]
    if used is not None and db.connection is not used:
        return True
    if db.connection is None or not is_broken(db.connection):
        return False
    db.close()
    return True


def tidy_connections() -> None:
    """What ``close_old_connections()`` does between requests, for a long-running worker:
    close the connections that broke, and those older than a positive ``CONN_MAX_AGE``. With
    ``CONN_MAX_AGE = 0`` (Django's default, meant for requests), a working connection is kept:
    reconnecting for every delivery would cost milliseconds each time."""
    for db in connections.all(initialized_only=True):
        if db.settings_dict.get("CONN_MAX_AGE") == 0:
            if db.connection is not None and db.errors_occurred:
                db.errors_occurred = False
                if not db.is_usable():
                    db.close()
        else:
            db.close_if_unusable_or_obsolete()


def close_if_unusable(alias: str) -> None:
    """Close this thread's connection to ``alias`` if it no longer works (one round trip)."""
    db = connections[alias]
    if db.connection is not None and not db.is_usable():
        db.close()
