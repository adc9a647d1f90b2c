"""Proof that notifications reach a Runtime's LISTEN connections.

After each LISTEN, the listener LISTENs on a probe channel of its own too, and has a NOTIFY
with a random token sent there through the alias producers write through. Through a
transaction-pooling PgBouncer the token never arrives: the Runtime then says so, reports itself
not connected, keeps sweeping, and probes again later (on a new connection).
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from typing import Any

from pgpubsub.connection import one_line, probe_channel, send_notification

logger = logging.getLogger("pgpubsub.runtime")

#: Seconds a probe NOTIFY sent after a LISTEN has to arrive on the LISTEN connection.
PROBE_TIMEOUT = 5.0
#: First and longest pause before probing again a LISTEN connection that a probe did not
#: reach (or that no probe could be sent to), in seconds (doubling, with jitter).
MIN_PROBE_RETRY_DELAY = 5.0
MAX_PROBE_RETRY_DELAY = 60.0
#: The status() problem of a Runtime whose LISTEN connection a probe did not reach.
NOTIFICATIONS_NOT_RECEIVED = "notifications_not_received"


class NotificationsNotReceived(Exception):
    """A probe NOTIFY did not reach the LISTEN connection (``status()["last_error"]``)."""


class Probe:
    """Whether notifications reach one LISTEN connection: the state of its probes.

    The listener thread alone changes it; ``status()`` reads ``failing`` and ``verified``."""

    def __init__(self, listen_alias: str, via: str, databases: list[str | None]) -> None:
        self.listen_alias = listen_alias
        self.via = via  # the alias producers write through: the probe's NOTIFY goes there
        self.databases = databases  # of the channels LISTENed to on that connection
        self.channel = probe_channel()
        self.token: str | None = None  # of the probe on its way
        self.deadline = float("inf")  # by when it must arrive (time.monotonic())
        self.retry_at = float("inf")  # when to probe again
        self.reconnect = False  # ... on a new connection (the last probe did not arrive)
        self.failures = 0  # in a row: the pause before the next probe doubles with each
        self.failing: str | None = None  # what went wrong, while probes do not arrive
        self.verified = False  # the last probe arrived

    def pause(self) -> float:
        """Seconds before the next probe after ``failures`` failed ones."""
        delay = MIN_PROBE_RETRY_DELAY * 2 ** max(0, self.failures - 1)
        return min(MAX_PROBE_RETRY_DELAY, delay) * random.uniform(0.8, 1.0)

    def fix(self) -> str:
        """The settings that point LISTEN elsewhere, for the channels of this connection."""
        fixes = [
            "PGPUBSUB_DATABASE"
            if database is None
            else f"PGPUBSUB_LISTEN_ALIASES = {{{database!r}: <an alias that connects directly>}}"
            for database in self.databases
        ]
        return " and ".join(fixes)

    def due(self) -> float:
        """When the listener must look at this probe again (time.monotonic())."""
        return min(self.deadline, self.retry_at)

    def forget(self) -> None:
        """The connection was lost: a new probe follows the next LISTEN."""
        self.token = None
        self.deadline = self.retry_at = float("inf")
        self.verified = False

    def send(self) -> None:
        """Have a NOTIFY with a new token sent to the probe channel, through the alias
        producers use (never the LISTEN connection itself)."""
        self.token = secrets.token_hex(16)
        self.verified = False
        try:
            send_notification(self.via, self.channel, self.token, PROBE_TIMEOUT)
        except Exception as exc:
            # Producers cannot reach the database either: the health view says so.
            self.token = None
            self.deadline = float("inf")
            self.failures += 1
            self.reconnect = False
            pause = self.pause()
            self.retry_at = time.monotonic() + pause
            logger.warning(
                "Cannot send the NOTIFY that checks that notifications reach the LISTEN "
                "connection of alias %r, through alias %r (%s); trying again in %.1fs",
                self.listen_alias,
                self.via,
                one_line(exc),
                pause,
            )
            return
        self.deadline = time.monotonic() + PROBE_TIMEOUT

    def arrived(self, payload: str) -> None:
        """A notification came on the probe channel: the token, if it is this probe's."""
        if self.token is None or payload != self.token:
            return
        self.token = None
        self.deadline = float("inf")
        self.failures = 0
        self.verified = True
        if self.failing:
            self.failing = None
            logger.warning(
                "Notifications reach the LISTEN connection of alias %r again", self.listen_alias
            )

    def late(self, now: float, sweep_interval: float) -> bool:
        """Fail the probe if its token is late; True if it failed now."""
        if self.token is None or now < self.deadline:
            return False
        self.token = None
        self.deadline = float("inf")
        self.failures += 1
        self.reconnect = True
        pause = self.pause()
        self.retry_at = now + pause
        message = (
            f"Notifications do not reach this Runtime: a NOTIFY sent through alias "
            f"{self.via!r} did not arrive within {PROBE_TIMEOUT:.0f}s on the LISTEN "
            f"connection of alias {self.listen_alias!r}. Does {self.listen_alias!r} go "
            "through PgBouncer in transaction pooling mode (transaction pooling?)? LISTEN "
            f"needs a direct connection or session pooling: set {self.fix()}. Meanwhile "
            "plain messages are lost, and lockable ones wait for a sweep (every "
            f"{sweep_interval:g}s)"
        )
        if self.failing is None:
            logger.error("%s; probing again in %.1fs", message, pause)
        else:
            logger.debug("Still no notification; probing again in %.1fs", pause)
        self.failing = message
        return True


def take_probes(received: list[Any], probes: dict[str, Probe]) -> list[Any]:
    """``received`` without the probes' notifications, which no channel's listener gets; a
    probe's token that arrived proves that its LISTEN connection works."""
    by_channel = {probe.channel: probe for probe in probes.values()}
    others = []
    for item in received:
        probe = by_channel.get(item.channel)
        if probe is None:
            others.append(item)
        else:
            probe.arrived(item.payload)
    return others


def check_probes(
    probes: dict[str, Probe], heard: set[str | None], now: float, sweep_interval: float
) -> bool:
    """Fail the probes whose token is late, unless their connection just brought something
    (it is read again first); True if one failed."""
    failed = False
    for probe in probes.values():
        if probe.listen_alias not in heard and probe.late(now, sweep_interval):
            failed = True
    return failed
