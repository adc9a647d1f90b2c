"""Run listeners synchronously in a project's own tests: ``run_listeners()``.

In Django's ``TestCase`` a test's transaction never commits, so no NOTIFY is ever delivered,
and no listener process runs anyway. ``run_listeners()`` catches the messages published on this
thread's connection while it is active and runs their listeners on that connection when it ends.

How: every producer (``notify()`` and the triggers) calls ``pgpubsub_notify()`` or
``pgpubsub_store()`` without naming a schema. While a block is active, this session's
``search_path`` starts with a schema of its own that holds versions of both which append the
message (or the id of the row they stored) to a temporary table instead of sending a NOTIFY.
The real functions are never touched, so other sessions publish as usual, whether the test
runs in a transaction or in autocommit. Captured messages are rows of the test's transaction:
a savepoint that rolls back takes its messages along.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from django.db import DatabaseError, connections

from pgpubsub.channel import BaseChannel
from pgpubsub.db_functions import store_function_sql

#: Rounds of messages published by the previous round's listeners that are followed before
#: ``run_listeners()`` stops, taking it for a loop (listeners notifying each other forever).
MAX_ROUNDS = 100

_TABLE = "pg_temp.pgpubsub_testing_captured"


def _setup_sql(schema: str) -> str:
    """The capture table, and in ``schema`` the two publishing functions that fill it."""
    return f"""
CREATE TEMP TABLE IF NOT EXISTS pgpubsub_testing_captured (
    seq bigserial PRIMARY KEY,
    channel text NOT NULL,
    payload text NOT NULL
);
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE OR REPLACE FUNCTION {schema}.pgpubsub_notify(p_channel text, p_payload text)
RETURNS void LANGUAGE plpgsql AS $pgpubsub$
BEGIN
    INSERT INTO {_TABLE} (channel, payload) VALUES (p_channel, p_payload);
END
$pgpubsub$;
""" + store_function_sql(  # the real one's storing, with a capture instead of the NOTIFY
        f"{schema}.pgpubsub_store",
        f"INSERT INTO {_TABLE} (channel, payload) VALUES (p_channel, new_id::text);",
    )


_processing_logger = logging.getLogger("pgpubsub.processing")

Function = TypeVar("Function", bound=Callable[..., Any])


class ListenersFailed(AssertionError):
    """Listeners raised while ``run_listeners()`` ran them; ``errors`` holds their exceptions
    in the order they were raised (the first is also the ``__cause__``)."""

    def __init__(self, failures: list[tuple[str, BaseException]], count: int) -> None:
        self.errors = [error for _, error in failures]
        lines = [f"- {message}: {error!r}" for message, error in failures]
        if not lines:
            lines = ["- (the errors were not logged: is logging disabled?)"]
        super().__init__(f"pgpubsub listeners failed on {count} message(s):\n" + "\n".join(lines))


@dataclass
class _Capture:
    """The capturing set-up of one session, shared by the blocks nested in it."""

    schema: str
    search_path: str
    session: Any  # the driver connection the set-up lives on
    depth: int = 0


_local = threading.local()


def _captures() -> dict[str, _Capture]:
    """This thread's set-ups by database alias (Django connections belong to a thread)."""
    if not hasattr(_local, "captures"):
        _local.captures = {}
    return _local.captures


def _begin(alias: str) -> _Capture:
    capture = _captures().get(alias)
    db = connections[alias]
    if capture is None:
        db.ensure_connection()
        with db.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid(), current_setting('search_path')")
            pid, search_path = cursor.fetchone()
            # A schema per session: concurrent sessions never wait on each other's set-up.
            schema = f"pgpubsub_testing_{pid}"
            cursor.execute(_setup_sql(schema))
            cursor.execute(
                "SELECT set_config('search_path', %s, false)",
                [f"{schema}, {search_path}" if search_path.strip() else schema],
            )
        capture = _captures()[alias] = _Capture(schema, search_path, db.connection)
    else:
        _check_session(alias, capture)
    capture.depth += 1
    return capture


def _check_session(alias: str, capture: _Capture) -> None:
    if connections[alias].connection is not capture.session:
        raise RuntimeError(
            f"The {alias!r} database connection was closed during run_listeners() (by "
            "connection.close(), close_old_connections() or a lost connection): the messages "
            "captured before were lost and those published after were sent for real. Keep the "
            "connection open for the whole block."
        )


def _end(alias: str, capture: _Capture, failing: bool) -> None:
    """Leave one block; the outermost one restores the session. ``failing``: the block raised."""
    capture.depth -= 1
    if capture.depth:
        return
    del _captures()[alias]
    db = connections[alias]
    try:
        if db.connection is not capture.session:
            # The session and its temporary table are gone; the schema stays if it committed.
            if not db.in_atomic_block:
                with db.cursor() as cursor:
                    cursor.execute(f"DROP SCHEMA IF EXISTS {capture.schema} CASCADE")
            if not failing:
                _check_session(alias, capture)
            return
        with db.cursor() as cursor:
            cursor.execute("SELECT set_config('search_path', %s, false)", [capture.search_path])
            cursor.execute(f"DROP SCHEMA {capture.schema} CASCADE")
            cursor.execute(f"DROP TABLE {_TABLE}")
    except DatabaseError:
        # After a failed block the transaction may be aborted; its rollback undoes the set-up
        # made in it. Otherwise the session must not stay in capturing mode unnoticed.
        if not (failing and db.in_atomic_block):
            raise


class _FailureLog(logging.Handler):
    """Collects the failures the processor logs on this thread."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.thread = threading.get_ident()
        self.failures: list[tuple[str, BaseException]] = []

    def emit(self, record: logging.LogRecord) -> None:
        # Messages that cannot be read are logged without a traceback, their error attached.
        error = getattr(record, "pgpubsub_error", None) or (record.exc_info or (None, None))[1]
        if record.thread == self.thread and error is not None:
            self.failures.append((record.getMessage(), error))


@contextmanager
def _collecting_failures() -> Iterator[_FailureLog]:
    logger = _processing_logger
    saved = logger.disabled, logger.level, logger.propagate
    if logger.disabled or not logger.isEnabledFor(logging.ERROR):
        # The project's logging hides them, but the test needs them: collect, do not show.
        logger.disabled = False
        logger.setLevel(logging.ERROR)
        logger.propagate = False
    handler = _FailureLog()
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.disabled, _, logger.propagate = saved
        logger.setLevel(saved[1])


def _describe(channels: list[str]) -> str:
    names = []
    for channel in dict.fromkeys(channels):
        found = BaseChannel.get(channel)
        names.append(found[0].name() if found else channel)
    return ", ".join(names)


class ListenerRun:
    """What ``run_listeners()`` returns: a context manager, usable as a decorator."""

    def __init__(self, using: str | None, raise_errors: bool, max_rounds: int) -> None:
        if max_rounds < 1:
            raise ValueError(f"max_rounds must be at least 1, not {max_rounds!r}")
        self.using = using
        self.raise_errors = raise_errors
        self.max_rounds = max_rounds
        self._alias: str | None = None
        self._capture: _Capture | None = None
        self._start = 0

    def __enter__(self) -> ListenerRun:
        if self._capture is not None:
            raise RuntimeError("This run_listeners() block is already active.")
        from pgpubsub.models import notifications_alias  # needs the app registry

        self._alias = self.using or notifications_alias()
        capture = _begin(self._alias)
        try:
            with connections[self._alias].cursor() as cursor:
                # Blocks nested in this one run their own messages, not those captured before.
                cursor.execute(f"SELECT coalesce(max(seq), 0) FROM {_TABLE}")
                (self._start,) = cursor.fetchone()
        except BaseException:
            _end(self._alias, capture, failing=True)
            raise
        self._capture = capture
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        capture, self._capture = self._capture, None
        failing = exc_type is not None
        try:
            if not failing:
                self._run(capture)
        except BaseException:
            failing = True
            raise
        finally:
            _end(self._alias, capture, failing)

    def __call__(self, func: Function) -> Function:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            # A fresh block per call: the decorated function may run again, or recursively.
            with ListenerRun(self.using, self.raise_errors, self.max_rounds):
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    def run(self) -> int:
        """Run the listeners of the messages published so far in the block, then of those
        their listeners publish, and so on. Returns how many messages ran."""
        if self._capture is None:
            raise RuntimeError("run() works inside the run_listeners() block only.")
        return self._run(self._capture)

    def _take(self) -> list[tuple[str, str]]:
        """Remove and return the captured messages, in the order they were published."""
        with connections[self._alias].cursor() as cursor:
            cursor.execute(
                f"DELETE FROM {_TABLE} WHERE seq > %s RETURNING seq, channel, payload",
                [self._start],
            )
            rows = sorted(cursor.fetchall())
        return [(channel, payload) for _, channel, payload in rows]

    def _run(self, capture: _Capture) -> int:
        from pgpubsub.processing import Processors  # needs the app registry

        processors = Processors(using=self._alias)
        ran = 0
        with _collecting_failures() as log:
            for rounds in range(self.max_rounds + 1):
                _check_session(self._alias, capture)
                messages = self._take()
                if not messages:
                    break
                if rounds == self.max_rounds:
                    raise RuntimeError(
                        f"Listeners were still publishing after {self.max_rounds} rounds "
                        f"(the next on {_describe([channel for channel, _ in messages])}): "
                        "listeners seem to notify each other in a loop. Pass a larger "
                        "max_rounds to run_listeners() if the chain is meant to be this long."
                    )
                ran += len(messages)
                processors.process_many(messages)
        if processors.stats.failed and self.raise_errors:
            error = ListenersFailed(log.failures, processors.stats.failed)
            raise error from error.errors[0] if error.errors else None
        return ran


def run_listeners(
    using: str | None = None, *, raise_errors: bool = True, max_rounds: int = MAX_ROUNDS
) -> ListenerRun:
    """Run the listeners of the messages published in a block when it ends, synchronously, on
    this thread's connection to database ``using`` (by default the one pgpubsub stores
    notifications in). Messages their listeners publish run too.

    Only messages that would have been sent run: those of a savepoint that rolled back do not.
    Listener failures raise :class:`ListenersFailed` once every message ran, unless
    ``raise_errors`` is False. Use it as ``with run_listeners() as listeners:`` (then
    ``listeners.run()`` runs what was published so far) or as a decorator.
    """
    return ListenerRun(using, raise_errors, max_rounds)
