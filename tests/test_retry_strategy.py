"""A channel's retry policy as one object: the default strategy's waits and limit, a channel
that names or replaces its policy, bad retry options refused when the channel class is defined,
and a custom policy end to end in an in-process Runtime on a real Postgres."""

from __future__ import annotations

import dataclasses
import logging

import pytest
from django.test import override_settings

import pgpubsub
from pgpubsub import retries
from pgpubsub.channel import Channel, _by_listen_name, registry
from pgpubsub.models import Notification
from pgpubsub.retries import RetryStrategy
from tests.processes import wait_for
from tests.testapp import channels, retry_channels
from tests.testapp.models import Effect
from tests.testapp.retry_channels import (
    FixedDelay,
    Permanent,
    Picky,
    RetryTransientOnly,
    Transient,
    picky_attempts,
)

ERROR = RuntimeError("a listener failed")


def channel(**options) -> type[Channel]:
    """A channel class with these class attributes, defined here and now."""
    return dataclasses.dataclass(type("Retried", (Channel,), {"__module__": __name__, **options}))


def assert_backoff(wait: float | None, first: float, failures: int, longest: float) -> None:
    """``wait`` is ``first`` doubled per failure after the first, at most ``longest``, cut by
    up to a half (the jitter)."""
    expected = min(longest, first * 2 ** (failures - 1))
    assert wait is not None and expected / 2 <= wait <= expected, (failures, wait, expected)


# --- the default strategy ----------------------------------------------------------------------


def test_the_default_doubles_the_settings_retry_delay_then_gives_up_at_max_attempts():
    policy = RetryStrategy()
    for attempt in range(1, 5):  # PGPUBSUB_MAX_ATTEMPTS: 5
        assert_backoff(policy.next_delay(attempt, ERROR), 2.0, attempt, 300.0)
    assert policy.next_delay(5, ERROR) is None
    assert policy.next_delay(6, ERROR) is None


def test_the_default_reads_the_settings_when_it_is_used():
    policy = RetryStrategy()
    with override_settings(
        PGPUBSUB_MAX_ATTEMPTS=12, PGPUBSUB_RETRY_DELAY=1.5, PGPUBSUB_RETRY_MAX_DELAY=10
    ):
        for attempt in range(1, 12):
            assert_backoff(policy.next_delay(attempt, ERROR), 1.5, attempt, 10.0)
        assert policy.next_delay(12, ERROR) is None
        job = retries.strategy(channels.Job)
        assert (job.max_attempts, job.retry_delay, job.max_delay) == (12, 1.5, 10.0)
    assert (job.max_attempts, job.retry_delay, job.max_delay) == (5, 2.0, 300.0)
    assert job == policy == RetryStrategy()


def test_a_retry_strategy_s_values_are_read_only():
    policy = RetryStrategy(max_attempts=3)
    with pytest.raises(AttributeError):
        policy.max_attempts = 4
    assert policy.max_attempts == 3


def test_the_jitter_spreads_messages_that_failed_together():
    waits = {RetryStrategy(retry_delay=10).next_delay(1, ERROR) for _ in range(20)}
    assert len(waits) > 1 and all(5 <= wait <= 10 for wait in waits)


def test_a_channel_s_max_attempts_and_retry_delay_win_over_the_settings():
    policy = retries.strategy(channels.Flaky)  # max_attempts 3, retry_delay 0.2
    assert policy == RetryStrategy(max_attempts=3, retry_delay=0.2)
    with override_settings(PGPUBSUB_MAX_ATTEMPTS=7, PGPUBSUB_RETRY_DELAY=5):
        assert (policy.max_attempts, policy.retry_delay, policy.max_delay) == (3, 0.2, 300.0)
    assert_backoff(policy.next_delay(1, ERROR), 0.2, 1, 300.0)
    assert_backoff(policy.next_delay(2, ERROR), 0.2, 2, 300.0)
    assert policy.next_delay(3, ERROR) is None


def test_a_long_run_of_failures_waits_at_most_the_max_delay():
    policy = RetryStrategy(max_attempts=2000, retry_delay=1, max_delay=60)
    assert_backoff(policy.next_delay(1000, ERROR), 1, 7, 60)
    with override_settings(PGPUBSUB_RETRY_MAX_DELAY=5):
        assert RetryStrategy(max_attempts=99).next_delay(30, ERROR) <= 5


def test_the_module_readers_follow_the_channel_s_policy():
    assert retries.max_attempts(Picky) == 3
    assert retries.retry_delay(Picky) == 0.2
    assert_backoff(retries.backoff(Picky, 2), 0.2, 2, 300.0)
    assert retries.max_attempts(channels.Flaky) == 3
    with override_settings(PGPUBSUB_RETRY_DELAY=4):
        # A policy that is no RetryStrategy: the default backoff, for lost connections.
        fixed = channel(retry=FixedDelay())
        assert retries.max_attempts(fixed) == 3
        assert retries.retry_delay(fixed) == 4.0
        assert_backoff(retries.backoff(fixed, 1), 4.0, 1, 300.0)


# --- a channel's own policy --------------------------------------------------------------------


def test_a_channel_replaces_its_policy():
    policy = retries.strategy(Picky)
    assert type(policy) is RetryTransientOnly
    assert policy is Picky.retry
    assert policy == RetryTransientOnly(max_attempts=3, retry_delay=0.2)
    assert policy != RetryStrategy(max_attempts=3, retry_delay=0.2)  # another policy
    assert repr(policy) == "RetryTransientOnly(max_attempts=3, retry_delay=0.2)"
    assert_backoff(policy.next_delay(1, Transient("busy")), 0.2, 1, 300.0)
    assert_backoff(policy.next_delay(2, Transient("busy")), 0.2, 2, 300.0)
    assert policy.next_delay(3, Transient("busy")) is None  # max_attempts
    assert policy.next_delay(1, Permanent("declined")) is None  # not worth another attempt


def test_any_object_with_next_delay_and_max_attempts_is_a_policy():
    policy = FixedDelay(0.5)
    assert retries.strategy(channel(retry=policy)) is policy
    assert [policy.next_delay(attempt, ERROR) for attempt in (1, 2, 3)] == [0.5, 0.5, None]


def test_a_channel_names_its_policy_by_dotted_path():
    policy = retries.strategy(retry_channels.Named)
    assert type(policy) is RetryTransientOnly
    with override_settings(PGPUBSUB_MAX_ATTEMPTS=4):
        assert policy.max_attempts == 4  # the class is made without arguments: the settings
    assert policy.next_delay(1, Permanent("declined")) is None
    instance_path = channel(retry="tests.testapp.retry_channels.Picky.retry")
    assert retries.strategy(instance_path) == retries.strategy(Picky)


def test_a_subclass_inherits_its_parent_s_policy():
    @dataclasses.dataclass
    class PickierStill(Picky):
        extra: int = 0

    assert retries.strategy(PickierStill) == retries.strategy(Picky)


def test_a_message_field_called_retry_is_no_policy():
    """django-pgpubsub 1.x channels may carry a field of that name."""

    @dataclasses.dataclass
    class Order(Channel):
        order_id: int
        retry: bool = False

    assert retries.strategy(Order) == RetryStrategy()
    assert Order(order_id=1, retry=True).retry is True


# --- refused when the channel class is defined -------------------------------------------------


class NoLimit:
    def next_delay(self, attempt, error):
        return 1.0


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"max_attempts": 0}, ValueError, "Retried.max_attempts must be a positive int or None"),
        ({"max_attempts": 2.0}, ValueError, "Retried.max_attempts must be a positive int"),
        ({"retry_delay": 0}, ValueError, "Retried.retry_delay must be a positive number of sec"),
        ({"retry_delay": "1s"}, ValueError, "Retried.retry_delay must be a positive number"),
        ({"retry": 5}, TypeError, r"Retried.retry must be a retry policy \(a RetryStrategy"),
        ({"retry": RetryStrategy}, TypeError, r"the class RetryStrategy, not a policy: write Re"),
        ({"retry": NoLimit()}, TypeError, "Retried.retry has no max_attempts"),
        ({"retry": FixedDelay(), "max_attempts": 3}, ValueError, "sets both retry and max_att"),
        ({"retry": FixedDelay(), "retry_delay": 1}, ValueError, "sets both retry and retry_del"),
        ({"retry": "retry_policy"}, ValueError, "Retried.retry = 'retry_policy' is no dotted"),
        ({"max_concurrency": 0}, ValueError, "Retried.max_concurrency must be a positive int"),
        ({"max_concurrency": "1"}, ValueError, "Retried.max_concurrency must be a positive int"),
        ({"database": 1}, TypeError, r"Retried.database must be a database alias \(a str\)"),
        ({"database": " "}, ValueError, "Retried.database must be a database alias or None"),
        ({"notify_on_write": 1}, TypeError, "Retried.notify_on_write must be True, False or No"),
        ({"notify_on_write": "yes"}, TypeError, "Retried.notify_on_write must be True, False"),
    ],
)
def test_bad_channel_options_fail_when_the_class_is_defined(options, error, message):
    with pytest.raises(error, match=message):
        channel(**options)


def test_a_subclass_may_not_add_a_policy_to_inherited_retry_attributes():
    with pytest.raises(ValueError, match="Pickier sets both retry and max_attempts"):

        class Pickier(channels.Flaky):
            retry = RetryTransientOnly()

    class Pickier(channels.Flaky):  # saying which one wins
        max_attempts = None
        retry_delay = None
        retry = RetryTransientOnly()

    assert type(retries.strategy(Pickier)) is RetryTransientOnly


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_attempts": 0}, "RetryStrategy.max_attempts must be a positive int or None, not 0"),
        ({"max_attempts": True}, "RetryStrategy.max_attempts must be a positive int"),
        ({"retry_delay": -1}, "RetryStrategy.retry_delay must be a positive number of seconds"),
        ({"max_delay": "5"}, "RetryStrategy.max_delay must be a positive number of seconds"),
    ],
)
def test_a_retry_strategy_with_bad_values_cannot_be_made(values, message):
    with pytest.raises(ValueError, match=message):
        RetryStrategy(**values)


@pytest.mark.parametrize(
    ("path", "error", "message"),
    [
        ("tests.testapp.retry_channels.Nothing", ValueError, "names nothing that can be imp"),
        ("tests.testapp.no_such_module.Policy", ValueError, "names nothing that can be imp"),
        ("tests.testapp.retry_channels.Transient", TypeError, "must be a retry policy"),
        ("tests.testapp.retry_channels.picky_attempts", TypeError, "must be a retry policy"),
    ],
)
def test_a_dotted_path_that_names_no_policy_fails_where_it_is_used(path, error, message):
    """The module a path names may import the channel's: it is imported once a policy is
    needed (the Runtime's start, the system checks, a failure), not when the class is defined."""
    named = channel(retry=path)
    with pytest.raises(error, match=message):
        retries.check(named)
    with pytest.raises(error, match=message):
        retries.strategy(named)


# --- end to end --------------------------------------------------------------------------------


@pytest.fixture
def picky():
    """Picky's listener registered for the test, and removed after."""
    pgpubsub.listener(Picky)(retry_channels.run_picky)
    picky_attempts.clear()
    yield
    picky_attempts.clear()
    registry.pop(Picky, None)
    _by_listen_name.pop(Picky.listen_safe_name(), None)


def row_of(key: str) -> Notification | None:
    return Notification.objects.filter(payload__kwargs__key=key).first()


def marked_failed(key: str) -> Notification:
    return wait_for(
        lambda: (row := row_of(key)) and row.failed_at is not None and row,
        30,
        lambda: f"{key} to be marked failed; {list(Notification.objects.values())}",
    )


@pytest.mark.timeout(60)
@pytest.mark.django_db(transaction=True)
def test_a_custom_policy_decides_per_error_in_a_runtime(runtimes, picky, caplog):
    caplog.set_level(logging.ERROR, logger="pgpubsub")
    runtimes(channels=[Picky], workers=2)
    pgpubsub.notify(Picky, key="busy-once", error="transient", failures=1)
    pgpubsub.notify(Picky, key="declined", error="permanent", failures=99)
    pgpubsub.notify(Picky, key="always-busy", error="transient", failures=99)

    wait_for(
        lambda: Effect.objects.filter(key="busy-once").exists(), 30, "busy-once's second attempt"
    )
    assert Effect.objects.get(key="busy-once").value == "2"

    declined = marked_failed("declined")
    assert declined.attempts == 1  # a Permanent error gives up at once
    assert declined.last_error == "Permanent: picky declined failed on attempt 1"
    assert len(picky_attempts["declined"]) == 1

    always = marked_failed("always-busy")
    assert always.attempts == 3  # the policy's max_attempts
    assert always.last_error == "Transient: picky always-busy failed on attempt 3"
    times = picky_attempts["always-busy"]
    assert len(times) == 3
    # retry_delay 0.2 s, doubled: at least half of 0.2 s, then of 0.4 s (jitter cuts up to half).
    assert times[1] - times[0] >= 0.1
    assert times[2] - times[1] >= 0.2
    logged = [r.getMessage() for r in caplog.records if "picky declined" in str(r.exc_info)]
    assert any("(attempt 1 of 3): marked failed" in message for message in logged), logged
    assert not Effect.objects.filter(key__in=["declined", "always-busy"]).exists()


def test_notify_on_write_of_a_channel_wins_over_the_setting(settings):
    assert channel().notifies_on_write() is False  # the default: the watcher wakes listeners
    assert channel(notify_on_write=True).notifies_on_write() is True
    settings.PGPUBSUB_NOTIFY_ON_WRITE = True
    assert channel().notifies_on_write() is True
    assert channel(notify_on_write=False).notifies_on_write() is False
