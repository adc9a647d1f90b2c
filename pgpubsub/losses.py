"""What lost connections leave behind: how many times in a row each stored row lost its
connection (from ``LOSSES_PER_ATTEMPT`` in a row on, a loss counts as a failed attempt; see
:meth:`pgpubsub.failures.Failures.connection_lost`), and the rows a lost connection kept from
being given back (given back once the server is there again)."""

from __future__ import annotations

import threading
from collections.abc import Iterable


class Losses:
    """How many times in a row the connection broke while each stored row was processed, and
    the rows a lost connection kept from being given back; shared by the workers of a Runtime
    (a row may come back to another one)."""

    #: Rows remembered at most (a flood of losses forgets the oldest).
    LIMIT = 10_000

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self._lock = threading.Lock()
        # (database alias, claim) -> ids of rows a lost connection kept from being given back.
        self._unreturned: dict[tuple[str, str], list[int]] = {}

    def lost(self, row_ids: Iterable[int]) -> dict[int, int]:
        """Count one more loss for each row; their counts."""
        with self._lock:
            counts = {pk: self._counts.get(pk, 0) + 1 for pk in row_ids}
            self._counts.update(counts)
            while len(self._counts) > self.LIMIT:
                del self._counts[next(iter(self._counts))]
            return counts

    def forget(self, row_ids: Iterable[int]) -> None:
        """The rows were processed."""
        if self._counts:
            with self._lock:
                for pk in row_ids:
                    self._counts.pop(pk, None)

    def unreturned(self, using: str, claim: str, row_ids: list[int]) -> None:
        """Rows of ``claim`` are still to be given back (or no longer, if empty)."""
        with self._lock:
            if row_ids:
                self._unreturned[using, claim] = list(row_ids)
            else:
                self._unreturned.pop((using, claim), None)

    def to_give_back(self, using: str) -> list[tuple[str, list[int]]]:
        """(claim, row ids) of the rows of database ``using`` still to be given back."""
        if not self._unreturned:
            return []
        with self._lock:
            return [
                (claim, ids) for (alias, claim), ids in self._unreturned.items() if alias == using
            ]
