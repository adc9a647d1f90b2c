"""How many stored rows of a lockable channel one batch takes: as many as the channel's
listeners run in about ``BATCH_SECONDS``, as measured in this process, between 1 and
``MAX_BATCH``.

A batch shares one claim, one lock, one acknowledgement and one commit (a WAL flush) among its
rows, so the more rows it has, the less each pays: listeners that take microseconds get
``MAX_BATCH``. But a batch holds its rows until its last message is done, and its messages'
effects become visible together, at its commit: listeners that take a second get batches of
one, so that other workers and processes share a backlog of slow messages and each message's
effects commit as soon as it is done. Before a channel's first batch is measured, a batch takes
``FIRST_BATCH`` rows.

Every choice of batch size asks :func:`size` (the listener thread's batching of row ids, a
sweep's pages and their cutting into batches, and how many plain messages of a channel queued
behind a busy worker travel in one delivery); :mod:`pgpubsub.batches` reports each batch's time
to :func:`measured`, the workers each plain delivery's. The measure is a moving average per channel class, kept for the process:
written by any worker thread, read by any (a float per channel: a lost update only delays the
average by one batch).
"""

from __future__ import annotations

#: Most rows in one batch: beyond it a commit's cost per message is small next to the message's
#: own, and a batch's ids still fit in one short statement.
MAX_BATCH = 100

#: Rows per batch while nothing was measured for the channel yet.
FIRST_BATCH = 10

#: The time one batch's listeners should take, in seconds.
BATCH_SECONDS = 0.05

#: Weight of the newest batch in the moving average.
_WEIGHT = 0.3

_seconds_per_message: dict[type, float] = {}


def size(channel_cls: type) -> int:
    """The number of rows a batch of ``channel_cls`` takes now."""
    seconds = _seconds_per_message.get(channel_cls)
    if seconds is None:
        return FIRST_BATCH
    if seconds * MAX_BATCH <= BATCH_SECONDS:
        return MAX_BATCH
    return max(1, int(BATCH_SECONDS / seconds))


def measured(channel_cls: type, seconds: float, messages: int) -> None:
    """A batch of ``messages`` messages of ``channel_cls`` took ``seconds`` to run (their
    listeners, savepoints and failures included)."""
    if messages <= 0:
        return
    latest = max(seconds, 0.0) / messages
    average = _seconds_per_message.get(channel_cls)
    _seconds_per_message[channel_cls] = (
        latest if average is None else average + (latest - average) * _WEIGHT
    )


def forget(channel_cls: type | None = None) -> None:
    """Drop what was measured for ``channel_cls`` (for every channel if None): its next batch
    takes ``FIRST_BATCH`` rows again."""
    if channel_cls is None:
        _seconds_per_message.clear()
    else:
        _seconds_per_message.pop(channel_cls, None)
