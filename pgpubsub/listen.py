"""The processing entry points of django-pgpubsub 1.x: ``listen()``, ``listen_to_channels()``,
``process_notifications()`` and the ``POLL`` flag."""

from __future__ import annotations

import logging
import random
import threading
from typing import Any

from django.db import connections
from django.db.utils import InterfaceError, OperationalError

from pgpubsub import conf
from pgpubsub.channel import BaseChannel, ChannelNotFound, select_channels
from pgpubsub.connection import ListenConnection, NotifyBuffer, drain, is_psycopg3, quote_channel
from pgpubsub.processing import Processor
from pgpubsub.wire import Assembler

logger = logging.getLogger(__name__)

#: While True, ``listen()`` keeps waiting for notifications. With False, ``listen(recover=True)``
#: processes the stored notifications and returns.
POLL = True

#: Seconds between checks of the stop flag while waiting for notifications.
WAIT_TIMEOUT = 1.0
#: Longest pause between reconnection attempts, in seconds.
MAX_RECONNECT_DELAY = 30.0

# The stop events of the listen() calls running now (several threads may each run one).
_running: set[threading.Event] = set()
_running_lock = threading.Lock()


def _selected(channels: list[Any] | None) -> dict[type[BaseChannel], list]:
    selected = select_channels(channels)
    if not selected:
        raise ChannelNotFound(
            "Channel not found! No listeners are registered for "
            f"{'any channel' if channels is None else channels}: import the modules that define "
            "them (usually in AppConfig.ready())."
        )
    return selected


class ConnectionWrapper:
    """A LISTENing Django connection as ``listen_to_channels()`` returns it: ``poll()`` reads what
    has arrived into the mutable ``notifies`` list; ``stop()`` stops collecting."""

    def __init__(self, raw: Any) -> None:
        self.connection = raw
        self.assembler = Assembler()
        # psycopg 3 hands notifications to a handler while the connection runs queries; the
        # buffer's list plays the part of psycopg 2's ``connection.notifies``.
        self._buffer = NotifyBuffer(raw) if is_psycopg3(raw) else None

    @property
    def notifies(self) -> list[Any]:
        if self._buffer is None:
            return self.connection.notifies
        return self._buffer.items

    @notifies.setter
    def notifies(self, value: list[Any]) -> None:
        if self._buffer is None:
            self.connection.notifies = value
        else:
            self._buffer.items = value

    def poll(self) -> None:
        if self._buffer is None:
            self.connection.poll()
        else:
            self._buffer.items.extend(drain(self.connection))

    def stop(self) -> None:
        if self._buffer is not None:
            self._buffer.close()


def listen_to_channels(channels: list[Any] | None = None) -> ConnectionWrapper:
    """LISTEN to the selected channels (all with listeners by default) on this thread's Django
    connection; notifications then arrive as that connection runs queries or polls."""
    selected = _selected(channels)
    connection = connections[conf.notifications_alias()]
    connection.ensure_connection()
    wrapper = ConnectionWrapper(connection.connection)  # collecting before the first LISTEN
    with connection.cursor() as cursor:
        for channel_cls in selected:
            logger.info("Listening on %s", channel_cls.name())
            cursor.execute(f"LISTEN {quote_channel(channel_cls.listen_safe_name())}")
    return wrapper


def process_notifications(connection_wrapper: ConnectionWrapper) -> None:
    """Process every notification that has arrived, in arrival order, on this thread.

    As in django-pgpubsub 1.x, a listener's exception reaches the caller: here once everything
    that had arrived was processed (the first exception, when there are several)."""
    processor = Processor(conf.notifications_alias(), raise_errors=True)
    connection_wrapper.poll()
    while connection_wrapper.notifies:
        # Take what has arrived; more may arrive (on this connection) while it is processed.
        arrived = list(connection_wrapper.notifies)
        del connection_wrapper.notifies[: len(arrived)]
        processor.process_many(_whole_messages(connection_wrapper.assembler, arrived))
        if not connection_wrapper.notifies:
            connection_wrapper.poll()


def _whole_messages(assembler: Assembler, notifications: list[Any]) -> list[tuple[str, str]]:
    """(channel, text) of each whole message among ``notifications`` (chunks are collected)."""
    whole = []
    for notification in notifications:
        text = assembler.feed(notification.channel, notification.payload)
        if text is not None:
            whole.append((notification.channel, text))
    return whole


def recover(channels: list[Any] | None = None, processor: Processor | None = None) -> int:
    """Process every stored notification of the selected lockable channels on this thread."""
    processor = processor or Processor(conf.notifications_alias())
    return sum(
        processor.process_stored_channel(channel_cls)
        for channel_cls in _selected(channels)
        if channel_cls.lock_notifications
    )


def stop() -> None:
    """Make every running ``listen()`` return after the message in hand."""
    with _running_lock:
        for event in _running:
            event.set()


def listen(
    channels: list[Any] | None = None,
    recover: bool = False,
    autorestart_on_failure: bool = True,
    start_method: str = "spawn",
) -> None:
    """Listen to the selected channels and process their notifications until ``stop()`` (or
    ``POLL = False``). A lost connection is re-opened, re-LISTENed and followed by a recovery of
    stored notifications, so nothing stored is missed."""
    selected = _selected(channels)
    conf.listener_filter_provider()  # a broken PGPUBSUB_LISTENER_FILTER fails here, once
    names = [channel_cls.listen_safe_name() for channel_cls in selected]
    alias = conf.notifications_alias()
    stopping = threading.Event()
    processor = Processor(alias, stopping=stopping)
    assembler = Assembler()
    conn = ListenConnection(conf.database_alias())
    delay = 0.5
    catch_up = recover
    with _running_lock:
        _running.add(stopping)
    try:
        while not stopping.is_set():
            try:
                if not conn.connected:
                    conn.connect()
                    conn.listen(names)
                    logger.info("Listening on %s", ", ".join(cls.name() for cls in selected))
                if catch_up:
                    _recover(channels, processor)
                    catch_up = False
                if not POLL:
                    return
                received = conn.wait(WAIT_TIMEOUT)
                if received:
                    tidy_connections()
                processor.process_many(_whole_messages(assembler, received))
                if processor.catch_up_needed:  # the processing connection broke meanwhile
                    processor.catch_up_needed = False
                    catch_up = True
                delay = 0.5
            except Exception as exc:
                if not _is_connection_error(exc):
                    raise
                conn.close()
                connections[alias].close()  # the processing connection may be the broken one
                pause = min(MAX_RECONNECT_DELAY, delay) * random.uniform(0.5, 1.0)
                logger.warning(
                    "Lost the database connection (%s); reconnecting in %.1fs", exc, pause
                )
                stopping.wait(pause)
                delay *= 2
                catch_up = True  # notifications sent while disconnected are only in the table
    finally:
        with _running_lock:
            _running.discard(stopping)
        conn.close()
        connections[alias].close()


def tidy_connections() -> None:
    """What ``close_old_connections()`` does between requests, for a long-running listener:
    close the connections that broke, and those older than a positive ``CONN_MAX_AGE``. With
    ``CONN_MAX_AGE = 0`` (Django's default, meant for requests), a working connection is kept:
    reconnecting for every batch of notifications would cost milliseconds each time, and
    django-pgpubsub 1.x kept its connection too."""
    for db in connections.all(initialized_only=True):
        if db.settings_dict.get("CONN_MAX_AGE") == 0:
            if db.connection is not None and db.errors_occurred:
                db.errors_occurred = False
                if not db.is_usable():
                    db.close()
        else:
            db.close_if_unusable_or_obsolete()


def _recover(channels: list[Any] | None, processor: Processor) -> None:
    count = recover(channels, processor)
    logger.info("Recovered %s stored notifications", count)


def _is_connection_error(exc: BaseException | None) -> bool:
    """True for a lost or refused connection, from Django or straight from the driver."""
    while exc is not None:
        if isinstance(exc, OSError | InterfaceError | OperationalError):
            return True
        if any(cls.__name__ in ("OperationalError", "InterfaceError") for cls in type(exc).__mro__):
            return True
        exc = exc.__cause__
    return False
