"""A Runtime's listener thread: its LISTEN connections, and what it hands to the workers.

One dedicated autocommit LISTEN connection per database the channels are on (usually one),
built from ``PGPUBSUB_DATABASE`` (or ``PGPUBSUB_LISTEN_ALIASES``); callbacks never run on it.
One wait covers everything: notifications, the Runtime's wake-up pipe (a stop request, a sweep
wanted, a retry scheduled sooner), and the next thing due (a sweep, a retry, a probe, the
keepalive, the watcher's next look). What arrives becomes deliveries in the bounded queue. A
lost connection is reconnected with exponential back-off and jitter, and the lockable channels
with due rows are then swept (their notifications may have been missed meanwhile).

The LISTEN connection also serves the cheap questions, so that an idle Runtime needs no other
session: the watcher's election and looks (:mod:`pgpubsub.watcher`), and the scheduler's looks
for lockable channels with due rows.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from django.db import connections

from pgpubsub import conf, store
from pgpubsub.channel import BaseChannel
from pgpubsub.connection import ListenConnection, is_connection_error, one_line, wait_any
from pgpubsub.deliveries import Delivery, DeliveryQueue, Kind, plan
from pgpubsub.models import database_for
from pgpubsub.probes import Probe, check_probes, take_probes
from pgpubsub.scheduler import Scheduler
from pgpubsub.watcher import Watcher
from pgpubsub.wire import Assembler

logger = logging.getLogger("pgpubsub.runtime")

#: Seconds the listener waits for room in a full queue between looks at the stop request.
WAIT_TIMEOUT = 1.0
#: First and longest pause between reconnection attempts, in seconds (doubling, with jitter).
MIN_RECONNECT_DELAY = 0.5
MAX_RECONNECT_DELAY = 10.0
#: Seconds without a notification after which the listener checks its connections with a
#: round trip.
KEEPALIVE_INTERVAL = 60.0


class Listener:
    """The body of the listener thread (:meth:`run`) and what ``status()`` reads of it."""

    def __init__(
        self,
        channels: dict[type[BaseChannel], list],
        queue: DeliveryQueue,
        scheduler: Scheduler,
        stop_wanted: Callable[[], bool],
        wakeup_fd: int,
    ) -> None:
        self.channels = list(channels)
        self.queue = queue
        self.scheduler = scheduler
        self.stop_wanted = stop_wanted
        self.wakeup_fd = wakeup_fd
        # Channel names by LISTEN alias, and a probe per LISTEN alias.
        self.names: dict[str, list[str]] = {}
        self.probes: dict[str, Probe] = {}
        for channel in self.channels:
            alias = conf.listen_alias(channel.database)
            self.names.setdefault(alias, []).append(channel.listen_safe_name())
            # Producers write a channel's messages through its database's alias.
            probe = self.probes.setdefault(alias, Probe(alias, database_for(channel), []))
            if channel.database not in probe.databases:
                probe.databases.append(channel.database)
        # The lockable channels by LISTEN alias and stored name, and the watcher of each
        # database that has some.
        self.stored: dict[str, dict[str, type[BaseChannel]]] = {}
        for channel in self.channels:
            if channel.lock_notifications:
                by_name = self.stored.setdefault(conf.listen_alias(channel.database), {})
                by_name.update(dict.fromkeys(store.stored_names(channel), channel))
        self.watchers = {alias: Watcher(alias, conf.watch_interval()) for alias in self.stored}
        self.alias_of = {name: alias for alias in self.names for name in self.names[alias]}
        self.alias_of.update({probe.channel: alias for alias, probe in self.probes.items()})
        self.listening: dict[str, ListenConnection] = {}
        self.assembler = Assembler()
        # What status() reads.
        self.connected = False  # every LISTEN connection is up
        self.error: BaseException | None = None
        self.reconnects = 0
        self.ignored = 0
        self.last_notification_at: float | None = None
        # The state of the loop.
        self._delay = MIN_RECONNECT_DELAY
        self._ever_connected = False
        self._lost = True  # no connection yet, or they were lost (not closed for a probe)
        self._missed = False  # notifications may have been sent while no connection listened
        self._quiet_since = time.monotonic()

    def run(self) -> None:
        self.listening = {alias: ListenConnection(alias) for alias in self.names}
        try:
            while not self.stop_wanted():
                try:
                    self._step()
                except Exception as exc:
                    self._failed(exc)
        finally:
            self.connected = False
            for conn in self.listening.values():
                conn.close()
            connections.close_all()

    def _step(self) -> None:
        if not all(conn.connected for conn in self.listening.values()):
            self._connect()
        # Notifications, a stop request, wanted sweeps and newly scheduled retries all end the
        # wait: it only has to end for what is due by then.
        due = min(
            self._quiet_since + KEEPALIVE_INTERVAL,
            self.scheduler.tick(),
            *(probe.due() for probe in self.probes.values()),
            *(self.watchers[alias].due() for alias in self._may_watch()),
        )
        if self.scheduler.take_look():
            self._look()
        self.scheduler.take(self._offer_sweep)
        now = time.monotonic()
        received = wait_any(list(self.listening.values()), max(0.0, due - now), self.wakeup_fd)
        now = time.monotonic()
        # Each connection was read just now: one that brought nothing has nothing more on its way.
        heard = {self.alias_of.get(item.channel) for item in received}
        received = take_probes(received, self.probes)
        if check_probes(self.probes, heard, now, self.scheduler.sweep_interval):
            self._missed = True  # the LISTEN connection is deaf: the table has it all
            self.scheduler.want_all()
        for alias, probe in self.probes.items():
            if now >= probe.retry_at:
                probe.retry_at = float("inf")
                if probe.reconnect:
                    self._close(alias)  # LISTEN and probe again, in _connect()
                else:
                    probe.send()
        for alias in self._may_watch():
            if now >= self.watchers[alias].due():
                self.watchers[alias].tick(self.listening[alias].raw)
        if not received:
            self._keepalive()
            return
        self._quiet_since = time.monotonic()
        self.last_notification_at = time.time()
        for delivery in plan(self.assembler.whole_messages(received), ignored=self._ignore):
            self._dispatch(delivery)
        self._delay = MIN_RECONNECT_DELAY

    def _connect(self) -> None:
        for alias, conn in self.listening.items():
            if not conn.connected:
                conn.connect()
                conn.listen([*self.names[alias], self.probes[alias].channel])
                self.probes[alias].send()
        # This thread uses no Django connection of its own, but a handler of
        # connection_created may have opened one (django.contrib.postgres looks up the hstore
        # type on it): close it, not to hold a session.
        connections.close_all()
        self.connected = True
        if self._lost:
            self.error = None
            if self._ever_connected:
                self.reconnects += 1
            self._ever_connected = True
            self._lost = False
            logger.info("Listening on %s", ", ".join(channel.name() for channel in self.channels))
        if self._missed:  # what was sent meanwhile is only in the table
            self.scheduler.want_all()
            self._missed = False
        self._quiet_since = time.monotonic()

    def _keepalive(self) -> None:
        if time.monotonic() - self._quiet_since > KEEPALIVE_INTERVAL:
            # A connection that died silently (a network partition) fails here rather than
            # leaving the Runtime deaf.
            for conn in self.listening.values():
                if conn.connected:
                    conn.ping()
            self._quiet_since = time.monotonic()

    def _failed(self, exc: Exception) -> None:
        self.connected = False
        self.error = exc
        self._missed = True
        for alias in self.listening:
            self._close(alias)
        for probe in self.probes.values():
            probe.forget()
        pause = min(MAX_RECONNECT_DELAY, self._delay) * random.uniform(0.5, 1.0)
        if not is_connection_error(exc):
            logger.exception("The listener failed; starting again in %.1fs", pause)
        elif self._ever_connected:
            logger.warning(
                "Lost the listening connection (%s); reconnecting in %.1fs", one_line(exc), pause
            )
        else:
            logger.warning(
                "Cannot connect to the database to listen (%s); retrying in %.1fs",
                one_line(exc),
                pause,
            )
        self._lost = True
        wait_any([], pause, self.wakeup_fd)  # the wake-up pipe ends the pause for a stop request
        self._delay *= 2

    def _may_watch(self) -> list[str]:
        """The aliases whose watcher may try or look now: its LISTEN connection is up and a
        probe proved that notifications reach it. A session behind transaction pooling never
        qualifies: an advisory lock taken there would stay on a server connection that other
        clients get, and keep every Runtime from watching."""
        return [
            alias
            for alias in self.watchers
            if self.listening[alias].connected and self.probes[alias].verified
        ]

    def _close(self, alias: str) -> None:
        self.listening[alias].close()
        watcher = self.watchers.get(alias)
        if watcher is not None:
            watcher.forget()  # the advisory lock went with the session

    def _look(self) -> None:
        """Sweep the lockable channels that have due rows: found with a look on each LISTEN
        connection, so that an idle Runtime's workers open no connection for it."""
        for alias, by_name in self.stored.items():
            conn = self.listening[alias]
            if not conn.connected:
                self.scheduler.want_all()  # after the reconnection
                continue
            try:
                with conn.raw.cursor() as cursor:
                    found = store.due_names(cursor, list(by_name))
            except Exception as exc:
                if is_connection_error(exc):
                    raise
                # Most likely the table lacks pgpubsub's migrations: the workers find out and
                # make the channels wait.
                logger.debug("Looking for due rows failed (%s): sweeping", one_line(exc))
                found = set(by_name)
            self.scheduler.want_sweep({by_name[name] for name in found})

    def _ignore(self, channel_name: str, payload: str, reason: str) -> None:
        self.ignored += 1  # only the listener thread counts

    def _offer_sweep(self, channel: type[BaseChannel]) -> bool:
        return self.queue.offer(Delivery.sweep(channel))

    def _dispatch(self, delivery: Delivery) -> None:
        if delivery.kind is Kind.SWEEP:
            self.scheduler.want_sweep([delivery.channel])
        elif delivery.kind is Kind.ROWS:
            # Older rows of the channel wait for a sweep: these join them, so that the
            # channel's rows still run in arrival (id) order.
            if self.scheduler.is_wanted(delivery.channel) or not self.queue.offer(delivery):
                # No room: the rows are stored, a sweep claims them once there is.
                logger.debug(
                    "Queue full: %s stored row(s) of %s left for a sweep",
                    len(delivery.row_ids),
                    delivery.channel.name(),
                )
                self.scheduler.want_sweep([delivery.channel])
        else:
            # A plain message exists only here: wait for room (Postgres queues what arrives
            # meanwhile), unless the Runtime stops.
            while not self.queue.put(delivery, WAIT_TIMEOUT):
                if self.stop_wanted():
                    logger.warning(
                        "Stopping: a plain message of %s not processed", delivery.channel.name()
                    )
                    return
