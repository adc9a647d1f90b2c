"""pgpubsub.deliveries on its own: ``plan()`` (notifications -> deliveries) and the bounded
``DeliveryQueue`` between the listener and the workers. No database is needed."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from pgpubsub import batch_size, wire
from pgpubsub.channel import Channel
from pgpubsub.deliveries import Delivery, DeliveryQueue, Kind, plan
from tests.testapp import channels

#: Seconds a test waits for another thread before it fails.
TIMEOUT = 10.0


@dataclasses.dataclass
class TwoAtATime(Channel):
    """Never registered: the queue only reads the class's ``max_concurrency``."""

    lock_notifications = True
    max_concurrency = 2
    key: str = ""


@pytest.fixture(autouse=True)
def unmeasured():
    """Each test starts with no channel's listeners measured: a batch holds
    ``batch_size.FIRST_BATCH`` messages or rows."""
    batch_size.forget()
    yield
    batch_size.forget()


def plain(key: str, channel: type[Channel] = channels.Message) -> Delivery:
    return Delivery.plain(channel, [], key)


def rows(row_id: int, channel: type[Channel] = channels.Job) -> Delivery:
    """A batch of one stored row: never joined to another delivery."""
    return Delivery(Kind.ROWS, channel, row_ids=[row_id])


class Waiter(threading.Thread):
    """Runs ``call()`` on a thread of its own and keeps what it returned."""

    def __init__(self, call) -> None:
        super().__init__(name="test-deliveries-waiter", daemon=True)
        self.call = call
        self.result: object = "not returned"
        self.returned = threading.Event()

    def run(self) -> None:
        self.result = self.call()
        self.returned.set()

    def finish(self) -> object:
        self.join(TIMEOUT)
        assert not self.is_alive(), "the waiting call did not return"
        return self.result


def wait_until_waiting(waiter: Waiter) -> None:
    """Until ``waiter`` is blocked in its call (it has not returned after a short while)."""
    waiter.start()
    assert not waiter.returned.wait(0.2), f"returned {waiter.result!r} without waiting"


# --- DeliveryQueue ---------------------------------------------------------------------------


def test_a_queue_holds_at_least_one_delivery():
    with pytest.raises(ValueError, match="maxsize must be at least 1, got 0"):
        DeliveryQueue(0)


def test_deliveries_come_out_in_the_order_they_went_in():
    queue = DeliveryQueue(10)
    sent = [rows(n) for n in range(5)]
    for delivery in sent:
        assert queue.offer(delivery)
    assert len(queue) == 5
    assert [queue.get(0) for _ in sent] == sent
    assert len(queue) == 0
    assert queue.get(0) is None


def test_offer_refuses_at_once_when_full():
    queue = DeliveryQueue(2)
    assert queue.offer(rows(1)) and queue.offer(rows(2))
    started = time.monotonic()
    assert not queue.offer(rows(3))
    assert time.monotonic() - started < 1.0
    assert len(queue) == 2
    assert [queue.get(0).row_ids, queue.get(0).row_ids] == [[1], [2]]


def test_put_gives_up_after_its_timeout_when_no_room_comes():
    queue = DeliveryQueue(1)
    assert queue.put(rows(1), 0)
    started = time.monotonic()
    assert not queue.put(plain("b"), 0.3)
    assert time.monotonic() - started >= 0.3
    assert [queue.get(0).row_ids, queue.get(0)] == [[1], None]


def test_put_waits_for_a_worker_to_make_room():
    queue = DeliveryQueue(1)
    assert queue.offer(rows(1))
    putter = Waiter(lambda: queue.put(plain("b"), TIMEOUT))
    wait_until_waiting(putter)
    assert queue.get(0).row_ids == [1]  # room: the waiting put goes in
    assert putter.finish() is True
    assert queue.get(0).payloads == ["b"]


def test_get_waits_for_a_delivery_up_to_its_timeout():
    queue = DeliveryQueue(1)
    started = time.monotonic()
    assert queue.get(0.3) is None
    assert time.monotonic() - started >= 0.3

    getter = Waiter(lambda: queue.get(TIMEOUT))
    wait_until_waiting(getter)
    delivery = plain("a")
    assert queue.offer(delivery)
    assert getter.finish() is delivery


def test_each_delivery_wakes_one_waiting_worker():
    queue = DeliveryQueue(10)
    getters = [Waiter(lambda: queue.get(TIMEOUT)) for _ in range(2)]
    for getter in getters:
        wait_until_waiting(getter)
    first, second = rows(1), rows(2)
    assert queue.offer(first) and queue.offer(second)
    assert {id(getter.finish()) for getter in getters} == {id(first), id(second)}


def test_close_returns_what_was_not_started_and_takes_nothing_more():
    queue = DeliveryQueue(10)
    started, waiting = rows(0), [rows(1), plain("a")]
    for delivery in [started, *waiting]:
        queue.offer(delivery)
    assert queue.get(0) is started
    assert queue.close() == waiting
    assert len(queue) == 0
    assert queue.get(0) is None
    assert not queue.offer(plain("late")) and not queue.put(plain("late"), 0.1)
    assert queue.close() == []
    queue.done(started)  # a worker finishing after close() is fine


def test_close_wakes_a_waiting_get_and_a_waiting_put():
    empty = DeliveryQueue(1)
    getter = Waiter(lambda: empty.get(TIMEOUT))
    wait_until_waiting(getter)
    full = DeliveryQueue(1)
    full.offer(rows(1))
    putter = Waiter(lambda: full.put(rows(2), TIMEOUT))
    wait_until_waiting(putter)

    woken = time.monotonic()
    assert empty.close() == []
    assert [delivery.row_ids for delivery in full.close()] == [[1]]
    assert getter.finish() is None
    assert putter.finish() is False
    assert time.monotonic() - woken < TIMEOUT / 2  # woken, not timed out


def test_a_channel_with_max_concurrency_runs_that_many_at_once_in_arrival_order():
    queue = DeliveryQueue(10)
    first, second, third = (rows(n, channels.Ledger) for n in range(3))
    for delivery in (first, second, third):
        assert queue.offer(delivery)
    assert queue.get(0) is first
    assert queue.get(0) is None  # second is held back while first runs
    assert len(queue) == 2  # ... and still counts as not started
    queue.done(first)
    assert queue.get(0) is second
    queue.done(second)
    assert queue.get(0) is third
    queue.done(third)
    assert len(queue) == 0


def test_held_back_deliveries_let_other_channels_pass():
    queue = DeliveryQueue(10)
    running = rows(1, channels.Ledger)
    held = rows(2, channels.Ledger)
    other = rows(3)
    for delivery in (running, held, other):
        queue.offer(delivery)
    assert queue.get(0) is running
    assert queue.get(0) is other
    queue.done(other)  # a channel without a limit: no effect on Ledger
    assert queue.get(0) is None
    queue.done(running)
    assert queue.get(0) is held


def test_max_concurrency_above_one():
    queue = DeliveryQueue(10)
    sent = [rows(n, TwoAtATime) for n in range(4)]
    for delivery in sent:
        queue.offer(delivery)
    assert [queue.get(0), queue.get(0), queue.get(0)] == [sent[0], sent[1], None]
    queue.done(sent[1])
    assert queue.get(0) is sent[2]
    assert queue.get(0) is None
    queue.done(sent[0])
    assert queue.get(0) is sent[3]


def test_held_back_deliveries_count_against_the_bound():
    queue = DeliveryQueue(2)
    running = rows(1, channels.Ledger)
    queue.offer(running)
    assert queue.get(0) is running
    assert queue.offer(rows(2, channels.Ledger))
    assert queue.offer(rows(3, channels.Ledger))
    assert not queue.offer(rows(4))  # two held back fill the queue
    queue.done(running)
    assert queue.get(0).row_ids == [2]
    assert queue.offer(rows(4))


def test_close_returns_held_back_deliveries_too():
    queue = DeliveryQueue(10)
    running = rows(1, channels.Ledger)
    queue.offer(running)
    assert queue.get(0) is running
    held, other = rows(2, channels.Ledger), rows(3)
    queue.offer(held)
    queue.offer(other)
    assert queue.close() == [other, held]
    queue.done(running)  # the running one finishes later: nothing is admitted any more
    assert queue.get(0) is None


# --- plain messages join the delivery queued last ---------------------------------------------


def test_plain_messages_join_the_last_delivery_while_no_worker_has_taken_it():
    queue = DeliveryQueue(10)
    for key in ("a", "b", "c"):
        assert queue.offer(plain(key))
    assert len(queue) == 1
    delivery = queue.get(0)
    assert delivery.payloads == ["a", "b", "c"]
    assert queue.offer(plain("d"))  # the one above is taken: a delivery of its own
    assert delivery.payloads == ["a", "b", "c"]
    assert queue.get(0).payloads == ["d"]


def test_only_a_plain_delivery_of_the_same_channel_queued_last_is_joined():
    """Joining never lets a message pass another: with one worker, messages still run in the
    order they arrived, whatever their channels."""
    queue = DeliveryQueue(10)
    sent = [plain("a"), plain("x", channels.Timed), plain("b"), rows(1), plain("c"), plain("d")]
    for delivery in sent:
        assert queue.offer(delivery)
    taken = [queue.get(0) for _ in range(len(queue))]
    assert [(d.channel, d.payloads or d.row_ids) for d in taken] == [
        (channels.Message, ["a"]),
        (channels.Timed, ["x"]),
        (channels.Message, ["b"]),
        (channels.Job, [1]),
        (channels.Message, ["c", "d"]),
    ]


def test_a_delivery_holds_at_most_a_batch_of_plain_messages():
    limit = batch_size.size(channels.Message)
    queue = DeliveryQueue(10)
    keys = [f"m{n}" for n in range(2 * limit + 1)]
    for key in keys:
        assert queue.offer(plain(key))
    taken = [queue.get(0).payloads for _ in range(len(queue))]
    assert taken == [keys[:limit], keys[limit : 2 * limit], keys[2 * limit :]]


def test_a_joining_message_needs_no_room():
    queue = DeliveryQueue(1)
    assert queue.offer(plain("a"))
    assert queue.offer(plain("b"))  # the queue is full, but b joins a
    assert not queue.offer(plain("x", channels.Timed))
    assert queue.get(0).payloads == ["a", "b"]


def test_held_back_plain_messages_join_too_and_keep_their_order():
    queue = DeliveryQueue(10)
    running = plain("o0", channels.InOrder)
    queue.offer(running)
    assert queue.get(0) is running
    for key in ("o1", "o2"):
        queue.offer(plain(key, channels.InOrder))
    assert queue.get(0) is None and len(queue) == 1
    queue.done(running)
    assert queue.get(0).payloads == ["o1", "o2"]


def test_close_returns_every_message_of_a_joined_delivery():
    queue = DeliveryQueue(10)
    for key in ("a", "b"):
        queue.offer(plain(key))
    (dropped,) = queue.close()
    assert dropped.payloads == ["a", "b"]
    assert not queue.offer(plain("c"))  # nothing joins a closed queue


# --- plan() ----------------------------------------------------------------------------------


def named(channel: type[Channel]) -> str:
    return channel.listen_safe_name()


def described(deliveries: list[Delivery]) -> list[tuple]:
    return [
        (d.kind, d.channel.__name__, d.payload, d.row_ids)
        if d.kind is not Kind.SWEEP
        else (d.kind, d.channel.__name__)
        for d in deliveries
    ]


def test_plan_keeps_arrival_order_and_groups_consecutive_rows_of_a_channel():
    deliveries = plan(
        [
            (named(channels.Job), "1"),
            (named(channels.Job), "2"),
            (named(channels.Message), '{"key": "m"}'),
            (named(channels.Job), "3"),
            (named(channels.Ledger), "4"),
            (named(channels.Job), "5"),
            (named(channels.Job), "6"),
        ]
    )
    assert described(deliveries) == [
        (Kind.ROWS, "Job", "", [1, 2]),
        (Kind.PLAIN, "Message", '{"key": "m"}', []),
        (Kind.ROWS, "Job", "", [3]),
        (Kind.ROWS, "Ledger", "", [4]),
        (Kind.ROWS, "Job", "", [5, 6]),
    ]
    job_listeners = channels.Job.get(named(channels.Job))[1]
    assert job_listeners and deliveries[0].callbacks == job_listeners


def test_plan_batches_at_most_a_batch_of_the_channel():
    size = batch_size.size(channels.Job)
    ids = range(1, 2 * size + 2)
    deliveries = plan([(named(channels.Job), str(row_id)) for row_id in ids])
    assert [d.row_ids for d in deliveries] == [
        list(ids[:size]),
        list(ids[size : 2 * size]),
        [ids[-1]],
    ]


def test_plan_gives_each_plain_message_a_delivery_of_its_own():
    """(The queue joins them; ``process_notifications`` runs plan()'s deliveries as they are.)"""
    deliveries = plan([(named(channels.Message), f'{{"key": "{key}"}}') for key in "ab"])
    assert [(d.kind, d.payloads) for d in deliveries] == [
        (Kind.PLAIN, ['{"key": "a"}']),
        (Kind.PLAIN, ['{"key": "b"}']),
    ]


def test_plan_turns_a_recovery_request_into_a_sweep_of_a_lockable_channel():
    deliveries = plan(
        [
            (named(channels.Job), "1"),
            (named(channels.Job), wire.RECOVER),
            (named(channels.Job), "2"),
            # a whole payload, as triggers of older versions sent (they stored the row too)
            (named(channels.Job), '{"kwargs": {"key": "old"}}'),
            (named(channels.Job), "3"),
            (named(channels.Job), wire.WAKE),  # the watcher's wake-up
        ]
    )
    assert described(deliveries) == [
        (Kind.ROWS, "Job", "", [1]),
        (Kind.SWEEP, "Job"),
        (Kind.ROWS, "Job", "", [2]),
        (Kind.SWEEP, "Job"),
        (Kind.ROWS, "Job", "", [3]),
        (Kind.SWEEP, "Job"),
    ]


def test_plan_drops_a_recovery_request_of_a_plain_channel():
    assert plan([(named(channels.Message), wire.RECOVER)]) == []


def test_plan_tells_what_it_ignored_and_why(caplog):
    ignored = []
    deliveries = plan(
        [
            (named(channels.Unheard), '{"key": "u"}'),
            ("pgpubsub_nobody", "1"),
            (named(channels.Job), "not an id"),
            (named(channels.Job), "9" * 20),  # no bigint
            (named(channels.Job), "7"),
        ],
        ignored=lambda *args: ignored.append(args),
    )
    assert described(deliveries) == [(Kind.ROWS, "Job", "", [7])]
    assert ignored == [
        (named(channels.Unheard), '{"key": "u"}', "no listener for that channel here"),
        ("pgpubsub_nobody", "1", "no listener for that channel here"),
        (named(channels.Job), "not an id", "not a stored notification id"),
        (named(channels.Job), "9" * 20, "not a stored notification id"),
    ]
    warnings = [r.getMessage() for r in caplog.records if r.name == "pgpubsub.deliveries"]
    assert len(warnings) == 4
    assert "tests.testapp.channels.Job (not a stored notification id)" in warnings[2]


def test_a_sweep_delivery_carries_the_channels_listeners():
    sweep = Delivery.sweep(channels.Job)
    assert sweep.kind is Kind.SWEEP and sweep.channel is channels.Job
    assert sweep.callbacks == channels.Job.get(named(channels.Job))[1]
    assert Delivery.sweep(channels.Unheard).callbacks == []
