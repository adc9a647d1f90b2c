"""How many rows a batch takes: follows the measured time of the channel's listeners."""

import pytest

from pgpubsub import batch_size
from tests.testapp import channels


@pytest.fixture(autouse=True)
def _forget():
    batch_size.forget()
    yield
    batch_size.forget()


def test_a_channel_not_measured_yet_takes_the_first_batch_size():
    assert batch_size.size(channels.Job) == batch_size.FIRST_BATCH


def test_fast_listeners_get_the_largest_batches():
    batch_size.measured(channels.Job, 0.002, 20)  # 100 µs per message
    assert batch_size.size(channels.Job) == batch_size.MAX_BATCH


def test_slow_listeners_get_batches_of_one():
    batch_size.measured(channels.Job, 5.0, 10)  # 0.5 s per message
    assert batch_size.size(channels.Job) == 1


def test_the_size_follows_a_moving_average_of_each_channel():
    batch_size.measured(channels.Job, 0.010, 10)  # 1 ms per message: 50 in 50 ms
    assert batch_size.size(channels.Job) == 50
    assert batch_size.size(channels.FailingJob) == batch_size.FIRST_BATCH
    for _ in range(30):  # the listeners became ten times slower
        batch_size.measured(channels.Job, 0.100, 10)
    assert batch_size.size(channels.Job) == 5


def test_a_batch_that_ran_nothing_changes_nothing():
    batch_size.measured(channels.Job, 1.0, 0)
    assert batch_size.size(channels.Job) == batch_size.FIRST_BATCH


def test_forgetting_a_channel_starts_it_over():
    batch_size.measured(channels.Job, 5.0, 10)
    batch_size.forget(channels.Job)
    assert batch_size.size(channels.Job) == batch_size.FIRST_BATCH
