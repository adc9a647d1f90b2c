"""What travels in a NOTIFY payload, and putting chunked messages back together.

- plain channel: the message's JSON text; a message of ``NOTIFY_LIMIT`` bytes or more is sent
  as chunks instead (see below);
- lockable channel: the decimal id of the stored ``pgpubsub_notification`` row (a writer that
  notifies on write), or ``0``, the watcher's wake-up: rows were stored, sweep the channel;
- any channel: the empty payload, a request to process every stored row of the channel
  (``process_stored_notifications()``).

The chunk format, written by the SQL function ``pgpubsub_notify()``
(:mod:`pgpubsub.db_functions`, built from the constants below) and read by :class:`Assembler`::

    ~<msgid>:<seq>:<last>:<text>

``~`` (``CHUNK_MARK``) starts every chunk and no whole message (JSON text, a row id or the
empty payload); ``msgid`` is a random hex id shared by a message's chunks; ``seq`` counts them
from 0; ``last`` is ``1`` on the final chunk, else ``0``; ``text`` is the next at most
``CHUNK_BYTES`` bytes of the message, cut between characters. A message's chunks are sent in
one transaction, so a listener receives them together and in order; listeners on several
channels may receive other channels' chunks in between.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger(__name__)

#: The payload that asks listeners to process all stored rows of a channel.
RECOVER = ""
#: The watcher's wake-up (:mod:`pgpubsub.watcher`): rows of the channel were stored, sweep it.
#: Not the empty payload: django-pgpubsub 1.x listeners (during a rolling upgrade) read that as
#: "process every stored row", retrying and failed ones included; a row id that no row has
#: (ids start at 1) they only fail to lock, and so do earlier versions of this one.
WAKE = "0"

#: NOTIFY refuses payloads of this many bytes or more (a compiled-in PostgreSQL limit).
NOTIFY_LIMIT = 8000
#: Bytes of message text per chunk; the header before it takes fewer than 50 more.
CHUNK_BYTES = 7900
#: The first character of every chunk.
CHUNK_MARK = "~"
#: Separates the header's fields, and the header from the text.
CHUNK_SEPARATOR = ":"
#: The ``last`` field of a message's final chunk, and of the others.
LAST_CHUNK = "1"
MORE_CHUNKS = "0"
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
    """Collects chunks per (channel, message id) and returns whole messages.

    A message missing a chunk is dropped: at once when a later chunk of it arrives, else
    ``expiry`` seconds after its first chunk (checked as further chunks arrive)."""

    def __init__(self, expiry: float = CHUNK_EXPIRY) -> None:
        self.expiry = expiry
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
            msgid, seq, last, piece = payload[1:].split(CHUNK_SEPARATOR, 3)
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
        if last == LAST_CHUNK:
            self._parts.pop(key, None)
            return "".join(parts)
        self._parts[key] = (started, parts)
        self._expire()
        return None

    def _expire(self) -> None:
        deadline = time.monotonic() - self.expiry
        for key in [key for key, (started, _) in self._parts.items() if started < deadline]:
            logger.warning("Dropping incomplete chunked message %s on channel %s", key[1], key[0])
            del self._parts[key]
