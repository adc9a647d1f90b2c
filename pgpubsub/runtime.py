"""The Runtime: one listener thread, a bounded queue of deliveries and a pool of worker threads.

The Runtime owns the parts and their lives; each part has a module of its own, in the order of
the data path:

- :mod:`pgpubsub.listening`: the listener thread, its LISTEN connections (and their
  :mod:`~pgpubsub.probes`), turning what arrives into deliveries;
- :mod:`pgpubsub.deliveries`: the bounded queue between the listener and the workers;
- :mod:`pgpubsub.workers`: the worker threads, each running deliveries through
  :mod:`pgpubsub.processing` on its own Django connections;
- :mod:`pgpubsub.scheduler` and :mod:`pgpubsub.sweeps`: when the stored rows of lockable
  channels are swept, and how (lockable rows are the truth; a NOTIFY is only a hint).

``start()`` and ``stop()`` may be called from any thread, any number of times; ``run()`` blocks
until a stop request; ``status()`` says what the Runtime is doing.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from pgpubsub import conf, event_loop, retries
from pgpubsub.channel import BaseChannel, ChannelNotFound, select_channels
from pgpubsub.deliveries import DeliveryQueue, Kind
from pgpubsub.listening import Listener
from pgpubsub.models import notifications_alias
from pgpubsub.probes import NOTIFICATIONS_NOT_RECEIVED, NotificationsNotReceived
from pgpubsub.scheduler import Scheduler
from pgpubsub.wakeup import Wakeup
from pgpubsub.workers import IDLE_WAIT, Workers

logger = logging.getLogger(__name__)

__all__ = ["NOTIFICATIONS_NOT_RECEIVED", "Runtime", "Wakeup", "live_runtimes"]

# The Runtimes started in this process and not stopped yet.
_live: set[Runtime] = set()
_live_lock = threading.Lock()


def _forget_after_fork() -> None:
    global _live_lock
    _live_lock = threading.Lock()  # another thread may have held it at the fork
    _live.clear()  # the parent's Runtimes: their threads did not come along


os.register_at_fork(after_in_child=_forget_after_fork)


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
            if channel.lock_notifications:
                retries.check(channel)  # imports a policy named by its dotted path
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
        self.using = notifications_alias()
        self._queue = DeliveryQueue(conf.queue_size() if queue_size is None else queue_size)
        self._stopping = threading.Event()
        # request_stop() was called (maybe by a signal handler, which may set nothing more).
        self._stop_requested = False
        self._waiter: Wakeup | None = None  # what run() waits on
        self._state = threading.Lock()  # start/stop
        self._threads: list[threading.Thread] = []
        self._pid: int | None = None
        self._wakeup: tuple[int, int] | None = None
        self._loop: event_loop.EventLoop | None = None  # where async listeners run
        lockable = [channel for channel in self.channels if channel.lock_notifications]
        self._scheduler = Scheduler(lockable, self.sweep_interval, self._wake)
        self._workers = Workers(
            self._queue, self._scheduler, self._stopping, self.workers, self._wake
        )
        self._listener: Listener | None = None
        self.started_at: float | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return bool(self._threads) and not self._stopping.is_set() and self._pid == os.getpid()

    @property
    def connected(self) -> bool:
        """Every LISTEN connection is up, and no probe found that notifications miss it."""
        listener = self._listener
        return (
            listener is not None
            and listener.connected
            and not any(probe.failing for probe in listener.probes.values())
        )

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
                self._scheduler.want_all()
            self._listener = Listener(
                self.channels,
                self._queue,
                self._scheduler,
                self._stop_wanted,
                self._wakeup[0],
            )
            self._loop = event_loop.install(conf.async_concurrency())
            threads = [threading.Thread(target=self._listener.run, name="pgpubsub-listener")]
            for number in range(self.workers):
                threads.append(
                    threading.Thread(
                        target=self._workers.work,
                        args=(self._workers.processors(self.using),),
                        name=f"pgpubsub-worker-{number}",
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
        plain = sum(len(delivery.payloads) for delivery in dropped if delivery.kind is Kind.PLAIN)
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
        loop, self._loop = self._loop, None
        if loop is not None:  # after the workers: none waits for a coroutine now
            event_loop.uninstall(loop, max(0.0, deadline - time.monotonic()))
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

    @property
    def reconnects(self) -> int:
        return self._listener.reconnects if self._listener else 0

    @property
    def last_notification_at(self) -> float | None:
        return self._listener.last_notification_at if self._listener else None

    def status(self) -> dict[str, Any]:
        """What the Runtime is doing, for health checks and metrics (no payloads)."""
        stats = self._workers.stats
        listener = self._listener
        probes = list(listener.probes.values()) if listener else []
        failing = [probe.failing for probe in probes if probe.failing]
        last_error = (
            (listener.error if listener else None)
            or (NotificationsNotReceived(failing[0]) if failing else None)
            or stats.last_error
        )
        return {
            "pid": self._pid,
            "running": self.running,
            "connected": self.connected,
            # Short codes of what keeps the Runtime from working (the health view's too).
            "problems": [NOTIFICATIONS_NOT_RECEIVED] if failing else [],
            # A probe NOTIFY reached each LISTEN connection since it last LISTENed.
            "notifications_verified": bool(probes) and all(probe.verified for probe in probes),
            # This Runtime is the elected watcher of a database (see pgpubsub.watcher).
            "watching": bool(listener) and any(w.elected for w in listener.watchers.values()),
            "channels": [channel.name() for channel in self.channels],
            "workers": self.workers,
            "queue_size": self._queue.maxsize,
            "queue_depth": len(self._queue),
            "in_flight": self._workers.in_flight,
            "processed": stats.processed,
            "failed": stats.failed,
            "invalid": stats.invalid,
            "ignored": listener.ignored if listener else 0,
            "reconnects": self.reconnects,
            "last_error": None
            if last_error is None
            else f"{type(last_error).__name__}: {last_error}",
            "last_notification_at": self.last_notification_at,
            "started_at": self.started_at,
        }
