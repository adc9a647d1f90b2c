"""The processing entry points of django-pgpubsub 1.x: ``listen()``, ``listen_to_channels()``,
``process_notifications()`` and the ``POLL`` flag."""

from __future__ import annotations

import logging
import threading
from typing import Any

from django.db import connections

from pgpubsub import conf
from pgpubsub.connection import Received, quote_channel
from pgpubsub.db_functions import SESSION_SETTING
from pgpubsub.models import notifications_alias
from pgpubsub.processing import Processors
from pgpubsub.runtime import Runtime, selected_channels
from pgpubsub.sweeps import sweep_all
from pgpubsub.wire import Assembler

logger = logging.getLogger(__name__)

#: While True, ``listen()`` keeps waiting for notifications. With False, ``listen(recover=True)``
#: processes the stored notifications and returns.
POLL = True

# The Runtimes of the listen() calls running now (several threads may each run one).
_running: set[Runtime] = set()
_running_lock = threading.Lock()


class ConnectionWrapper:
    """A LISTENing Django connection as ``listen_to_channels()`` returns it: ``poll()`` reads what
    has arrived into the mutable ``notifies`` list; ``stop()`` stops collecting."""

    def __init__(self, raw: Any) -> None:
        self.connection = raw
        self.assembler = Assembler()
        self._received = Received(raw)

    @property
    def notifies(self) -> list[Any]:
        return self._received.items

    @notifies.setter
    def notifies(self, value: list[Any]) -> None:
        self._received.items = value

    def poll(self) -> None:
        self._received.poll()

    def stop(self) -> None:
        self._received.close()
        try:
            with self.connection.cursor() as cursor:
                cursor.execute(f"RESET {SESSION_SETTING}")
        except Exception:  # the connection may be gone or in a failed transaction
            logger.debug("Could not reset %s", SESSION_SETTING, exc_info=True)


def listen_to_channels(channels: list[Any] | None = None) -> ConnectionWrapper:
    """LISTEN to the selected channels (all with listeners by default) on this thread's Django
    connection; notifications then arrive as that connection runs queries or polls.

    Lockable messages this connection stores are then NOTIFYed by their writes, as in
    django-pgpubsub 1.x, whatever ``PGPUBSUB_NOTIFY_ON_WRITE`` says (a session setting, until
    ``stop()``); other sessions' writes reach it through the watcher of a running Runtime."""
    selected = selected_channels(channels)
    connection = connections[notifications_alias()]
    connection.ensure_connection()
    wrapper = ConnectionWrapper(connection.connection)  # collecting before the first LISTEN
    with connection.cursor() as cursor:
        for channel_cls in selected:
            logger.info("Listening on %s", channel_cls.name())
            cursor.execute(f"LISTEN {quote_channel(channel_cls.listen_safe_name())}")
        cursor.execute(f"SET {SESSION_SETTING} = 'on'")
    return wrapper


def process_notifications(connection_wrapper: ConnectionWrapper) -> None:
    """Process every notification that has arrived, in arrival order, on this thread.

    As in django-pgpubsub 1.x, a listener's exception reaches the caller: here once everything
    that had arrived was processed (the first exception, when there are several)."""
    processors = Processors()
    connection_wrapper.poll()
    while connection_wrapper.notifies:
        # Take what has arrived; more may arrive (on this connection) while it is processed.
        arrived = list(connection_wrapper.notifies)
        del connection_wrapper.notifies[: len(arrived)]
        processors.process_many(
            connection_wrapper.assembler.whole_messages(arrived), raise_errors=True
        )
        if not connection_wrapper.notifies:
            connection_wrapper.poll()


def process_stored(channels: list[Any] | None = None) -> int:
    """Process every stored notification of the selected lockable channels on this thread."""
    processors = Processors()
    return sum(
        sweep_all(processors.of(channel_cls), channel_cls)
        for channel_cls in selected_channels(channels)
        if channel_cls.lock_notifications
    )


def stop() -> None:
    """Make every running ``listen()`` return, once the callbacks in hand finished."""
    with _running_lock:
        for runtime in _running:
            runtime.request_stop()


def listen(
    channels: list[Any] | None = None,
    recover: bool = False,
    autorestart_on_failure: bool = True,
    start_method: str = "spawn",
    threads: int = 1,
) -> None:
    """Listen to the selected channels and process their notifications until ``stop()``, on a
    :class:`~pgpubsub.runtime.Runtime` with ``threads`` worker threads (one: arrival order, as
    in 1.x). A lost connection is re-opened, re-LISTENed and followed by a sweep of stored
    notifications, so nothing stored is missed. With ``POLL = False``, ``listen(recover=True)``
    processes the stored notifications on this thread and returns."""
    if not POLL:
        conf.listener_filter_provider()
        if recover:
            count = process_stored(channels)
            logger.info("Recovered %s stored notifications", count)
        return
    runtime = Runtime(channels, workers=threads, recover=recover)
    with _running_lock:
        _running.add(runtime)
    try:
        runtime.run()
    finally:
        with _running_lock:
            _running.discard(runtime)
