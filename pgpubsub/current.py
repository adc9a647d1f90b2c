"""The stored message a listener is running now, for code that needs more than its fields:
tasks (:mod:`pgpubsub.tasks`) read their result id and attempt from it."""

from __future__ import annotations

from contextvars import ContextVar
from typing import NamedTuple


class Running(NamedTuple):
    row_id: int
    attempt: int  # 1 for a first attempt, 2 for the first retry...


_running: ContextVar[Running | None] = ContextVar("pgpubsub_running", default=None)


def running() -> Running | None:
    """The stored message whose listeners run on this thread now, if any."""
    return _running.get()


def enter(row_id: int, attempt: int) -> object:
    """Mark the stored message ``row_id`` as running; returns the token :func:`leave` takes."""
    return _running.set(Running(row_id, attempt))


def leave(token: object) -> None:
    _running.reset(token)  # type: ignore[arg-type]
