"""Lockable channels with retry policies of their own, and their listener.

Nothing registers the listener on import: tests/test_retry_strategy.py registers it for the tests
that need it and removes it after, so that other tests' Runtimes do not listen to these channels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pgpubsub.channel import Channel
from pgpubsub.retries import RetryStrategy
from tests.testapp.models import Effect


class Transient(Exception):
    """An error another attempt may not meet (a timeout, a busy service)."""


class Permanent(Exception):
    """An error every attempt meets (a card declined): no use trying again."""


class RetryTransientOnly(RetryStrategy):
    """The default backoff for :class:`Transient` errors; any other error gives up at once."""

    def next_delay(self, attempt: int, error: BaseException) -> float | None:
        if not isinstance(error, Transient):
            return None
        return super().next_delay(attempt, error)


class FixedDelay:
    """A policy that is no RetryStrategy: the same wait after each failure, three attempts."""

    max_attempts = 3

    def __init__(self, seconds: float = 0.1) -> None:
        self.seconds = seconds

    def next_delay(self, attempt: int, error: BaseException) -> float | None:
        return self.seconds if attempt < self.max_attempts else None


@dataclass
class Picky(Channel):
    """Retried quickly, and only when its listener fails with :class:`Transient`."""

    lock_notifications = True
    retry = RetryTransientOnly(max_attempts=3, retry_delay=0.2)
    key: str
    error: str = "transient"  # what the listener raises: "transient" or "permanent"
    failures: int = 1  # the first attempts that fail


@dataclass
class Named(Channel):
    """Names its policy by dotted path (a class, made without arguments)."""

    lock_notifications = True
    retry = "tests.testapp.retry_channels.RetryTransientOnly"
    key: str


#: Key -> monotonic time of each attempt of a Picky message, in-process.
picky_attempts: dict[str, list[float]] = {}


def run_picky(key: str, error: str, failures: int) -> None:
    attempts = picky_attempts.setdefault(key, [])
    attempts.append(time.monotonic())
    # Written before failing: the failed attempt's rollback must undo it (the key is unique).
    Effect.objects.create(key=key, channel="Picky", value=str(len(attempts)))
    if len(attempts) <= failures:
        kind = Transient if error == "transient" else Permanent
        raise kind(f"picky {key} failed on attempt {len(attempts)}")
