"""The watcher: how listeners learn that lockable messages were stored, without a NOTIFY in the
writer's transaction.

PostgreSQL serialises the commits of every transaction that sent a NOTIFY (one instance-wide
lock, so that notifications queue in commit order). So by default a writer only stores the row
(``pgpubsub_store``), and one Runtime in the whole deployment per database, the *watcher*, tells
the listeners: it looks for rows above the highest id it has seen, and sends one NOTIFY
(``wire.WAKE``: "sweep this channel") per channel that has new rows, in its own transaction.
Every Runtime LISTENs for those wake-ups and claims the rows as usual.

- **Election.** Each Runtime with lockable channels tries, on its LISTEN session, to take a
  session advisory lock (``pg_try_advisory_lock(LOCK_KEY)``); the one that holds it watches.
  The lock goes with the session: when the watcher's process dies, stops or loses its
  connection, another Runtime takes it at its next try (every ``ELECTION_INTERVAL`` seconds).
- **Looks.** One query per look, on the LISTEN session: new rows by channel, above the
  watermark (an index range on the primary key: nothing to read when nothing is new). Looks
  follow each other every ``MIN_INTERVAL`` seconds while rows keep coming (and for
  ``ACTIVE_WINDOW`` seconds after the last, so that a writer's pause costs the next row no
  latency) and back off, doubling, to ``PGPUBSUB_WATCH_INTERVAL`` when none do.
- **Rows that commit late.** Ids are taken when a row is inserted, not when it commits: a row
  of a long transaction can become visible below the watermark (also below a new watcher's
  first one: its ``FIRST_LOOK_GAPS`` newest ids are gaps too). The ids missing below the
  watermark (*gaps*: a transaction still open, one rolled back, a row already processed) are
  looked for again with every look, for ``GAP_TIMEOUT`` seconds (at most ``MAX_GAPS`` of them).
- **Nothing lost.** A wake-up is only a hint: whatever no look announced (a watcher killed
  between commit and look, a row committed after its gap expired) is still processed by the
  sweeps every ``PGPUBSUB_SWEEP_INTERVAL`` seconds, and a new watcher's first look announces
  every channel that has stored rows.

Channels that notify on write (``pgpubsub_notify_on_write()``, see
:mod:`pgpubsub.db_functions`) are not announced: their writers woke the listeners already.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

from pgpubsub import store, wire
from pgpubsub.connection import LISTENER_TAG, is_connection_error, one_line, sqlstate
from pgpubsub.models import Notification

logger = logging.getLogger("pgpubsub.runtime")

#: The session advisory lock the watcher of a database holds (``pg_try_advisory_lock(int,
#: int)``): "pgps" and 1.
LOCK_KEY = (0x70677073, 1)
#: Seconds between two looks while new rows keep coming.
MIN_INTERVAL = 0.005
#: Seconds after the last look that found rows during which looks stay ``MIN_INTERVAL`` apart.
ACTIVE_WINDOW = 1.0
#: Seconds between two tries of a Runtime that does not watch to become the watcher (with
#: jitter: between half of it and all of it).
ELECTION_INTERVAL = 5.0
#: Seconds a missing id below the watermark is looked for before the sweeps are left with it.
GAP_TIMEOUT = 10.0
#: The most missing ids looked for at once (the newest are kept).
MAX_GAPS = 1000
#: How many of the newest ids below its first watermark a new watcher looks for as gaps (rows
#: of transactions that took their id before the look and commit after it).
FIRST_LOOK_GAPS = 64
#: Seconds before a look that failed for another reason than the connection is tried again.
FAILED_LOOK_PAUSE = 30.0

_TABLE = Notification._meta.db_table

_LOOK = f"""{LISTENER_TAG}
SELECT channel, {{flag}}, count(*) FILTER (WHERE id > %(mark)s), max(id),
       array_agg(id) FILTER (WHERE id <= %(mark)s), min(id)
FROM {_TABLE} WHERE id > %(mark)s OR id = ANY(%(gaps)s::bigint[])
GROUP BY channel
"""
#: Whether a stored name notifies on write, from the installed SQL functions; databases whose
#: functions predate it announce every channel (a wake-up more does no harm).
_FLAG = "pgpubsub_notify_on_write(channel)"
_NO_FLAG = "false"


class Watcher:
    """The watching of one database, from one Runtime's LISTEN session: :meth:`tick` when
    :meth:`due` (the listener thread calls both); :meth:`forget` once the session is gone."""

    def __init__(
        self,
        alias: str,
        max_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.alias = alias
        self.max_interval = max_interval
        self.clock = clock
        self.elected = False
        self.next_at = clock()  # try as soon as the session is up
        self.interval = MIN_INTERVAL
        self.found_at = float("-inf")  # when a look last found rows
        self.watermark: int | None = None  # the highest id seen (None: no look yet)
        self.gaps: dict[int, float] = {}  # ids missing below the watermark: when first missed
        self._flag = _FLAG
        self._failing: str | None = None  # what made the last look fail, said once

    def due(self) -> float:
        return self.next_at

    def forget(self) -> None:
        """The session is gone, and the lock with it: try again once reconnected."""
        if self.elected:
            logger.info("No longer watching %s for new stored notifications", self.alias)
        self.elected = False
        self.watermark = None
        self.gaps.clear()
        self.next_at = self.clock()

    def tick(self, conn: Any) -> None:
        """Try to become the watcher, or look and wake the listeners; ``conn`` is the raw
        autocommit LISTEN connection. A lost connection raises (the caller reconnects)."""
        now = self.clock()
        try:
            with conn.cursor() as cursor:
                if not self.elected:
                    if not self._elect(cursor, now):
                        return
                found = self._look(cursor, now)
                if found:
                    self._wake(cursor, found)
        except Exception as exc:
            if is_connection_error(exc):
                raise
            self._look_failed(exc)
            return
        self._failing = None
        if found:
            self.found_at = now
        if now - self.found_at < ACTIVE_WINDOW:
            self.interval = MIN_INTERVAL
        else:
            self.interval = min(self.max_interval, self.interval * 2)
        self.next_at = self.clock() + self.interval

    def _elect(self, cursor: Any, now: float) -> bool:
        cursor.execute(f"{LISTENER_TAG}SELECT pg_try_advisory_lock(%s, %s)", LOCK_KEY)
        if not cursor.fetchone()[0]:
            self.next_at = now + ELECTION_INTERVAL * random.uniform(0.5, 1.0)
            return False
        self.elected = True
        self.watermark = None
        self.gaps.clear()
        logger.info(
            "Watching %s for new stored notifications (this Runtime wakes the listeners of "
            "the lockable channels)",
            self.alias,
        )
        return True

    def _look(self, cursor: Any, now: float) -> list[str]:
        """The LISTEN names of the channels with rows no look saw before; moves the watermark
        and keeps track of the ids missing below it."""
        first = self.watermark is None
        mark = 0 if first else self.watermark
        gaps = list(self.gaps)
        try:
            cursor.execute(_LOOK.format(flag=self._flag), {"mark": mark, "gaps": gaps})
        except Exception as exc:
            if self._flag == _NO_FLAG or sqlstate(exc) != "42883":
                raise
            self._flag = _NO_FLAG  # functions installed by an older version: no such function
            cursor.execute(_LOOK.format(flag=self._flag), {"mark": mark, "gaps": gaps})
        rows = cursor.fetchall()
        found = []
        present = 0
        top = mark
        for stored, notifies, new, highest, late, lowest in rows:
            for row_id in late or ():
                self.gaps.pop(row_id, None)
            present += new
            if new:
                top = max(top, highest)
            if (new or late) and not notifies:
                found.append((lowest, store.wire_name(stored)))
        if first:
            if not rows:
                top = self._sequence_position(cursor)  # older ids missing below it are no news
            # The newest ids below the first watermark may belong to writers that commit after
            # this look: they are looked for, as gaps.
            self._missing(cursor, max(0, top - FIRST_LOOK_GAPS), top, now)
        elif top - mark > present:
            self._missing(cursor, mark, top, now)
        self.watermark = top
        for row_id, since in list(self.gaps.items()):
            if now - since > GAP_TIMEOUT:
                del self.gaps[row_id]
        # In the order their first rows were stored: a Runtime with one worker thread sweeps
        # the channels of one look in that order.
        return list(dict.fromkeys(name for _, name in sorted(found)))

    @staticmethod
    def _sequence_position(cursor: Any) -> int:
        """The last id the table's sequence gave (0 when unknown): where an empty table's
        watermark starts."""
        try:
            cursor.execute(
                f"{LISTENER_TAG}SELECT pg_sequence_last_value("
                f"pg_get_serial_sequence('{_TABLE}', 'id')::regclass)"
            )
        except Exception as exc:
            if is_connection_error(exc):
                raise
            return 0  # e.g. no privilege on the sequence: a few ids more to look for, once
        return cursor.fetchone()[0] or 0

    def _missing(self, cursor: Any, mark: int, top: int, now: float) -> None:
        """Remember the ids above ``mark`` up to ``top`` that no committed row has (yet)."""
        cursor.execute(
            f"{LISTENER_TAG}SELECT id FROM {_TABLE} WHERE id > %s AND id <= %s", [mark, top]
        )
        present = {row[0] for row in cursor.fetchall()}
        low = max(mark + 1, top - MAX_GAPS * 4)  # a huge hole (rows deleted): its newest ids
        for row_id in range(low, top + 1):
            if row_id not in present:
                self.gaps.setdefault(row_id, now)
        if len(self.gaps) > MAX_GAPS:
            for row_id in sorted(self.gaps)[: len(self.gaps) - MAX_GAPS]:
                del self.gaps[row_id]

    def _wake(self, cursor: Any, names: list[str]) -> None:
        """One NOTIFY per channel, in one transaction of the watcher's own."""
        cursor.execute(
            f"{LISTENER_TAG}SELECT pg_notify(name, %s) FROM unnest(%s::text[]) AS name",
            [wire.WAKE, names],
        )

    def _look_failed(self, exc: Exception) -> None:
        """Not the connection: most likely pgpubsub's table is missing or behind (``migrate``
        not run). Say so once; the sweeps go on meanwhile."""
        problem = one_line(exc)
        if problem != self._failing:
            logger.warning(
                "The watcher cannot look for new stored notifications in %s (%s); trying again "
                "in %.0fs, the sweeps go on meanwhile",
                self.alias,
                problem,
                FAILED_LOOK_PAUSE,
            )
        self._failing = problem
        self.next_at = self.clock() + FAILED_LOOK_PAUSE
