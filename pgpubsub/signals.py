"""Signals sent as messages are processed, for metrics and tracing.

Both are sent by the thread that ran the listeners, with ``sender`` the channel class:

- ``message_processed(channel, duration, row_id, attempt)``: every listener of a message
  returned. For a lockable message (``row_id`` is its stored row) it is sent once the
  acknowledgement committed; ``attempt`` is 1 for a first attempt, 2 for the first retry...
- ``message_failed(channel, duration, row_id, error, attempt, final)``: a listener raised
  ``error``, or the message could not be read; the message's work was rolled back (a lockable
  message stays stored). ``final``: it will not be tried again (a plain message, or a lockable
  one now marked failed).

``duration`` is the time its listeners took, in seconds. A receiver that raises is logged and
does not affect processing. More keyword arguments may come: receivers take ``**kwargs``.
"""

from __future__ import annotations

import logging
from typing import Any

from django.dispatch import Signal

logger = logging.getLogger(__name__)

message_processed = Signal()
message_failed = Signal()


def send(signal: Signal, channel: type, **kwargs: Any) -> None:
    """Send ``signal`` if anyone listens; receivers' errors are logged, never raised."""
    if not signal.receivers or not signal.has_listeners(channel):
        return  # the first test costs nothing: most projects connect no receiver
    for receiver, result in signal.send_robust(sender=channel, channel=channel, **kwargs):
        if isinstance(result, Exception):
            logger.error("A receiver of a pgpubsub signal failed: %r", receiver, exc_info=result)
