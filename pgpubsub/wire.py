"""What travels in a NOTIFY payload, and putting chunked messages back together.

- plain channel: the message's JSON text, or for a message of 8000 bytes or more, chunks
  ``~<msgid>:<seq>:<last>:<text>`` sent in one transaction (so they arrive in order);
- lockable channel: the decimal id of the stored ``pgpubsub_notification`` row;
- any channel: the empty payload, a request to process every stored row of the channel
  (``process_stored_notifications()``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger(__name__)

#: The payload that asks listeners to process all stored rows of a channel.
RECOVER = ""
CHUNK_MARK = "~"
#: Seconds after which an incomplete chunked message is dropped (its sender's chunks are
#: contiguous in the notification queue, so this only happens when a LISTEN started mid-message).
CHUNK_EXPIRY = 60.0


#: The largest id of a stored row (a bigint).
MAX_ROW_ID = 2**63 - 1


def row_id(payload: str) -> int | None:
    """The stored row id a lockable notification refers to, or None for other payloads."""
    # isdigit() alone also accepts characters such as "²" that int() refuses; more than 19
    # digits is no bigint (and past 4,300, int() refuses them).
    if not (payload.isascii() and payload.isdigit() and len(payload) <= 19):
        return None
    value = int(payload)
    return value if value <= MAX_ROW_ID else None


class Assembler:
    """Collects chunks per (channel, message id) and returns whole messages."""

    def __init__(self) -> None:
        self._parts: dict[tuple[str, str], tuple[float, list[str]]] = {}

    def whole_messages(self, notifications: Iterable[Any]) -> list[tuple[str, str]]:
        """(channel, text) of each whole message among ``notifications`` (each with
        ``channel`` and ``payload``); chunks are collected until their message is whole."""
        whole = []
        for notification in notifications:
            text = self.feed(notification.channel, notification.payload)
            if text is not None:
                whole.append((notification.channel, text))
        return whole

    def feed(self, channel: str, payload: str) -> str | None:
        """The whole message text if ``payload`` completes one (or is not a chunk), else None."""
        if not payload.startswith(CHUNK_MARK):
            return payload
        try:
            msgid, seq, last, piece = payload[1:].split(":", 3)
            seq_number = int(seq)
        except ValueError:
            logger.warning("Dropping malformed chunk on channel %s: %.80r", channel, payload)
            return None
        key = (channel, msgid)
        started, parts = self._parts.get(key, (time.monotonic(), []))
        if seq_number != len(parts):
            logger.warning(
                "Dropping chunked message %s on channel %s: chunk %s arrived after %s chunks",
                msgid,
                channel,
                seq_number,
                len(parts),
            )
            self._parts.pop(key, None)
            return None
        parts.append(piece)
        if last == "1":
            self._parts.pop(key, None)
            return "".join(parts)
        self._parts[key] = (started, parts)
        self._expire()
        return None

    def _expire(self) -> None:
        deadline = time.monotonic() - CHUNK_EXPIRY
        for key in [key for key, (started, _) in self._parts.items() if started < deadline]:
            logger.warning("Dropping incomplete chunked message %s on channel %s", key[1], key[0])
            del self._parts[key]

    def pending(self) -> int:
        """How many chunked messages are partly received."""
        return len(self._parts)
