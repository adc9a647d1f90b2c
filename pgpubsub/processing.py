"""From a received notification to its listeners: plain messages run their callbacks; lockable
messages are claimed, run and acknowledged in one transaction, so each runs exactly once."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from django.db import transaction

from pgpubsub import store, wire
from pgpubsub.channel import BaseChannel

logger = logging.getLogger(__name__)


class Processor:
    """Processes notifications on the calling thread's Django connection for ``using``.

    Failures are logged with their traceback and counted; they never propagate, so one bad
    message or callback cannot stop a listener. A failed lockable message stays stored.
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
            logger.exception("Listener of %s failed on message %.200r", channel_cls.name(), payload)
            self._count(False)
        else:
            self._count(True)

    def process_stored_row(
        self, channel_cls: type[BaseChannel], callbacks: list[Callable], row_id: int
    ) -> bool:
        """Claim, run and acknowledge stored row ``row_id``. False if someone else has it."""
        try:
            with transaction.atomic(using=self.using):
                row = store.claim(channel_cls, row_id, self.using)
                if row is None:
                    return False
                channel_cls.build_from_payload(row.payload, callbacks).execute_callbacks()
                store.acknowledge(row, self.using)
        except Exception:
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
