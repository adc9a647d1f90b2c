"""When a failed lockable message is tried again, and when pgpubsub gives up on it.

A listener that raises rolls its message's work back; the stored row records the attempt and
the error, and is left alone until its next attempt is due: ``retry_delay`` seconds after the
first failure, twice as long after each later one (at most ``PGPUBSUB_RETRY_MAX_DELAY``), each
wait cut by a random part of up to a half so that messages that failed together do not come
back together. After ``max_attempts`` attempts the row is marked failed: it stays stored, is
not tried again on its own, and can be retried by hand. A message that cannot be read (bad
JSON, missing fields, a model that no longer exists) is marked failed at once: trying it again
would not help.
"""

from __future__ import annotations

import random
import traceback

from pgpubsub import conf
from pgpubsub.channel import BaseChannel

#: Longest error text and traceback kept on a stored row, in characters.
MAX_ERROR_LENGTH = 2_000
MAX_TRACEBACK_LENGTH = 20_000


def max_attempts(channel: type[BaseChannel]) -> int:
    """The channel's ``max_attempts``, else ``PGPUBSUB_MAX_ATTEMPTS``."""
    value = getattr(channel, "max_attempts", None)
    if value is None:
        return conf.max_attempts()
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{channel.__name__}.max_attempts must be a positive int or None, not {value!r}"
        )
    return value


def retry_delay(channel: type[BaseChannel]) -> float:
    """The channel's ``retry_delay`` (seconds), else ``PGPUBSUB_RETRY_DELAY``."""
    value = getattr(channel, "retry_delay", None)
    if value is None:
        return conf.retry_delay()
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(
            f"{channel.__name__}.retry_delay must be a positive number of seconds or None, "
            f"not {value!r}"
        )
    return float(value)


def check(channel: type[BaseChannel]) -> None:
    """Raise ``ValueError`` when the channel's own retry attributes are not usable."""
    if getattr(channel, "max_attempts", None) is not None:
        max_attempts(channel)
    if getattr(channel, "retry_delay", None) is not None:
        retry_delay(channel)


def backoff(channel: type[BaseChannel], failures: int) -> float:
    """Seconds to wait before the next attempt of a message that failed ``failures`` times."""
    longest = conf.retry_max_delay()
    wait = min(longest, retry_delay(channel) * 2 ** min(failures - 1, 60))
    return wait * random.uniform(0.5, 1.0)


def describe(error: BaseException) -> str:
    """``"ErrorType: message"``, shortened to ``MAX_ERROR_LENGTH``, storable as text."""
    try:
        message = str(error)
    except Exception:  # an exception whose __str__ fails still gets recorded
        message = object.__repr__(error)
    text = storable(f"{type(error).__name__}: {message}")
    return text if len(text) <= MAX_ERROR_LENGTH else text[: MAX_ERROR_LENGTH - 1] + "…"


def format_traceback(error: BaseException) -> str:
    """The traceback of ``error`` as text; a long one keeps its end (where it was raised)."""
    try:
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    except Exception:
        text = describe(error)
    text = storable(text)
    if len(text) <= MAX_TRACEBACK_LENGTH:
        return text
    return "…\n" + text[-(MAX_TRACEBACK_LENGTH - 2) :]


def storable(text: str) -> str:
    """``text`` as PostgreSQL can store it: no NUL, no lone surrogate (both are escaped)."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text
