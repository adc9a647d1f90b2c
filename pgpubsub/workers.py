"""A Runtime's worker threads: each takes deliveries from the queue and runs them on its own
Django connections (one :class:`~pgpubsub.processing.Processor` per database, made as needed).

A worker opens its connections when work arrives and closes them once it had none for
``PGPUBSUB_IDLE_CONNECTION_TIMEOUT`` seconds: an idle Runtime holds only its LISTEN session.
A worker repairs what it can: a connection idle for a while is checked before use, a delivery
whose connection broke is tried once more on a new one and then left to a sweep (its rows stay
stored), and a database that lacks pgpubsub's migrations makes its lockable channels wait
(:class:`~pgpubsub.scheduler.Scheduler`) while the others go on. Nothing a callback raises ends
a worker thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from django.db import connections

from pgpubsub import batch_size, conf, store
from pgpubsub.channel import BaseChannel
from pgpubsub.connection import close_if_unusable, is_connection_error, one_line, tidy_connections
from pgpubsub.deliveries import Delivery, DeliveryQueue, Kind
from pgpubsub.losses import Losses
from pgpubsub.models import Notification
from pgpubsub.processing import Processor, Processors
from pgpubsub.scheduler import Scheduler
from pgpubsub.stats import Stats
from pgpubsub.store import SchemaBehind
from pgpubsub.sweeps import Sweeper

logger = logging.getLogger("pgpubsub.runtime")

#: Longest wait of an idle worker for a delivery, in seconds (stop() wakes it at once).
IDLE_WAIT = 30.0
#: Seconds a worker's connection may sit unused before it is checked before use.
IDLE_CHECK_AFTER = 10.0


class Workers:
    """What the worker threads of a Runtime share; :meth:`work` is the body of each."""

    def __init__(
        self,
        queue: DeliveryQueue,
        scheduler: Scheduler,
        stopping: threading.Event,
        count: int,
        wake: Callable[[], None],
    ) -> None:
        self.queue = queue
        self.scheduler = scheduler
        self.stopping = stopping
        self.wake = wake
        self.stats = Stats()
        self.losses = Losses()  # a row may come back to another worker
        self.sweeper = Sweeper(queue, scheduler, count, stopping)
        self.in_flight = 0
        self.idle_timeout = conf.idle_connection_timeout()
        self._lock = threading.Lock()

    def processors(self, using: str) -> Processors:
        """A thread's processors (one per database, made as needed; ``using``: the database of
        the channels without one of their own, looked up once)."""
        return Processors(self.stats, self.losses, self.stopping, self.scheduler.retry_in, using)

    def work(self, processors: Processors) -> None:
        last_used = time.monotonic()
        holding = False  # this thread may have connections open
        try:
            while not self.stopping.is_set():
                wait = IDLE_WAIT
                if holding:
                    wait = min(wait, max(0.0, last_used + self.idle_timeout - time.monotonic()))
                delivery = self.queue.get(wait)  # stop() closes the queue: no polling
                if delivery is None:
                    if holding and time.monotonic() - last_used >= self.idle_timeout:
                        connections.close_all()  # reopened by the next delivery
                        holding = False
                    continue
                if self.stopping.is_set():  # taken just as the Runtime stops: not started
                    if delivery.kind is Kind.PLAIN:
                        _not_processed(len(delivery.payloads), delivery.channel)
                    self.queue.done(delivery)
                    break
                self._take(processors, delivery, time.monotonic() - last_used)
                last_used = time.monotonic()
                holding = True
        finally:
            connections.close_all()  # this thread's connections

    def _take(self, processors: Processors, delivery: Delivery, idle: float) -> None:
        with self._lock:
            self.in_flight += 1
        continued = False
        part = self.sweeper.first_part(delivery)
        processor = processors.of(delivery.channel)
        try:
            tidy_connections()
            if idle > IDLE_CHECK_AFTER:
                # An idle connection may have been closed by the server or a proxy: find out
                # now rather than by failing the delivery.
                close_if_unusable(processor.using)
            if delivery.kind is Kind.PLAIN:
                self._run_plain(processor, delivery)
            else:
                continued = self._run(processor, part)
        finally:
            with self._lock:
                self.in_flight -= 1
            if delivery.kind is Kind.SWEEP and not continued:
                self.sweeper.ends(part)  # it reads no more pages
            if self.sweeper.part_done(part):
                # Its last page and batch are done: a sweep wanted meanwhile may start now (not
                # before, or it would claim rows this one listed for batches still queued).
                self.scheduler.sweep_ended(delivery.channel)
                self._swept(processor, delivery.channel)
            self.queue.done(delivery)
            if self.scheduler.waiting():  # there is room now: the listener queues them
                self.wake()

    def _swept(self, processor: Processor, channel: type[BaseChannel]) -> None:
        """A sweep of ``channel`` ended: a channel with an ``after_sweep(using, retry_in)``
        hook learns it (tasks schedule their next deferred one and prune old results)."""
        after_sweep = getattr(channel, "after_sweep", None)
        if after_sweep is None:
            return
        try:
            after_sweep(processor.using, self.scheduler.retry_in)
        except Exception:
            logger.exception("After the sweep of %s", channel.name())

    def _run_plain(self, processor: Processor, delivery: Delivery) -> None:
        """Run the plain messages of ``delivery`` in arrival order, each in a transaction of its
        own (the processor logs and counts those that fail). Once the Runtime stops, those not
        started are dropped, and said so."""
        channel, callbacks, payloads = delivery.channel, delivery.callbacks, delivery.payloads
        started = time.perf_counter()
        ran = 0
        for payload in payloads:
            if ran and self.stopping.is_set():
                _not_processed(len(payloads) - ran, channel)
                break
            ran += 1
            try:
                processor.run_plain(channel, callbacks, payload)
            except BaseException as exc:  # noqa: B036 - e.g. SystemExit from a listener
                logger.exception("Processing %s failed", channel.name())
                self.stats.failure(exc)
                close_if_unusable(processor.using)
        # How many of the channel's messages the queue lets one delivery hold.
        batch_size.measured(channel, time.perf_counter() - started, ran)

    def _run(self, processor: Processor, delivery: Delivery) -> bool:
        """Run ``delivery``; True when it was a sweep that queued its continuation. Stored rows
        whose connection broke are tried once more on a new connection, then left to a sweep;
        they stay stored either way."""
        alias = processor.using
        for attempt in (1, 2):
            try:
                if delivery.kind is not Kind.PLAIN and not self._schema_ready(alias, delivery):
                    self.sweeper.ends(delivery)
                    return False  # its rows stay stored: swept once the database is tried again
                continued = False
                if delivery.kind is Kind.SWEEP:
                    outcome, continued = self.sweeper.run_page(processor, delivery)
                else:
                    outcome = processor.run(delivery)
                    if delivery.kind is Kind.ROWS:
                        self.sweeper.count_part(delivery, outcome)
                if outcome.lost is None:
                    return continued
                if delivery.kind is Kind.SWEEP:
                    self._broke(delivery, outcome.lost)
            except BaseException as exc:  # noqa: B036 - e.g. CancelledError, SystemExit
                if isinstance(exc, SchemaBehind):
                    self._schema_behind(exc, delivery.channel)
                    self.sweeper.ends(delivery)
                    return False
                if not is_connection_error(exc):
                    # Its transaction was rolled back: lockable rows stay stored.
                    logger.exception("Processing %s failed", delivery.channel.name())
                    self.stats.failure(exc)
                    close_if_unusable(alias)
                    return False
                self._broke(delivery, exc)
            connections[alias].close()
            if attempt == 2 or self.stopping.is_set():
                self.scheduler.want_sweep([delivery.channel])
                return False
        return False

    @staticmethod
    def _broke(delivery: Delivery, error: BaseException) -> None:
        logger.warning(
            "The database connection broke while processing %s (%s)",
            delivery.channel.name(),
            one_line(error),
        )

    def _schema_ready(self, alias: str, delivery: Delivery) -> bool:
        """False while database ``alias`` waits for ``migrate`` (the delivery's channel is swept
        once its pause ends). The first delivery after the pause reads the catalog: it raises
        SchemaBehind if the table still lacks columns, or says that processing starts again."""
        state = self.scheduler.schema_state(alias, delivery.channel)
        if state != "check":
            return state == "ready"
        store.check_schema(alias)
        if self.scheduler.schema_migrated(alias):
            logger.info(
                "pgpubsub's table %s in database %r has every column now: processing again",
                Notification._meta.db_table,
                alias,
            )
        return True

    def _schema_behind(self, error: SchemaBehind, channel: type[BaseChannel]) -> None:
        """pgpubsub's statements met a table that lacks columns (``migrate`` not run): leave
        the database's lockable channels alone until the pause ends; say it once a pause."""
        alias = error.using
        pause = self.scheduler.schema_behind(alias, channel)
        if pause is None:
            return  # said already, for this pause
        self.stats.last_error = error
        try:
            problem = store.schema_problem(alias) or error.detail
        except Exception:  # the catalog could not be read: the driver's message says enough
            problem = error.detail
        logger.error(
            "pgpubsub's table %s in database %r %s: run `manage.py migrate`. Its lockable "
            "notifications stay stored, untouched; trying again in %.1fs",
            Notification._meta.db_table,
            alias,
            problem,
            pause,
        )


def _not_processed(count: int, channel: type[BaseChannel]) -> None:
    logger.warning("Stopping: %s plain message(s) of %s not processed", count, channel.name())
