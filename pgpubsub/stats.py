"""What the processors of a Runtime did: counts and the errors they met, for ``status()``.

One :class:`Stats` is passed to every processor of a Runtime (one per worker and database); a
new counter is a field here, counted where it happens, and reported by ``Runtime.status()``.
"""

from __future__ import annotations

import threading


class Stats:
    """Counts of messages and the first and last error met; safe to share between threads."""

    def __init__(self) -> None:
        self.processed = 0
        self.failed = 0
        self.invalid = 0  # of the failed: messages that could not be read
        self.first_error: BaseException | None = None
        self.last_error: BaseException | None = None
        self._lock = threading.Lock()

    def count(self, processed: int = 0, failed: int = 0, invalid: int = 0) -> None:
        with self._lock:
            self.processed += processed
            self.failed += failed
            self.invalid += invalid

    def failure(self, error: BaseException, invalid: bool = False) -> None:
        """A message failed (already logged): count it and keep its error."""
        self.count(failed=1, invalid=int(invalid))
        self.last_error = error
        if self.first_error is None:
            self.first_error = error

    def note_error(self, error: BaseException) -> None:
        """An error that failed no message (a lost connection): kept if it is the first."""
        if self.first_error is None:
            self.first_error = error
