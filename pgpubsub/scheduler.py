"""When a Runtime sweeps each lockable channel's stored rows.

A channel is swept when a sweep is *wanted*: when a wake-up (the watcher's, or a request to
process stored rows) arrives, when the queue had no room for a notification of it, when a
failed message of it is due again (its retry), and once a database that lacked pgpubsub's
migrations is tried again. A channel has at most one sweep running; a sweep wanted meanwhile
starts after it.

At start (``recover``), after a reconnection, and every ``PGPUBSUB_SWEEP_INTERVAL`` seconds
(with jitter: the Runtimes of many processes do not look all at once) a *look* is wanted: the
listener asks, on its own connection, which lockable channels have due rows, and only those
are swept. An idle Runtime's workers need no connection for it.

The listener thread calls :meth:`Scheduler.tick` and :meth:`Scheduler.take` in its loop, and
waits at most until the time ``tick`` returns; workers tell when a retry is due and when a
sweep ends. Whoever makes something due sooner calls ``wake()`` to end the listener's wait.
"""

from __future__ import annotations

import heapq
import itertools
import random
import threading
import time
from collections.abc import Callable, Iterable

from pgpubsub.channel import BaseChannel

#: Seconds added to a retry's delay before its sweep, so that the row is due when swept.
RETRY_MARGIN = 0.05
#: First and longest pause before a database whose pgpubsub table lacks columns (``migrate``
#: not run) is tried again, in seconds (doubling, with jitter).
MIN_SCHEMA_RETRY_DELAY = 1.0
MAX_SCHEMA_RETRY_DELAY = 60.0

Channel = type[BaseChannel]


class SchemaWait:
    """A database whose pgpubsub table lacks what this version uses: its lockable channels
    wait, and are tried again after each pause."""

    def __init__(self) -> None:
        self.failures = 0  # tries in a row that found the table behind
        self.retry_at = float("inf")  # when to try again (time.monotonic())
        self.retrying = False  # the pause is over: the next delivery finds out
        self.channels: set[Channel] = set()  # to sweep once it is tried again

    def pause(self) -> float:
        delay = MIN_SCHEMA_RETRY_DELAY * 2 ** max(0, self.failures - 1)
        return min(MAX_SCHEMA_RETRY_DELAY, delay) * random.uniform(0.8, 1.0)


class Scheduler:
    """The sweeps wanted and running, the retries and schema waits pending, of one Runtime.

    ``lockable``: the channels swept every ``sweep_interval`` seconds; ``wake()``: ends the
    listener's wait (it must not block: it may be called with the lock held elsewhere)."""

    def __init__(
        self,
        lockable: Iterable[Channel],
        sweep_interval: float,
        wake: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lockable = list(lockable)
        self.sweep_interval = sweep_interval
        self.wake = wake
        self.clock = clock
        self.lock = threading.Lock()
        self.wanted: set[Channel] = set()
        self.sweeping: set[Channel] = set()
        # (when, number, channel) of each failed message due again, a heap.
        self._retries: list[tuple[float, int, Channel]] = []
        self._numbers = itertools.count()
        self.behind: dict[str, SchemaWait] = {}  # databases waiting for migrate, by alias
        self.look_wanted = False  # the listener looks which channels have due rows
        self.next_sweep = clock() + self.sweep_pause() if self.lockable else float("inf")

    def sweep_pause(self) -> float:
        # Jitter keeps the Runtimes of many processes from sweeping all at once.
        return self.sweep_interval * random.uniform(0.8, 1.0)

    # -- what is wanted --------------------------------------------------------------------

    def want_sweep(self, channels: Iterable[Channel]) -> None:
        with self.lock:
            self.wanted.update(channels)
        self.wake()  # the listener queues sweeps

    def want_all(self) -> None:
        """Sweep the lockable channels that have due rows (notifications may have been
        missed): the listener looks which ones (:meth:`take_look`)."""
        if self.lockable:
            with self.lock:
                self.look_wanted = True
            self.wake()

    def take_look(self) -> bool:
        """A look is wanted (and now taken by the caller)."""
        with self.lock:
            wanted, self.look_wanted = self.look_wanted, False
            return wanted

    def retry_in(self, channel: Channel, seconds: float) -> None:
        """A failed message of ``channel`` is due in ``seconds``: sweep the channel then."""
        due = self.clock() + seconds + RETRY_MARGIN
        with self.lock:
            earliest = self._retries[0][0] if self._retries else float("inf")
            # Every due time is kept: a sweep at the first finds the later ones not due yet.
            heapq.heappush(self._retries, (due, next(self._numbers), channel))
        if due < earliest:
            self.wake()  # the listener's wait has to end sooner

    def is_wanted(self, channel: Channel) -> bool:
        """A sweep of ``channel`` waits to start (newer rows of it wait behind it)."""
        return channel in self.wanted

    def waiting(self) -> bool:
        """Some wanted sweep can start (its channel is not being swept)."""
        with self.lock:
            return bool(self.wanted - self.sweeping)

    # -- the listener's loop -----------------------------------------------------------------

    def tick(self, now: float | None = None) -> float:
        """Make wanted what is due by ``now``: the periodic look, retries, databases to try
        again. Returns when the next of them is due."""
        now = self.clock() if now is None else now
        due: set[Channel] = set()
        with self.lock:
            if now >= self.next_sweep:
                self.look_wanted = True
                self.next_sweep = now + self.sweep_pause()
            while self._retries and self._retries[0][0] <= now:
                due.add(heapq.heappop(self._retries)[2])
            following = min(self.next_sweep, self._retries[0][0] if self._retries else float("inf"))
            for wait in self.behind.values():
                if wait.retry_at <= now:
                    wait.retry_at = float("inf")
                    wait.retrying = True
                    due.update(wait.channels)
                    wait.channels = set()
                following = min(following, wait.retry_at)
            self.wanted.update(due)
        return following

    def take(self, offer: Callable[[Channel], bool]) -> None:
        """Start the wanted sweeps of channels not being swept: ``offer(channel)`` queues one
        if there is room (False: none now, the others wait too)."""
        with self.lock:
            for channel in list(self.wanted - self.sweeping):
                if not offer(channel):
                    return
                self.wanted.discard(channel)
                self.sweeping.add(channel)

    def sweep_ended(self, channel: Channel) -> None:
        """A sweep of ``channel`` ended (a sweep wanted meanwhile can start)."""
        with self.lock:
            self.sweeping.discard(channel)

    # -- databases that lack pgpubsub's migrations -------------------------------------------

    def schema_state(self, alias: str, channel: Channel) -> str:
        """``"ready"``: process; ``"wait"``: the database waits for migrate (the channel is swept
        once its pause ends); ``"check"``: the pause is over, the caller checks the schema."""
        if not self.behind:  # the usual case: no lock taken
            return "ready"
        with self.lock:
            wait = self.behind.get(alias)
            if wait is None:
                return "ready"
            if not wait.retrying:
                wait.channels.add(channel)
                return "wait"
        return "check"

    def schema_migrated(self, alias: str) -> bool:
        """The database has every column now; True if it was waiting."""
        with self.lock:
            return self.behind.pop(alias, None) is not None

    def schema_behind(self, alias: str, channel: Channel) -> float | None:
        """pgpubsub's statements met a table that lacks columns: ``channel`` waits with the
        database. Returns the pause before it is tried again when that is news to say (first
        time, or the retry after a pause failed), else None."""
        with self.lock:
            wait = self.behind.get(alias)
            first = wait is None
            if wait is None:
                wait = self.behind[alias] = SchemaWait()
            wait.channels.add(channel)
            if not (first or wait.retrying):
                return None  # said already, for this pause
            wait.retrying = False
            wait.failures += 1
            pause = wait.pause()
            wait.retry_at = self.clock() + pause
        self.wake()  # the listener's wait must end with the pause
        return pause
