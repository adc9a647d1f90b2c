"""A channel's options (its class attributes), checked when the class is defined.

Whether ``database`` is an alias of ``DATABASES`` waits for the system checks (the settings may
not be loaded yet); whether a ``retry`` given as a dotted path imports waits for a Runtime's
start (:func:`pgpubsub.retries.check`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgpubsub import retries

if TYPE_CHECKING:
    from pgpubsub.channel import BaseChannel


def check(cls: type[BaseChannel]) -> None:
    """Refuse, when the class is defined, a channel option pgpubsub cannot use (rather than in
    a worker, once a message fails). Whether ``database`` is an alias of ``DATABASES`` waits
    for the system checks: the settings may not be loaded yet."""
    limit = cls.max_concurrency
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(
            f"{cls.__name__}.max_concurrency must be a positive int or None, not {limit!r}"
        )
    alias = cls.database
    if alias is not None and not isinstance(alias, str):
        raise TypeError(
            f"{cls.__name__}.database must be a database alias (a str) or None, not {alias!r}"
        )
    if alias is not None and not alias.strip():
        raise ValueError(f"{cls.__name__}.database must be a database alias or None, not ''")
    wake = cls.notify_on_write
    if wake is not None and not isinstance(wake, bool):
        raise TypeError(f"{cls.__name__}.notify_on_write must be True, False or None, not {wake!r}")
    retries.check(cls, load=False)
