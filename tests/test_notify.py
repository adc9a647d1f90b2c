"""notify() and process_stored_notifications()."""

import dataclasses
import logging

import pytest
from django.db import IntegrityError, connection, transaction
from django.test import override_settings

import pgpubsub
from pgpubsub.channel import Channel, ChannelNotFound
from pgpubsub.exceptions import InvalidChannel, InvalidPayload
from pgpubsub.listen import process_notifications
from pgpubsub.models import Notification
from tests.testapp import channels
from tests.testapp.listeners import mixed_hooks_ran, received
from tests.testapp.models import Effect, Post

pytestmark = pytest.mark.django_db(transaction=True)

TRICKY = [
    "it's",
    "back\\slash \\' \\\\",
    "$$ dollar $tag$ $$",
    "'); DROP TABLE pgpubsub_notification; --",
    'double " quote',
    "newline\nand\ttab",
    "unicode ü € 😀 \u2028",
    "%s %(name)s {}",
]


def messages():
    return [kwargs for name, kwargs in received if name == "Message"]


@pytest.mark.parametrize("text", TRICKY)
def test_plain_notify_delivers_any_text_intact(listening, text):
    pgpubsub.notify(channels.Message, key=text, text=text)
    process_notifications(listening)
    assert messages() == [{"key": text, "text": text}]


@pytest.mark.parametrize("text", TRICKY)
def test_lockable_notify_delivers_any_text_intact(listening, text):
    pgpubsub.notify(channels.Job, key=text, text=text)
    process_notifications(listening)
    assert Effect.objects.get(key=text).value == text[:100]


def test_every_listener_of_a_channel_runs_in_registration_order(listening):
    pgpubsub.notify("tests.testapp.channels.Message", key="k")
    process_notifications(listening)
    assert [name for name, _ in received] == ["Message", "Message.second"]


def test_notify_returns_the_serialized_payload():
    payload = pgpubsub.notify(channels.Message, key="k", text="t")
    assert channels.Message.deserialize(payload) == {"key": "k", "text": "t"}


def test_one_megabyte_messages(listening):
    text = "x€" * 350_000
    pgpubsub.notify(channels.Message, key="big", text=text)
    pgpubsub.notify(channels.Job, key="big-job", text=text)
    process_notifications(listening)
    assert messages() == [{"key": "big", "text": text}]
    assert [k["text"] for n, k in received if n == "Job"] == [text]


def test_lockable_notify_stores_a_row_under_the_listen_name(django_db_setup):
    pgpubsub.notify(channels.Job, key="stored")
    (row,) = Notification.from_channel(channels.Job)
    assert row.channel == channels.Job.listen_safe_name()
    assert row.payload == {"kwargs": {"key": "stored", "text": ""}}


def test_rolled_back_notify_is_neither_stored_nor_delivered(listening):
    with pytest.raises(ZeroDivisionError):
        with transaction.atomic():
            pgpubsub.notify(channels.Job, key="never")
            pgpubsub.notify(channels.Message, key="never")
            1 / 0  # noqa: B018
    process_notifications(listening)
    assert Notification.objects.count() == 0
    assert received == []


def test_bad_input_fails_at_notify_and_sends_nothing(listening):
    with pytest.raises(ChannelNotFound):
        pgpubsub.notify("tests.testapp.channels.NoSuchChannel", key="x")
    with pytest.raises(InvalidChannel, match="trigger"):
        pgpubsub.notify(channels.AuthorTrigger, old=None, new=None)
    with pytest.raises(InvalidPayload, match="Job.key"):
        pgpubsub.notify(channels.Job, key=b"bytes")
    with pytest.raises(TypeError):
        pgpubsub.notify(channels.Job, wrong="field")
    process_notifications(listening)
    assert Notification.objects.count() == 0
    assert received == []


def test_a_failing_lockable_callback_rolls_back_and_keeps_the_row(listening):
    pgpubsub.notify(channels.FailingJob, key="boom")
    pgpubsub.notify(channels.Job, key="after")
    # As in django-pgpubsub 1.x, the listener's exception reaches the caller, here after the
    # other messages that had arrived were processed.
    with pytest.raises(RuntimeError, match="job boom failed on purpose"):
        process_notifications(listening)
    assert not Effect.objects.filter(key="boom").exists()
    assert Effect.objects.filter(key="after").exists()
    assert list(Notification.objects.values_list("channel", flat=True)) == [
        channels.FailingJob.listen_safe_name()
    ]


def test_messages_arriving_together_are_processed_each_on_its_own(listening):
    """Lockable messages that arrive together are claimed together; a failing one in their
    midst rolls back alone and stays stored, the others commit and are gone."""
    with transaction.atomic():
        for key, text in [("a", "ok"), ("b", "fail"), ("c", "ok"), ("d", "ok")]:
            pgpubsub.notify(channels.Job, key=key, text=text)
    listening.poll()
    assert len(listening.notifies) == 4  # one batch
    with pytest.raises(RuntimeError, match="job b failed on purpose"):
        process_notifications(listening)
    assert sorted(Effect.objects.values_list("key", flat=True)) == ["a", "c", "d"]
    (left,) = Notification.objects.all()
    assert left.payload["kwargs"]["key"] == "b"
    assert [kwargs["key"] for name, kwargs in received if name == "Job"] == ["a", "c", "d"]


@pytest.mark.parametrize("dangling", ["a", "b", "c"])
def test_a_message_failing_only_at_commit_time_fails_alone(listening, dangling):
    """A deferred foreign key violated by one message of a batch fails that message, not the
    commit of the others, wherever it is in the batch."""
    with transaction.atomic():
        for key in "abc":
            pgpubsub.notify(channels.Job, key=key, text="dangling" if key == dangling else "ok")
    with pytest.raises(IntegrityError):
        process_notifications(listening)
    assert sorted(Effect.objects.values_list("key", flat=True)) == sorted(set("abc") - {dangling})
    (row,) = Notification.objects.all()
    assert row.payload["kwargs"]["key"] == dangling
    assert row.attempts == 1 and "violates foreign key constraint" in row.last_error
    assert not Post.objects.filter(content=dangling).exists()
    # Caught while its savepoint could undo it: no message had to run a second time.
    assert [kwargs["key"] for name, kwargs in received if name == "Job"] == ["a", "b", "c"]


@pytest.mark.parametrize(
    "actions",
    [
        [
            "nothing",
            "write",
            "hook-fail",
            "nothing",
            "write-fail",
            "hook",
            "dangling",
            "write-hook",
        ],
        ["dangling", "nothing", "hook-fail", "write-hook", "hook"],
        ["hook", "write", "nothing", "dangling"],
        ["fail", "write-hook-dangling", "hook-write", "nothing-fail"],
        ["write-hook-dangling", "hook-fail", "write-hook-dangling", "hook-write-fail", "hook"],
    ],
)
def test_messages_that_use_the_database_or_not_keep_or_lose_only_their_own_work(listening, actions):
    """A batch mixing listeners that write, that only register on_commit() functions, that do
    nothing, and that fail (before or after writing, or at the deferred check): each message's
    work commits if and only if it succeeded, and each listener ran once."""
    mixed_hooks_ran.clear()
    steps = {f"m{index}": action.split("-") for index, action in enumerate(actions)}
    keys = list(steps)
    with transaction.atomic():  # stored together: one batch
        for key, action in zip(keys, actions, strict=True):
            pgpubsub.notify(channels.Mixed, key=key, action=action)
    with pytest.raises((RuntimeError, IntegrityError)):
        process_notifications(listening)
    good = [key for key in keys if not {"fail", "dangling"} & set(steps[key])]
    bad = [key for key in keys if key not in good]
    wrote = [key for key in keys if "write" in steps[key]]
    hooked = [key for key in keys if "hook" in steps[key]]
    assert sorted(Effect.objects.filter(channel="Mixed").values_list("key", flat=True)) == sorted(
        set(wrote) & set(good)
    )
    assert mixed_hooks_ran == [key for key in hooked if key in good]
    assert not Post.objects.filter(content__in=keys).exists()
    left = {row.payload["kwargs"]["key"]: row for row in Notification.objects.all()}
    assert sorted(left) == sorted(bad)
    assert all(row.attempts == 1 for row in left.values())
    assert [kwargs["key"] for name, kwargs in received if name == "Mixed"] == keys


def test_a_plain_listener_s_writes_roll_back_when_it_fails(listening):
    pgpubsub.notify(channels.Message, key="undone", text="write-then-fail")
    pgpubsub.notify(channels.Message, key="next", text="fine")
    with pytest.raises(RuntimeError, match="message undone failed on purpose"):
        process_notifications(listening)
    assert not Effect.objects.filter(key="undone").exists()
    assert [kwargs["key"] for name, kwargs in received if name == "Message"] == ["undone", "next"]


def _store_silently(channel_cls, key, name=None):
    """A stored row nobody was notified about (as after a listener outage)."""
    return Notification.objects.create(
        channel=name or channel_cls.listen_safe_name(), payload={"kwargs": {"key": key}}
    )


def test_process_stored_notifications_makes_listeners_process_the_backlog(listening):
    for i in range(5):
        _store_silently(channels.Job, f"job-{i}")
    _store_silently(channels.FailingJob, "fails")
    process_notifications(listening)
    assert Effect.objects.count() == 0  # nobody was told

    pgpubsub.process_stored_notifications([channels.Job])
    process_notifications(listening)
    assert sorted(Effect.objects.values_list("key", flat=True)) == [f"job-{i}" for i in range(5)]
    assert Notification.objects.get().channel == channels.FailingJob.listen_safe_name()


def test_process_stored_notifications_sends_one_empty_notify_per_lockable_channel(listening):
    pgpubsub.process_stored_notifications()
    listening.poll()
    notes = list(listening.notifies)
    listening.notifies = []
    lockable = {
        cls.listen_safe_name() for cls in pgpubsub.channel.registry if cls.lock_notifications
    }
    assert sorted(n.channel for n in notes) == sorted(lockable)
    assert {n.payload for n in notes} == {""}


def test_rows_stored_by_older_versions_are_processed(listening):
    # django-pgpubsub 1.x notify() stored the dotted path and a JSON string payload.
    Notification.objects.create(
        channel=channels.Job.name(), payload='{"kwargs": {"key": "legacy", "text": "old"}}'
    )
    pgpubsub.process_stored_notifications([channels.Job])
    process_notifications(listening)
    assert Effect.objects.get(key="legacy").value == "old"
    assert Notification.objects.count() == 0


def test_a_full_payload_notify_from_an_older_trigger_processes_the_channel(listening):
    _store_silently(channels.Job, "from-old-trigger")
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_notify(%s, %s)",
            [channels.Job.listen_safe_name(), '{"kwargs": {"key": "from-old-trigger"}}'],
        )
    process_notifications(listening)
    assert Effect.objects.filter(key="from-old-trigger").exists()


@override_settings(PGPUBSUB_LISTENER_FILTER="tests.testapp.filters.SkipMarkedRows")
def test_listener_filter_limits_what_listeners_claim(listening):
    pgpubsub.notify(channels.Job, key="skip-me")
    pgpubsub.notify(channels.Job, key="take-me")
    process_notifications(listening)
    assert list(Effect.objects.values_list("key", flat=True)) == ["take-me"]
    assert Notification.objects.get().payload["kwargs"]["key"] == "skip-me"


@override_settings(PGPUBSUB_LISTENER_FILTER="tests.testapp.filters.Missing")
def test_a_listener_filter_that_cannot_be_imported_is_a_clear_error(listening):
    from django.core.exceptions import ImproperlyConfigured

    from pgpubsub import conf

    with pytest.raises(ImproperlyConfigured, match="PGPUBSUB_LISTENER_FILTER"):
        conf.listener_filter_provider()


@dataclasses.dataclass
class Unheard(Channel):
    """A lockable channel no process here listens to."""

    lock_notifications = True
    key: str


def test_process_stored_notifications_of_a_named_channel_without_local_listeners(listening):
    with connection.cursor() as cursor:
        cursor.execute(f'LISTEN "{Unheard.listen_safe_name()}"')
    pgpubsub.process_stored_notifications([Unheard])
    listening.poll()
    notes = list(listening.notifies)
    listening.notifies = []
    assert [(n.channel, n.payload) for n in notes] == [(Unheard.listen_safe_name(), "")]


@dataclasses.dataclass
class Routed(Channel):
    """A channel with a field named like notify()'s database argument."""

    using: str


def test_a_field_named_using_is_a_field(listening):
    with connection.cursor() as cursor:
        cursor.execute(f'LISTEN "{Routed.listen_safe_name()}"')
    payload = pgpubsub.notify(Routed, using="replica")
    assert Routed.build_from_payload(payload, []).using == "replica"


def test_an_unknown_field_is_named_with_the_channel():
    with pytest.raises(TypeError, match=r"Message has no field\(s\) \['txt'\]"):
        pgpubsub.notify(channels.Message, key="k", txt="typo")


def test_a_long_recovery_reports_its_progress(django_db_setup, monkeypatch, caplog):
    from pgpubsub import batch_size, sweeps
    from pgpubsub.listen import process_stored

    for number in range(45):
        _store_silently(channels.Job, f"backlog-{number}")
    monkeypatch.setattr(sweeps, "PROGRESS_INTERVAL", 0.0)
    batch_size.forget(channels.Job)  # its first batch takes FIRST_BATCH rows
    with caplog.at_level(logging.INFO, logger="pgpubsub"):
        assert process_stored([channels.Job]) == 45
    progress = [r.getMessage() for r in caplog.records if "so far" in r.getMessage()]
    # One line per batch here: the first of FIRST_BATCH rows, the others as measured.
    assert len(progress) >= 2
    first = f"Processed {batch_size.FIRST_BATCH} stored notifications of tests.testapp.channels.Job"
    assert progress[0].startswith(first)
    assert progress[-1].startswith("Processed 45 stored notifications")
    assert any("Processed 45 stored notifications" in r.getMessage() for r in caplog.records)
