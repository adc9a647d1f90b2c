"""The Runtime: one listener thread, a bounded queue of deliveries and a pool of worker threads.

The listener thread owns a dedicated autocommit connection (built from ``PGPUBSUB_DATABASE``)
that LISTENs on the selected channels; callbacks never run on it. What it receives becomes
deliveries (:mod:`pgpubsub.deliveries`) in a bounded queue. Each worker thread takes
deliveries from the queue and runs them on its own Django connection to the notifications'
database (:mod:`pgpubsub.processing`).

Lockable rows are the truth: a Runtime sweeps a lockable channel's stored rows when it starts
(with ``recover``), after it reconnects, when the queue had no room for a notification, when a
failed message it recorded is due again, and every ``PGPUBSUB_SWEEP_INTERVAL`` seconds (for the
messages whose NOTIFY nobody got, and those of a process that died).

After each LISTEN, the listener proves that notifications reach it: it LISTENs on a probe
channel of its own too, and has a NOTIFY with a random token sent there through the alias
producers write through. Through a transaction-pooling PgBouncer the token never arrives: the
Runtime then says so, reports itself not connected, keeps sweeping, and probes again later.

A database whose pgpubsub table lacks this version's columns (started before ``migrate``) makes
the Runtime leave that database's lockable channels alone, their rows stored and untouched: it
logs one error, tries again after a pause that doubles up to ``MAX_SCHEMA_RETRY_DELAY``
(logging the error again at most once a pause), and says when it processes again.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import random
import secrets
import select
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from django.db import connections
from django.db.utils import InterfaceError, OperationalError

from pgpubsub import conf, retries, store
from pgpubsub.channel import BaseChannel, ChannelNotFound, select_channels
from pgpubsub.connection import ListenConnection, probe_channel, send_notification, wait_any
from pgpubsub.deliveries import Delivery, DeliveryQueue, Kind, max_concurrency, plan
from pgpubsub.models import Notification
from pgpubsub.processing import PROGRESS_INTERVAL, Losses, Processor
from pgpubsub.store import SchemaBehind
from pgpubsub.wire import Assembler

logger = logging.getLogger(__name__)

#: Seconds the listener waits for room in a full queue between looks at the stop event.
WAIT_TIMEOUT = 1.0
#: Longest wait of an idle worker for a delivery, and of run() for a stop request, in seconds
#: (both are woken at once).
IDLE_WAIT = 30.0
#: First and longest pause between reconnection attempts, in seconds (doubling, with jitter).
MIN_RECONNECT_DELAY = 0.5
MAX_RECONNECT_DELAY = 10.0
#: Seconds without a notification after which the listener checks its connections with a
#: round trip.
KEEPALIVE_INTERVAL = 60.0
#: Seconds a worker's connection may sit unused before it is checked before use.
IDLE_CHECK_AFTER = 10.0
#: Seconds added to a retry's delay before its sweep, so that the row is due when swept.
RETRY_MARGIN = 0.05
#: Seconds a probe NOTIFY sent after a LISTEN has to arrive on the LISTEN connection.
PROBE_TIMEOUT = 5.0
#: First and longest pause before probing again a LISTEN connection that a probe did not
#: reach (or that no probe could be sent to), in seconds (doubling, with jitter).
MIN_PROBE_RETRY_DELAY = 5.0
MAX_PROBE_RETRY_DELAY = 60.0
#: The status() problem of a Runtime whose LISTEN connection a probe did not reach.
NOTIFICATIONS_NOT_RECEIVED = "notifications_not_received"
#: First and longest pause before a database whose pgpubsub table lacks columns (``migrate``
#: not run) is tried again, in seconds (doubling, with jitter).
MIN_SCHEMA_RETRY_DELAY = 1.0
MAX_SCHEMA_RETRY_DELAY = 60.0


# The Runtimes started in this process and not stopped yet.
_live: set[Runtime] = set()
_live_lock = threading.Lock()


def _forget_after_fork() -> None:
    global _live_lock
    _live_lock = threading.Lock()  # another thread may have held it at the fork
    _live.clear()  # the parent's Runtimes: their threads did not come along


os.register_at_fork(after_in_child=_forget_after_fork)


class Wakeup:
    """A flag, and a pipe that wakes whoever waits for it: all a signal handler may safely do.

    Python runs a handler on the main thread between two bytecodes of whatever it interrupted:
    maybe while that code holds a lock (``threading.Event.set()`` takes one, and so do logging
    and the Runtime's queue), maybe inside the handler of an earlier signal (Ctrl-C's SIGINT,
    then a supervisor's SIGTERM). So ``set()`` takes no lock and logs nothing; the thread that
    waits does the real work, outside any handler.
    """

    def __init__(self) -> None:
        self.is_set = False
        self.signalled = False  # set() was called by one of catching()'s signals
        self._read, self._write = os.pipe()
        for fd in (self._read, self._write):
            os.set_blocking(fd, False)
        self._closed = False

    def set(self) -> None:
        self.is_set = True
        if not self._closed:
            try:
                os.write(self._write, b"\0")
            except OSError:  # full: a wake-up is pending anyway
                pass

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for ``set()``; True once it was called."""
        if not self.is_set and not self._closed:
            select.select([self._read], [], [], timeout)
            # A Python function call: the handler of a signal that ended the wait has run
            # when it returns (see catching()).
            self._drain()
        return self.is_set

    def _drain(self) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except OSError:  # empty
            pass

    @contextlib.contextmanager
    def catching(self, *signums: int, exiting: bool = False) -> Iterator[None]:
        """Within the block, ``signums`` call ``set()`` (on the main thread; elsewhere no handler
        can be set, and nothing changes). After it, the previous handlers are back; with
        ``exiting`` (the block was the life of the process), once one of the signals came they
        are ignored instead: the process is on its way out, and a second Ctrl-C or SIGTERM
        arriving then must not kill it halfway through its exit.

        The pipe is also Python's wake-up fd meanwhile: a signal that the kernel delivers to
        another thread (any thread may receive a signal sent to the process) then ends the main
        thread's ``wait()`` at once; otherwise its handler would only run when the wait times
        out, as the main thread runs no bytecode until then."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.signalled = False
        previous = {signum: signal.signal(signum, self._on_signal) for signum in signums}
        previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        try:
            yield
        finally:
            signal.set_wakeup_fd(previous_fd)
            for signum, handler in previous.items():
                if exiting and self.signalled:
                    signal.signal(signum, signal.SIG_IGN)
                elif handler is not None:  # None: set outside Python, cannot be restored
                    signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signalled = True
        self.set()

    def close(self) -> None:
        self._closed = True
        for fd in (self._read, self._write):
            os.close(fd)


def one_line(exc: BaseException) -> str:
    """``exc``'s text on one line: drivers' messages span several (``server closed the
    connection unexpectedly\n\tThis probably means...``), and one event is one log line."""
    return " ".join(str(exc).split())


class Probe:
    """Whether notifications reach one LISTEN connection: the state of its probes.

    The listener thread alone changes it; ``status()`` reads ``failing`` and ``verified``."""

    def __init__(self, listen_alias: str, via: str, databases: list[str | None]) -> None:
        self.listen_alias = listen_alias
        self.via = via  # the alias producers write through: the probe's NOTIFY goes there
        self.databases = databases  # of the channels LISTENed to on that connection
        self.channel = probe_channel()
        self.token: str | None = None  # of the probe on its way
        self.deadline = float("inf")  # by when it must arrive (time.monotonic())
        self.retry_at = float("inf")  # when to probe again
        self.reconnect = False  # ... on a new connection (the last probe did not arrive)
        self.failures = 0  # in a row: the pause before the next probe doubles with each
        self.failing: str | None = None  # what went wrong, while probes do not arrive
        self.verified = False  # the last probe arrived

    def pause(self) -> float:
        """Seconds before the next probe after ``failures`` failed ones."""
        delay = MIN_PROBE_RETRY_DELAY * 2 ** max(0, self.failures - 1)
        return min(MAX_PROBE_RETRY_DELAY, delay) * random.uniform(0.8, 1.0)

    def fix(self) -> str:
        """The settings that point LISTEN elsewhere, for the channels of this connection."""
        fixes = [
            "PGPUBSUB_DATABASE"
            if database is None
            else f"PGPUBSUB_LISTEN_ALIASES = {{{database!r}: <an alias that connects directly>}}"
            for database in self.databases
        ]
        return " and ".join(fixes)


class SchemaWait:
    """A database whose pgpubsub table lacks what this version uses: its lockable channels
    wait, and are tried again after each pause. Changed under the Runtime's ``_books`` lock."""

    def __init__(self) -> None:
        self.failures = 0  # tries in a row that found the table behind
        self.retry_at = float("inf")  # when to try again (time.monotonic())
        self.retrying = False  # the pause is over: the next delivery finds out
        self.channels: set[type[BaseChannel]] = set()  # to sweep once it is tried again

    def pause(self) -> float:
        delay = MIN_SCHEMA_RETRY_DELAY * 2 ** max(0, self.failures - 1)
        return min(MAX_SCHEMA_RETRY_DELAY, delay) * random.uniform(0.8, 1.0)


class NotificationsNotReceived(Exception):
    """A probe NOTIFY did not reach the LISTEN connection (``status()["last_error"]``)."""


class SweepTally:
    """What one sweep of a lockable channel read and processed, over its pages and batches
    (which run on several workers): its end is logged once the last of them is done."""

    def __init__(self) -> None:
        self.read = 0  # stored rows its pages listed
        self.processed = 0  # rows this Runtime processed (not those another took, or failed)
        self.parts = 1  # its deliveries not done yet (the first page's included)
        self.last_id = 0  # of the last page read
        self.reading = True  # more pages may come


@dataclass
class SweepPart(Delivery):
    """A page (``Kind.SWEEP``) or batch of rows (``Kind.ROWS``) of a sweep in progress."""

    tally: SweepTally | None = None


def live_runtimes() -> list[Runtime]:
    """The Runtimes running in this process (embedded, ``listen``, or started by hand)."""
    with _live_lock:
        return [runtime for runtime in _live if runtime.running]


def selected_channels(channels: list[Any] | None) -> dict[type[BaseChannel], list]:
    """The channels (with listeners) a Runtime listens to; refuses a selection with none."""
    selected = select_channels(channels)
    if not selected:
        raise ChannelNotFound(
            "Channel not found! No listeners are registered for "
            f"{'any channel' if channels is None else channels}: import the modules that define "
            "them (usually in AppConfig.ready())."
        )
    return selected


class Runtime:
    """Listens to channels and processes their notifications on a pool of threads.

    ``start()`` and ``stop()`` may be called from any thread, any number of times. A stopped
    Runtime does not start again: make a new one.
    """

    def __init__(
        self,
        channels: list[Any] | None = None,
        workers: int | None = None,
        queue_size: int | None = None,
        recover: bool = False,
        shutdown_timeout: float | None = None,
    ) -> None:
        self.channels = selected_channels(channels)
        for channel in self.channels:
            max_concurrency(channel)  # a bad value fails here, not in a worker
            if channel.lock_notifications:
                retries.check(channel)
        self.workers = conf.workers() if workers is None else workers
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be a positive int, not {self.workers!r}")
        self.recover = recover
        self.sweep_interval = conf.sweep_interval()
        for read in (conf.max_attempts, conf.retry_delay, conf.retry_max_delay):
            read()  # the workers read them when a message fails: a bad value fails here
        self.shutdown_timeout = (
            conf.shutdown_timeout() if shutdown_timeout is None else shutdown_timeout
        )
        self.listen_alias = conf.database_alias()
        conf.listen_aliases()  # a bad PGPUBSUB_LISTEN_ALIASES fails here, not in the listener
        self.using = conf.notifications_alias()
        self._queue = DeliveryQueue(conf.queue_size() if queue_size is None else queue_size)
        self._stopping = threading.Event()
        # request_stop() was called (maybe by a signal handler, which may set nothing more).
        self._stop_requested = False
        self._waiter: Wakeup | None = None  # what run() waits on
        self._state = threading.Lock()  # start/stop
        self._books = threading.Lock()  # sweeps wanted and running, in-flight count
        self._threads: list[threading.Thread] = []
        self._processors: list[Processor] = []
        self._pid: int | None = None
        self._wakeup: tuple[int, int] | None = None
        # Lockable channels whose stored rows need a sweep, and those being swept now.
        self._sweeps_wanted: set[type[BaseChannel]] = set()
        self._sweeping: set[type[BaseChannel]] = set()
        # When the next progress line of a channel's sweeps is due (time.monotonic()): one
        # every PROGRESS_INTERVAL, also when a sweep follows another.
        self._next_report: dict[type[BaseChannel], float] = {}
        # (when, number, channel) of each failed message due again (time.monotonic()), a heap.
        self._retry_at: list[tuple[float, int, type[BaseChannel]]] = []
        self._retries_scheduled = itertools.count()
        self._losses = Losses()  # shared by the workers: a row may come back to another one
        # Databases whose pgpubsub table is behind this version (by alias).
        self._behind: dict[str, SchemaWait] = {}
        self._in_flight = 0
        self._ignored = 0
        self._listening = False  # every LISTEN connection is up
        self._probes: list[Probe] = []  # one per LISTEN connection, once the listener runs
        self.reconnects = 0
        self.started_at: float | None = None
        self.last_notification_at: float | None = None
        self._listener_error: BaseException | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return bool(self._threads) and not self._stopping.is_set() and self._pid == os.getpid()

    @property
    def connected(self) -> bool:
        """Every LISTEN connection is up, and no probe found that notifications miss it."""
        return self._listening and not any(probe.failing for probe in self._probes)

    def start(self) -> Runtime:
        """Start the listener and worker threads (once); returns the Runtime."""
        with self._state:
            if self._stopping.is_set():
                raise RuntimeError("This Runtime was stopped; create a new one to start again")
            if self._threads:
                return self
            conf.listener_filter_provider()  # a broken PGPUBSUB_LISTENER_FILTER fails here
            self._pid = os.getpid()
            self.started_at = time.time()
            # Workers and stop() write here to wake the listener from its wait at once.
            self._wakeup = os.pipe()
            for fd in self._wakeup:
                os.set_blocking(fd, False)
            if self.recover:
                self._want_sweep(self._lockable())
            threads = [threading.Thread(target=self._listen, name="pgpubsub-listener")]
            for number in range(self.workers):
                processor = Processor(
                    self.using,
                    stopping=self._stopping,
                    on_retry=self._schedule_retry,
                    losses=self._losses,
                )
                self._processors.append(processor)
                threads.append(
                    threading.Thread(
                        target=self._work, args=(processor,), name=f"pgpubsub-worker-{number}"
                    )
                )
            for thread in threads:
                # Daemon threads never keep an interpreter (a web worker) from exiting; stop()
                # is what lets their callbacks finish.
                thread.daemon = True
                thread.start()
            self._threads = threads
        with _live_lock:
            _live.add(self)
        logger.info(
            "pgpubsub Runtime started in process %s with %s worker thread(s)",
            self._pid,
            self.workers,
        )
        return self

    def request_stop(self) -> None:
        """Ask every thread to stop, without waiting. Safe in a signal handler: it only sets a
        flag and wakes the listener thread (which drops the deliveries not started yet) and
        ``run()`` (which stops the Runtime)."""
        self._stop_requested = True
        waiter = self._waiter
        if waiter is not None:
            waiter.set()
        self._wake()

    def _stop_wanted(self) -> bool:
        """True once the Runtime stops. The listener thread carries out a ``request_stop()``
        here, outside any signal handler: closing the queue takes its lock, and logs."""
        if self._stop_requested and not self._stopping.is_set():
            self._stopping.set()
            self._close_queue()
        return self._stopping.is_set()

    def _close_queue(self) -> None:
        """Wake the workers waiting for a delivery; drop those not started (their lockable rows
        stay stored, a later sweep processes them)."""
        dropped = self._queue.close()
        plain = sum(1 for delivery in dropped if delivery.kind is Kind.PLAIN)
        if plain:
            logger.warning("Stopping: %s plain message(s) not processed", plain)

    def _wake(self) -> None:
        if self._wakeup is not None:
            try:
                os.write(self._wakeup[1], b"\0")
            except OSError:  # full (a wake-up is pending anyway) or closed
                pass

    def stop(self, timeout: float | None = None) -> bool:
        """Stop listening, let running callbacks finish within ``timeout`` seconds (default
        ``PGPUBSUB_SHUTDOWN_TIMEOUT``), close the connections. True if every thread stopped.

        Deliveries not started yet are dropped: their lockable rows stay stored (a later sweep
        processes them), plain messages are lost."""
        timeout = self.shutdown_timeout if timeout is None else timeout
        with self._state:
            self._stopping.set()
            threads = list(self._threads)
        self._wake()
        with _live_lock:
            _live.discard(self)
        if not threads or self._pid != os.getpid():
            return True  # never started, or started before a fork: its threads are not ours
        self._close_queue()
        deadline = time.monotonic() + timeout
        current = threading.current_thread()
        for thread in threads:
            if thread is not current:
                thread.join(max(0.0, deadline - time.monotonic()))
        alive = [thread.name for thread in threads if thread.is_alive() and thread is not current]
        if alive:
            logger.warning(
                "pgpubsub threads still running %.1fs after the stop request: %s (a callback "
                "has not returned; its lockable row stays stored and is processed again later)",
                timeout,
                ", ".join(alive),
            )
            return False
        wakeup, self._wakeup = self._wakeup, None
        for fd in wakeup or ():
            os.close(fd)
        logger.info("pgpubsub Runtime of process %s stopped", self._pid)
        return True

    def run(self) -> None:
        """Start, then block until ``request_stop()`` (or Ctrl-C), then stop."""
        self._run_until(())

    def run_until_signalled(self) -> None:
        """``run()``, with SIGTERM and SIGINT asking for the stop (when called on the main
        thread: only it may set signal handlers; they are set before the Runtime starts). Meant
        to be the life of a process: once a signal stopped the Runtime, more of them are
        ignored while the process exits."""
        self._run_until((signal.SIGTERM, signal.SIGINT), exiting=True)

    def _run_until(self, signums: tuple[int, ...], exiting: bool = False) -> None:
        waiter = Wakeup()
        self._waiter = waiter
        try:
            with waiter.catching(*signums, exiting=exiting):
                try:
                    if not self._stop_requested and not waiter.is_set:  # a signal came already
                        self.start()
                    # A signal sets the waiter; request_stop() sets it too (once it is known).
                    while not (
                        self._stop_requested or self._stopping.is_set() or waiter.wait(IDLE_WAIT)
                    ):
                        pass
                finally:
                    self.stop()
        finally:
            self._waiter = None
            waiter.close()

    def status(self) -> dict[str, Any]:
        """What the Runtime is doing, for health checks and metrics (no payloads)."""
        processed = sum(processor.processed for processor in self._processors)
        failed = sum(processor.failed for processor in self._processors)
        invalid = sum(processor.invalid for processor in self._processors)
        errors = [p.last_error for p in self._processors if p.last_error is not None]
        failing = [probe.failing for probe in self._probes if probe.failing]
        last_error = (
            self._listener_error
            or (NotificationsNotReceived(failing[0]) if failing else None)
            or (errors[-1] if errors else None)
        )
        probes = list(self._probes)
        return {
            "pid": self._pid,
            "running": self.running,
            "connected": self.connected,
            # Short codes of what keeps the Runtime from working (the health view's too).
            "problems": [NOTIFICATIONS_NOT_RECEIVED] if failing else [],
            # A probe NOTIFY reached each LISTEN connection since it last LISTENed.
            "notifications_verified": bool(probes) and all(probe.verified for probe in probes),
            "channels": [channel.name() for channel in self.channels],
            "workers": self.workers,
            "queue_size": self._queue.maxsize,
            "queue_depth": len(self._queue),
            "in_flight": self._in_flight,
            "processed": processed,
            "failed": failed,
            "invalid": invalid,
            "ignored": self._ignored,
            "reconnects": self.reconnects,
            "last_error": None
            if last_error is None
            else f"{type(last_error).__name__}: {last_error}",
            "last_notification_at": self.last_notification_at,
            "started_at": self.started_at,
        }

    # -- the listener thread ---------------------------------------------------------------

    def _lockable(self) -> list[type[BaseChannel]]:
        return [channel for channel in self.channels if channel.lock_notifications]

    def _want_sweep(self, channels: list[type[BaseChannel]]) -> None:
        with self._books:
            self._sweeps_wanted.update(channels)
        self._wake()  # the listener queues sweeps

    def _schedule_retry(self, channel: type[BaseChannel], seconds: float) -> None:
        """A worker recorded a failed message of ``channel`` that is due in ``seconds``: the
        listener sweeps the channel then."""
        due = time.monotonic() + seconds + RETRY_MARGIN
        with self._books:
            earliest = self._retry_at[0][0] if self._retry_at else float("inf")
            # Every due time is kept: a sweep at the first finds the later ones not due yet.
            heapq.heappush(self._retry_at, (due, next(self._retries_scheduled), channel))
        if due < earliest:
            self._wake()  # the listener's wait has to end sooner

    def _due_retries(self, now: float) -> float:
        """Sweep the channels whose retries are due; returns when the next one is."""
        due = set()
        with self._books:
            while self._retry_at and self._retry_at[0][0] <= now:
                due.add(heapq.heappop(self._retry_at)[2])
            following = self._retry_at[0][0] if self._retry_at else float("inf")
        if due:
            self._want_sweep(list(due))
        return following

    def _due_schema_retries(self, now: float) -> float:
        """Try again the databases behind this version whose pause is over (a sweep of their
        channels finds out); returns when the next pause ends."""
        wanted: list[type[BaseChannel]] = []
        following = float("inf")
        with self._books:
            for wait in self._behind.values():
                if wait.retry_at <= now:
                    wait.retry_at = float("inf")
                    wait.retrying = True
                    wanted.extend(wait.channels)
                    wait.channels = set()
                following = min(following, wait.retry_at)
        if wanted:
            self._want_sweep(wanted)
        return following

    def _sweep_pause(self) -> float:
        # Jitter keeps the Runtimes of many processes from sweeping all at once.
        return self.sweep_interval * random.uniform(0.8, 1.0)

    def _count_ignored(self, channel_name: str, payload: str, reason: str) -> None:
        self._ignored += 1  # only the listener thread counts

    def _listen(self) -> None:
        # One LISTEN connection per database the channels are on (usually one), each with a
        # probe of its own.
        names: dict[str, list[str]] = {}
        probes: dict[str, Probe] = {}
        for channel in self.channels:
            alias = conf.listen_alias(channel.database)
            names.setdefault(alias, []).append(channel.listen_safe_name())
            # Producers write a channel's messages through its database's alias.
            probe = probes.setdefault(alias, Probe(alias, channel.database or self.using, []))
            if channel.database not in probe.databases:
                probe.databases.append(channel.database)
        self._probes = list(probes.values())
        alias_of = {name: alias for alias in names for name in names[alias]}
        alias_of.update({probe.channel: alias for alias, probe in probes.items()})
        listening = {alias: ListenConnection(alias) for alias in names}
        assembler = Assembler()
        delay = MIN_RECONNECT_DELAY
        ever_connected = False
        lost = True  # no connection yet, or they were lost (not closed for a probe)
        missed = False  # notifications may have been sent while no connection listened
        quiet_since = time.monotonic()
        lockable = self._lockable()
        next_sweep = time.monotonic() + self._sweep_pause() if lockable else float("inf")
        try:
            while not self._stop_wanted():
                try:
                    if not all(conn.connected for conn in listening.values()):
                        for alias, conn in listening.items():
                            if not conn.connected:
                                conn.connect()
                                conn.listen([*names[alias], probes[alias].channel])
                                self._send_probe(probes[alias])
                        # This thread uses no Django connection of its own, but a handler of
                        # connection_created may have opened one (django.contrib.postgres
                        # looks up the hstore type on it): close it, not to hold a session.
                        connections.close_all()
                        self._listening = True
                        if lost:
                            self._listener_error = None
                            if ever_connected:
                                self.reconnects += 1
                            ever_connected = True
                            lost = False
                            logger.info(
                                "Listening on %s",
                                ", ".join(channel.name() for channel in self.channels),
                            )
                        if missed:  # what was sent meanwhile is only in the table
                            self._want_sweep(self._lockable())
                            missed = False
                        quiet_since = time.monotonic()
                    self._enqueue_sweeps()
                    # Notifications, a stop request, wanted sweeps and newly scheduled retries
                    # all end the wait: it only has to end for what is due by then.
                    now = time.monotonic()
                    due = min(
                        quiet_since + KEEPALIVE_INTERVAL,
                        next_sweep,
                        self._due_retries(now),
                        self._due_schema_retries(now),
                        *(min(probe.deadline, probe.retry_at) for probe in probes.values()),
                    )
                    received = wait_any(
                        list(listening.values()), max(0.0, due - now), self._wakeup[0]
                    )
                    now = time.monotonic()
                    if now >= next_sweep:
                        self._want_sweep(lockable)
                        next_sweep = now + self._sweep_pause()
                    self._due_retries(now)
                    self._due_schema_retries(now)
                    # Each connection was read just now: one that brought nothing has nothing
                    # more on its way.
                    heard = {alias_of.get(item.channel) for item in received}
                    received = self._take_probes(received, probes)
                    if self._check_probes(probes, heard, now):
                        missed = True  # the LISTEN connection is deaf: the table has it all
                    for alias, probe in probes.items():
                        if now >= probe.retry_at:
                            probe.retry_at = float("inf")
                            if probe.reconnect:
                                listening[alias].close()  # LISTEN and probe again, above
                            else:
                                self._send_probe(probe)
                    if not received:
                        if time.monotonic() - quiet_since > KEEPALIVE_INTERVAL:
                            # A connection that died silently (a network partition) fails
                            # here rather than leaving the Runtime deaf.
                            for conn in listening.values():
                                if conn.connected:
                                    conn.ping()
                            quiet_since = time.monotonic()
                        continue
                    quiet_since = time.monotonic()
                    self.last_notification_at = time.time()
                    messages = assembler.whole_messages(received)
                    for delivery in plan(messages, ignored=self._count_ignored):
                        self._dispatch(delivery)
                    delay = MIN_RECONNECT_DELAY
                except Exception as exc:
                    self._listening = False
                    self._listener_error = exc
                    missed = True
                    for conn in listening.values():
                        conn.close()
                    for probe in probes.values():  # a new one follows the next LISTEN
                        probe.token = None
                        probe.deadline = probe.retry_at = float("inf")
                        probe.verified = False
                    pause = min(MAX_RECONNECT_DELAY, delay) * random.uniform(0.5, 1.0)
                    if is_connection_error(exc):
                        if ever_connected:
                            logger.warning(
                                "Lost the listening connection (%s); reconnecting in %.1fs",
                                one_line(exc),
                                pause,
                            )
                        else:
                            logger.warning(
                                "Cannot connect to the database to listen (%s); retrying in %.1fs",
                                one_line(exc),
                                pause,
                            )
                    else:
                        logger.exception("The listener failed; starting again in %.1fs", pause)
                    lost = True
                    # The wake-up pipe ends the pause for a stop request.
                    wait_any([], pause, self._wakeup[0])
                    delay *= 2
        finally:
            self._listening = False
            for conn in listening.values():
                conn.close()
            connections.close_all()

    def _send_probe(self, probe: Probe) -> None:
        """Have a NOTIFY with a new token sent to the probe channel of ``probe``'s LISTEN
        connection, through the alias producers use (never that connection itself)."""
        probe.token = secrets.token_hex(16)
        probe.verified = False
        try:
            send_notification(probe.via, probe.channel, probe.token, PROBE_TIMEOUT)
        except Exception as exc:
            # Producers cannot reach the database either: the health view says so.
            probe.token = None
            probe.deadline = float("inf")
            probe.failures += 1
            probe.reconnect = False
            pause = probe.pause()
            probe.retry_at = time.monotonic() + pause
            logger.warning(
                "Cannot send the NOTIFY that checks that notifications reach the LISTEN "
                "connection of alias %r, through alias %r (%s); trying again in %.1fs",
                probe.listen_alias,
                probe.via,
                one_line(exc),
                pause,
            )
            return
        probe.deadline = time.monotonic() + PROBE_TIMEOUT

    def _take_probes(self, received: list[Any], probes: dict[str, Probe]) -> list[Any]:
        """``received`` without the probes' notifications, which no channel's listener gets;
        a probe's token that arrived proves that its LISTEN connection works."""
        by_channel = {probe.channel: probe for probe in probes.values()}
        others = []
        for item in received:
            probe = by_channel.get(item.channel)
            if probe is None:
                others.append(item)
            elif probe.token is not None and item.payload == probe.token:
                probe.token = None
                probe.deadline = float("inf")
                probe.failures = 0
                probe.verified = True
                if probe.failing:
                    probe.failing = None
                    logger.warning(
                        "Notifications reach the LISTEN connection of alias %r again",
                        probe.listen_alias,
                    )
        return others

    def _check_probes(self, probes: dict[str, Probe], heard: set[str | None], now: float) -> bool:
        """Fail the probes whose token is late, unless their connection just brought something
        (it is read again first); True if one failed."""
        failed = False
        for probe in probes.values():
            if probe.token is None or now < probe.deadline or probe.listen_alias in heard:
                continue
            failed = True
            probe.token = None
            probe.deadline = float("inf")
            probe.failures += 1
            probe.reconnect = True
            pause = probe.pause()
            probe.retry_at = now + pause
            message = (
                f"Notifications do not reach this Runtime: a NOTIFY sent through alias "
                f"{probe.via!r} did not arrive within {PROBE_TIMEOUT:.0f}s on the LISTEN "
                f"connection of alias {probe.listen_alias!r}. Does {probe.listen_alias!r} go "
                "through PgBouncer in transaction pooling mode (transaction pooling?)? LISTEN "
                f"needs a direct connection or session pooling: set {probe.fix()}. Meanwhile "
                "plain messages are lost, and lockable ones wait for a sweep (every "
                f"{self.sweep_interval:g}s)"
            )
            if probe.failing is None:
                logger.error("%s; probing again in %.1fs", message, pause)
            else:
                logger.debug("Still no notification; probing again in %.1fs", pause)
            probe.failing = message
        if failed:
            self._want_sweep(self._lockable())
        return failed

    def _dispatch(self, delivery: Delivery) -> None:
        if delivery.kind is Kind.SWEEP:
            self._want_sweep([delivery.channel])
        elif delivery.kind is Kind.ROWS:
            with self._books:
                # Older rows of the channel wait for a sweep: these join them, so that the
                # channel's rows still run in arrival (id) order.
                behind_a_sweep = delivery.channel in self._sweeps_wanted
            if behind_a_sweep or not self._queue.offer(delivery):
                # No room: the rows are stored, a sweep claims them once there is.
                logger.debug(
                    "Queue full: %s stored row(s) of %s left for a sweep",
                    len(delivery.row_ids),
                    delivery.channel.name(),
                )
                self._want_sweep([delivery.channel])
        else:
            # A plain message exists only here: wait for room (Postgres queues what arrives
            # meanwhile), unless the Runtime stops.
            while not self._queue.put(delivery, WAIT_TIMEOUT):
                if self._stop_wanted():
                    logger.warning(
                        "Stopping: a plain message of %s not processed", delivery.channel.name()
                    )
                    return

    def _enqueue_sweeps(self) -> None:
        with self._books:
            for channel in list(self._sweeps_wanted - self._sweeping):
                if not self._queue.offer(Delivery.sweep(channel)):
                    return
                self._sweeps_wanted.discard(channel)
                self._sweeping.add(channel)

    # -- the worker threads ----------------------------------------------------------------

    def _work(self, processor: Processor) -> None:
        last_used = time.monotonic()
        try:
            while not self._stopping.is_set():
                delivery = self._queue.get(IDLE_WAIT)  # stop() closes the queue: no polling
                if delivery is None:
                    continue
                if self._stopping.is_set():  # taken just as the Runtime stops: not started
                    if delivery.kind is Kind.PLAIN:
                        logger.warning(
                            "Stopping: a plain message of %s not processed",
                            delivery.channel.name(),
                        )
                    self._queue.done(delivery)
                    break
                with self._books:
                    self._in_flight += 1
                continued = False
                part = delivery
                if delivery.kind is Kind.SWEEP and not isinstance(delivery, SweepPart):
                    # The first page of a sweep: what its pages and batches process adds up.
                    part = SweepPart(
                        Kind.SWEEP,
                        delivery.channel,
                        delivery.callbacks,
                        after_id=delivery.after_id,
                        tally=SweepTally(),
                    )
                try:
                    tidy_connections()
                    if time.monotonic() - last_used > IDLE_CHECK_AFTER:
                        # An idle connection may have been closed by the server or a proxy:
                        # find out now rather than by failing the delivery.
                        close_if_unusable(delivery.channel.database or self.using)
                    continued = self._run(processor, part)
                finally:
                    last_used = time.monotonic()
                    with self._books:
                        self._in_flight -= 1
                        if delivery.kind is Kind.SWEEP and not continued:
                            self._sweeping.discard(delivery.channel)
                        waiting = bool(self._sweeps_wanted - self._sweeping)
                    if isinstance(part, SweepPart) and part.tally is not None:
                        self._part_done(part.channel, part.tally)
                    self._queue.done(delivery)
                    if waiting:  # there is room now: the listener queues them
                        self._wake()
        finally:
            connections.close_all()  # this thread's connections

    def _run(self, processor: Processor, delivery: Delivery) -> bool:
        """Run ``delivery``; True when it was a sweep that queued its continuation. Stored rows
        whose connection broke are tried once more on a new connection, then left to a sweep;
        they stay stored either way. Nothing a callback raises ends the worker thread."""
        alias = delivery.channel.database or self.using
        for attempt in (1, 2):
            try:
                if delivery.kind is not Kind.PLAIN and not self._schema_ready(alias, delivery):
                    self._sweep_ends(delivery)
                    return False  # its rows stay stored: swept once the database is tried again
                if delivery.kind is Kind.SWEEP:
                    return self._sweep(processor.for_channel(delivery.channel), delivery)
                processed = processor.run(delivery)
                if isinstance(delivery, SweepPart) and delivery.tally is not None:
                    self._count_swept(delivery.tally, processed=processed)
                broke = processor.catch_up_needed
            except BaseException as exc:  # noqa: B036 - e.g. CancelledError, SystemExit
                if isinstance(exc, SchemaBehind):
                    self._schema_behind(exc, delivery.channel, processor)
                    self._sweep_ends(delivery)
                    return False
                if not is_connection_error(exc):
                    # Its transaction was rolled back: lockable rows stay stored.
                    logger.exception("Processing %s failed", delivery.channel.name())
                    processor.record_failure(exc)
                    close_if_unusable(alias)
                    return False
                broke = True
                logger.warning(
                    "The database connection broke while processing %s (%s)",
                    delivery.channel.name(),
                    one_line(exc),
                )
            processor.catch_up_needed = False
            if not broke:
                return False
            connections[alias].close()
            if attempt == 2 or self._stopping.is_set():
                self._want_sweep([delivery.channel])
                return False
        return False

    def _sweep_ends(self, delivery: Delivery) -> None:
        """A part of a sweep ends it (no more pages): no progress line for it."""
        if isinstance(delivery, SweepPart) and delivery.tally is not None:
            self._count_swept(delivery.tally, reading=False)

    def _schema_ready(self, alias: str, delivery: Delivery) -> bool:
        """False while database ``alias`` waits for ``migrate`` (the delivery's channel is swept
        once its pause ends). The first delivery after the pause reads the catalog: it raises
        SchemaBehind if the table still lacks columns, or says that processing starts again."""
        if not self._behind:  # the usual case: no lock taken
            return True
        with self._books:
            wait = self._behind.get(alias)
            if wait is None:
                return True
            if not wait.retrying:
                wait.channels.add(delivery.channel)
                return False
        store.check_schema(alias)
        with self._books:
            migrated = self._behind.pop(alias, None) is not None
        if migrated:
            logger.info(
                "pgpubsub's table %s in database %r has every column now: processing again",
                Notification._meta.db_table,
                alias,
            )
        return True

    def _schema_behind(
        self, error: SchemaBehind, channel: type[BaseChannel], processor: Processor
    ) -> None:
        """pgpubsub's statements met a table that lacks columns (``migrate`` not run): leave
        the database's lockable channels alone until the pause ends; say it once a pause."""
        alias = error.using
        with self._books:
            wait = self._behind.get(alias)
            first = wait is None
            if wait is None:
                wait = self._behind[alias] = SchemaWait()
            wait.channels.add(channel)
            if not (first or wait.retrying):
                return  # said already, for this pause
            wait.retrying = False
            wait.failures += 1
            pause = wait.pause()
            wait.retry_at = time.monotonic() + pause
        processor.last_error = error
        self._wake()  # the listener's wait must end with the pause
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

    def _sweep(self, processor: Processor, delivery: Delivery) -> bool:
        """Process a page of the channel's stored rows above ``delivery.after_id``: one batch
        here, the others handed to the pool as row deliveries (this thread runs those that
        find no room), then queue the next page. True if the next page was queued."""
        channel = delivery.channel
        tally = delivery.tally if isinstance(delivery, SweepPart) else None
        tally = tally or SweepTally()
        # Rows whose giving back a lost connection kept from us go back first: they are then in
        # this page, and uncounted (once their lease runs out, another process' claim would
        # count an attempt of each).
        processor.give_back_unreturned()
        page = store.pending_ids(
            channel, delivery.after_id, processor.using, limit=store.BATCH_SIZE * self.workers
        )
        if not page or self._stopping.is_set():
            self._count_swept(tally, reading=False)
            return False
        full = len(page) == store.BATCH_SIZE * self.workers  # there may be more
        # Counted before the next page can be read (by another worker), so pages add up in order.
        self._count_swept(tally, read=len(page), last_id=page[-1], reading=full)
        batches = [page[i : i + store.BATCH_SIZE] for i in range(0, len(page), store.BATCH_SIZE)]
        here = batches[:1]
        for batch in batches[1:]:
            if not self._offer_part(
                tally, SweepPart(Kind.ROWS, channel, delivery.callbacks, row_ids=batch)
            ):
                here.append(batch)
        continued = False
        if full:
            next_page = SweepPart(Kind.SWEEP, channel, delivery.callbacks, after_id=page[-1])
            continued = self._offer_part(tally, next_page)
            if not continued:
                self._count_swept(tally, reading=False)  # this sweep ends here
                self._want_sweep([channel])  # another, once this one is done and there is room
        for batch in here:
            processed = processor.process_stored_rows(
                channel, batch, delivery.callbacks, raise_on_disconnect=True
            )
            self._count_swept(tally, processed=processed)
        return continued

    def _offer_part(self, tally: SweepTally, part: SweepPart) -> bool:
        """Queue a page or batch of the sweep of ``tally`` if there is room now."""
        part.tally = tally
        with self._books:
            tally.parts += 1  # before a worker can take it (and finish it)
        if self._queue.offer(part):
            return True
        with self._books:
            tally.parts -= 1
        return False

    def _count_swept(
        self,
        tally: SweepTally,
        read: int = 0,
        processed: int = 0,
        last_id: int | None = None,
        reading: bool | None = None,
    ) -> None:
        with self._books:
            tally.read += read
            tally.processed += processed
            if last_id is not None:
                tally.last_id = last_id
            if reading is not None:
                tally.reading = tally.reading and reading

    def _part_done(self, channel: type[BaseChannel], tally: SweepTally) -> None:
        """A page or batch of a sweep is done: log the sweep's progress every
        ``PROGRESS_INTERVAL`` seconds while it reads pages, and its end once every part is
        done (rows another Runtime took, or that failed, are not counted as processed)."""
        now = time.monotonic()
        with self._books:
            tally.parts -= 1
            ended = tally.parts == 0 and not tally.reading
            progress = tally.reading and now >= self._next_report.get(channel, 0.0)
            if progress:
                self._next_report[channel] = now + PROGRESS_INTERVAL
            read, processed, last_id = tally.read, tally.processed, tally.last_id
        if progress:
            logger.info(
                "Sweeping %s: %s stored notifications processed so far (read up to id %s)",
                channel.name(),
                processed,
                last_id,
            )
        elif ended and read > store.BATCH_SIZE:
            if processed == read:
                logger.info("Swept %s stored notifications of %s", processed, channel.name())
            else:
                logger.info(
                    "Swept %s stored notifications of %s (of %s found: the others failed, or "
                    "another listener took them)",
                    processed,
                    channel.name(),
                    read,
                )


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


def is_connection_error(exc: BaseException | None) -> bool:
    """True for a lost or refused connection, from Django or straight from the driver."""
    while exc is not None:
        if isinstance(exc, OSError | InterfaceError | OperationalError):
            return True
        if any(cls.__name__ in ("OperationalError", "InterfaceError") for cls in type(exc).__mro__):
            return True
        exc = exc.__cause__
    return False
