"""The errors pgpubsub raises; each message says what to change."""

from __future__ import annotations


class PgpubsubError(Exception):
    """Base class of every pgpubsub error."""


class ChannelNotFound(PgpubsubError):
    """A channel named by dotted path or LISTEN name does not exist (or has no listeners)."""

    def __init__(self, message: str = "Channel not found!") -> None:
        super().__init__(message)


class InvalidChannel(PgpubsubError, TypeError):
    """A channel class declares something pgpubsub cannot carry (a field type, a name clash)."""


class InvalidPayload(PgpubsubError, ValueError):
    """A value given to ``notify()`` or read from a notification does not fit its field."""


class ListenerSignatureError(PgpubsubError, TypeError):
    """A listener function cannot accept the arguments its channel passes."""
