"""When a failed lockable message is tried again, and when pgpubsub gives up on it.

A channel's retry policy is one object (:func:`strategy` finds it): ``next_delay(attempt,
error)`` says how many seconds after failed attempt ``attempt`` (1 for the first) the message
runs again, or None to give up and mark it failed; ``max_attempts`` is the most attempts it
gets (the bound for listeners that kill their process and connections lost again and again).

The default, :class:`RetryStrategy`: ``retry_delay`` seconds after the first failure, twice as
long after each later one (at most ``PGPUBSUB_RETRY_MAX_DELAY``), each wait cut by a random part
of up to a half so that messages that failed together do not come back together; after
``max_attempts`` attempts the row is marked failed: it stays stored, is not tried again on its
own, and can be retried by hand. A channel names its own policy with ``retry``, or keeps the
default and sets ``max_attempts`` and ``retry_delay``.

A message that cannot be read (bad JSON, missing fields, a model that no longer exists) is
marked failed at once, whatever the policy: trying it again would not help.
"""

from __future__ import annotations

import functools
import inspect
import random
import traceback
import typing
from pydoc import locate
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pgpubsub import conf

if TYPE_CHECKING:
    from pgpubsub.channel import BaseChannel

#: Longest error text and traceback kept on a stored row, in characters.
MAX_ERROR_LENGTH = 2_000
MAX_TRACEBACK_LENGTH = 20_000


class RetryPolicy(Protocol):
    """What a channel's ``retry`` must be: any object with these two members."""

    max_attempts: int

    def next_delay(self, attempt: int, error: BaseException) -> float | None:
        """Seconds before the attempt after failed attempt ``attempt``, or None: give up."""


def _positive_int(value: Any, where: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{where} must be a positive int or None, not {value!r}")
    return value


def _positive_seconds(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{where} must be a positive number of seconds or None, not {value!r}")
    return float(value)


class RetryStrategy:
    """Exponential backoff with jitter, then give up: pgpubsub's default policy.

    A value left None is read from its setting each time it is used (``PGPUBSUB_MAX_ATTEMPTS``,
    ``PGPUBSUB_RETRY_DELAY``, ``PGPUBSUB_RETRY_MAX_DELAY``). Subclass it to decide per error,
    e.g. with a ``next_delay`` that returns None for errors another attempt would not fix.
    """

    def __init__(
        self,
        max_attempts: int | None = None,
        retry_delay: float | None = None,
        max_delay: float | None = None,
    ) -> None:
        name = type(self).__name__
        self._max_attempts = _positive_int(max_attempts, f"{name}.max_attempts")
        self._retry_delay = _positive_seconds(retry_delay, f"{name}.retry_delay")
        self._max_delay = _positive_seconds(max_delay, f"{name}.max_delay")

    # Read-only, and read at each use: a policy made at import time follows the settings.
    @property
    def max_attempts(self) -> int:
        """Attempts a message gets, the failed ones included."""
        return conf.max_attempts() if self._max_attempts is None else self._max_attempts

    @property
    def retry_delay(self) -> float:
        """Seconds before the second attempt; each later wait is twice the one before."""
        return conf.retry_delay() if self._retry_delay is None else self._retry_delay

    @property
    def max_delay(self) -> float:
        """The longest wait between two attempts, in seconds."""
        return conf.retry_max_delay() if self._max_delay is None else self._max_delay

    def next_delay(self, attempt: int, error: BaseException) -> float | None:
        """The :meth:`backoff` after failed attempt ``attempt``; None from ``max_attempts``
        on."""
        return None if attempt >= self.max_attempts else self.backoff(attempt)

    def backoff(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failures in a row, whatever the limit:
        ``retry_delay`` doubled per failure after the first, at most ``max_delay``, cut by a
        random part of up to a half."""
        wait = min(self.max_delay, self.retry_delay * 2 ** min(failures - 1, 60))
        return wait * random.uniform(0.5, 1.0)

    def _values(self) -> tuple[int | None, float | None, float | None]:
        return (self._max_attempts, self._retry_delay, self._max_delay)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self), self._values()))

    def __repr__(self) -> str:
        names = ("max_attempts", "retry_delay", "max_delay")
        values = ", ".join(
            f"{name}={value!r}"
            for name, value in zip(names, self._values(), strict=True)
            if value is not None
        )
        return f"{type(self).__name__}({values})"


def strategy(channel: type[BaseChannel]) -> RetryPolicy:
    """The retry policy of ``channel``: its ``retry``, else a :class:`RetryStrategy` of its
    ``max_attempts`` and ``retry_delay``.

    Raises ``ValueError``/``TypeError`` for a policy that cannot be used (see :func:`check`).
    """
    policy = _declared(channel, load=True)
    if policy is None:
        _check_attributes(channel)
        policy = RetryStrategy(channel.max_attempts, channel.retry_delay)
    return policy


def check(channel: type[BaseChannel], load: bool = True) -> None:
    """Raise ``ValueError`` (a bad value) or ``TypeError`` (not a policy) when the channel's
    retry options cannot be used: ``max_attempts`` not a positive int, ``retry_delay`` not a
    positive number, ``retry`` not a policy, or set together with one of them.

    ``load``: import the policy a dotted-path ``retry`` names (False when the channel class is
    being defined: the module it names may import the channel's)."""
    declared = _declared(channel, load=load)
    if declared is None:
        _check_attributes(channel)
        return
    others = [name for name in ("max_attempts", "retry_delay") if _attribute(channel, name)]
    if others:
        raise ValueError(
            f"{channel.__name__} sets both retry and {' and '.join(others)}: give the values "
            f"to its policy (e.g. retry = RetryStrategy(max_attempts=10)), or remove retry"
        )
    if not isinstance(declared, str):
        _check_policy(declared, f"{channel.__name__}.retry")


# --- the 1.x-style readers, kept while processing still calls them ------------------------------


def max_attempts(channel: type[BaseChannel]) -> int:
    """Attempts a message of ``channel`` gets: its policy's ``max_attempts``."""
    return strategy(channel).max_attempts


def retry_delay(channel: type[BaseChannel]) -> float:
    """Seconds before a failed message's second attempt: the ``retry_delay`` of the channel's
    :class:`RetryStrategy` (``PGPUBSUB_RETRY_DELAY`` for a policy that has none)."""
    delay = getattr(strategy(channel), "retry_delay", None)
    return conf.retry_delay() if delay is None else delay


def backoff(channel: type[BaseChannel], failures: int) -> float:
    """Seconds to wait before the next attempt of a message that failed ``failures`` times,
    limit aside: the channel's :meth:`RetryStrategy.backoff` (the default backoff for a policy
    without one)."""
    policy = strategy(channel)
    if not isinstance(policy, RetryStrategy):
        policy = RetryStrategy()
    return policy.backoff(failures)


# --- reading the channel's declaration ---------------------------------------------------------


def _attribute(channel: type[BaseChannel], name: str) -> bool:
    return getattr(channel, name, None) is not None


def _check_attributes(channel: type[BaseChannel]) -> None:
    _positive_int(getattr(channel, "max_attempts", None), f"{channel.__name__}.max_attempts")
    _positive_seconds(getattr(channel, "retry_delay", None), f"{channel.__name__}.retry_delay")


def _declared(channel: type[BaseChannel], load: bool) -> Any:
    """The channel's ``retry`` (None when unset, or when ``retry`` is a field of its
    messages); a dotted path is loaded when ``load``, else returned as is."""
    declared = getattr(channel, "retry", None)
    if declared is None or _is_message_field(channel, "retry"):
        return None
    if isinstance(declared, str):
        if not load:
            if not declared.strip() or "." not in declared:
                raise ValueError(
                    f"{channel.__name__}.retry = {declared!r} is no dotted path of a retry "
                    'policy (e.g. "myapp.retries.OnlyTimeouts")'
                )
            return declared
        return _load(declared, f"{channel.__name__}.retry")
    return declared


@functools.cache
def _load(path: str, where: str) -> RetryPolicy:
    """The policy at dotted path ``path``: an object there, or a class made without arguments."""
    try:
        found = locate(path)
    except Exception as exc:  # pydoc's ErrorDuringImport: the module raised on import
        raise ValueError(f"{where} = {path!r} cannot be imported: {exc}") from None
    if found is None:
        raise ValueError(f"{where} = {path!r} names nothing that can be imported")
    if isinstance(found, type):
        try:
            found = found()
        except TypeError as exc:
            raise TypeError(f"{where} = {path!r}: {found.__name__}() failed: {exc}") from None
    _check_policy(found, f"{where} = {path!r}")
    return found


def _check_policy(policy: Any, where: str) -> None:
    if isinstance(policy, type):
        raise TypeError(
            f"{where} is the class {policy.__name__}, not a policy: write {policy.__name__}()"
        )
    if not callable(getattr(policy, "next_delay", None)):
        raise TypeError(
            f"{where} must be a retry policy (a RetryStrategy, or an object with "
            f"next_delay(attempt, error) and max_attempts), not {policy!r}"
        )
    if isinstance(policy, RetryStrategy):
        return  # its values were checked when it was made
    if not hasattr(policy, "max_attempts"):
        raise TypeError(f"{where} has no max_attempts (a positive int): {policy!r}")
    if policy.max_attempts is None:
        raise ValueError(f"{where}.max_attempts must be a positive int, not None")
    _positive_int(policy.max_attempts, f"{where}.max_attempts")


@functools.cache  # per class: its annotations do not change, and claims ask for every batch
def _is_message_field(channel: type, name: str) -> bool:
    """True when ``name`` is annotated as a field of the channel's messages (not a ClassVar):
    a django-pgpubsub 1.x channel may carry a field called ``retry``."""
    for klass in channel.__mro__:
        try:
            annotations = inspect.get_annotations(klass)
        except Exception:  # an annotation that cannot be read says nothing about ``name``
            continue
        if name in annotations:
            hint = annotations[name]
            if isinstance(hint, str):
                return not hint.replace(" ", "").startswith(("ClassVar", "typing.ClassVar"))
            return not (hint is ClassVar or typing.get_origin(hint) is ClassVar)
    return False


# --- what a failed attempt leaves on its row ---------------------------------------------------


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
