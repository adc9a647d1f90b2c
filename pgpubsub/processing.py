"""From a received notification to its listeners: plain messages run their callbacks; lockable
messages are claimed, run and acknowledged in one transaction, so each runs exactly once."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from django.db import connections, transaction

from pgpubsub import store, wire
from pgpubsub.channel import BaseChannel

logger = logging.getLogger(__name__)


class Processor:
    """Processes notifications on the calling thread's Django connection for ``using``.

    Failures are logged with their traceback and counted; they do not propagate, so one bad
    message or callback cannot stop a listener. A failed lockable message stays stored. The one
    exception is a lost database connection: that is raised, for the caller to reconnect.
    """

    def __init__(self, using: str = "default") -> None:
        self.using = using
        self.processed = 0
        self.failed = 0
        self._lock = threading.Lock()

    def _count(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self.processed += 1
            else:
                self.failed += 1

    def _open_connection(self) -> object:
        """The driver connection stored-row work is about to run on (opened if need be)."""
        db = connections[self.using]
        db.ensure_connection()
        return db.connection

    def _connection_lost(self, used: object | None) -> bool:
        """After a failure: True when the connection the work ran on (``used``; None if the
        work did not need one) broke. A broken connection is closed; Django may already have
        replaced it (``atomic()`` does when its rollback fails)."""
        db = connections[self.using]
        if used is not None and db.connection is not used:
            return True
        if db.connection is None or db.is_usable():
            return False
        db.close()
        return True

    def process(self, channel_name: str, payload: str) -> None:
        """Handle one whole (re-assembled) notification received on ``channel_name``."""
        found = BaseChannel.get(channel_name)
        if found is None:
            logger.warning("Ignoring notification on channel %s: no listener for it", channel_name)
            return
        channel_cls, callbacks = found
        if not channel_cls.lock_notifications:
            if payload != wire.RECOVER:
                self._run_plain(channel_cls, callbacks, payload)
            return
        row_id = wire.row_id(payload)
        if row_id is not None:
            self.process_stored_row(channel_cls, callbacks, row_id)
        else:
            # The recovery request, or a full payload from a trigger written by an older version.
            self.process_stored_channel(channel_cls)

    def _run_plain(self, channel_cls: type[BaseChannel], callbacks: list[Callable], payload: str):
        try:
            channel_cls.build_from_payload(payload, callbacks).execute_callbacks()
        except Exception:
            # A plain message is not kept, so there is nothing to retry: repair and go on.
            self._connection_lost(None)
            logger.exception("Listener of %s failed on message %.200r", channel_cls.name(), payload)
            self._count(False)
        else:
            self._count(True)

    def process_stored_row(
        self, channel_cls: type[BaseChannel], callbacks: list[Callable], row_id: int
    ) -> bool:
        """Claim, run and acknowledge stored row ``row_id``. False if someone else has it.

        Raises the error when the connection broke: the row stays stored for a catch-up."""
        used = self._open_connection()
        try:
            with transaction.atomic(using=self.using):
                row = store.claim(channel_cls, row_id, self.using)
                if row is None:
                    return False
                channel_cls.build_from_payload(row.payload, callbacks).execute_callbacks()
                store.acknowledge(row, self.using)
        except Exception:
            if self._connection_lost(used):
                raise
            logger.exception(
                "Listener of %s failed on stored notification %s; it stays stored",
                channel_cls.name(),
                row_id,
            )
            self._count(False)
            return False
        self._count(True)
        return True

    def process_stored_channel(self, channel_cls: type[BaseChannel]) -> int:
        """Process every stored row of the channel that no one else holds, in batches of
        ``store.BATCH_SIZE`` per transaction (a savepoint per row). Returns how many succeeded."""
        callbacks = BaseChannel.get(channel_cls.listen_safe_name())
        callbacks = callbacks[1] if callbacks else []
        done = 0
        last_id = 0
        used = self._open_connection()
        while True:
            with transaction.atomic(using=self.using):
                rows = store.claim_batch(channel_cls, last_id, self.using)
                if not rows:
                    break
                for row in rows:
                    last_id = row.pk
                    try:
                        with transaction.atomic(using=self.using):
                            channel_cls.build_from_payload(
                                row.payload, callbacks
                            ).execute_callbacks()
                            store.acknowledge(row, self.using)
                    except Exception:
                        if self._connection_lost(used):
                            raise
                        logger.exception(
                            "Listener of %s failed on stored notification %s; it stays stored",
                            channel_cls.name(),
                            row.pk,
                        )
                        self._count(False)
                    else:
                        done += 1
                        self._count(True)
        if done:
            logger.info("Processed %s stored notifications of %s", done, channel_cls.name())
        return done
