"""``Notification``'s queryset (``due()``, ``retrying()``, ``failed()``, ``pending()``) against
real rows in each state, its agreement with a row's ``status`` and with the SQL listeners claim
with, and which database serves a channel."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import pytest
from django.db.models import Count
from django.test import override_settings
from django.utils import timezone

import pgpubsub
from pgpubsub import store
from pgpubsub.channel import Channel
from pgpubsub.models import Notification, NotificationQuerySet, database_for, notifications_alias
from tests.testapp import channels

pytestmark = pytest.mark.django_db


@dataclass
class Elsewhere(Channel):
    lock_notifications = True
    database = "other"
    key: str


class NotificationsOnOther:
    """A database router that keeps pgpubsub's table on the database "other"."""

    def db_for_write(self, model, **hints):
        return "other" if model._meta.app_label == "pgpubsub" else None

    db_for_read = db_for_write


def stored(key: str, **state) -> Notification:
    """A row of channels.Job stored by notify(), then given ``state`` (its columns)."""
    pgpubsub.notify(channels.Job, key=key)
    Notification.objects.filter(payload__kwargs__key=key).update(**state)
    return Notification.objects.get(payload__kwargs__key=key)


@pytest.fixture
def rows() -> dict[str, Notification]:
    """One row in each state a row can be in."""
    now = timezone.now()
    hour = datetime.timedelta(hours=1)
    return {
        "new": stored("new"),
        # Not tried yet, but claimed by a listener right now: its lease is not over.
        "claimed": stored("claimed", claimed_by="host:1:abc", next_attempt_at=now + hour),
        "retrying, not due yet": stored("later", attempts=1, next_attempt_at=now + hour),
        "retrying, due": stored("due", attempts=2, next_attempt_at=now - hour),
        "failed": stored("failed", attempts=5, failed_at=now, last_error="ValueError: no"),
    }


def keys(queryset: NotificationQuerySet) -> set[str]:
    return {row.payload["kwargs"]["key"] for row in queryset}


def test_each_state_of_a_row(rows):
    assert keys(Notification.objects.pending()) == {"new", "claimed"}
    assert keys(Notification.objects.retrying()) == {"later", "due"}
    assert keys(Notification.objects.failed()) == {"failed"}
    assert keys(Notification.objects.due()) == {"new", "due"}


def test_a_row_s_status_says_what_the_queryset_finds(rows):
    for row in rows.values():
        found = [
            status
            for status, queryset in [
                (Notification.PENDING, Notification.objects.pending()),
                (Notification.RETRYING, Notification.objects.retrying()),
                (Notification.FAILED, Notification.objects.failed()),
            ]
            if queryset.filter(pk=row.pk).exists()
        ]
        assert found == [row.status], row


def test_due_rows_are_those_a_listener_claims(rows):
    """``due()`` means what the SQL of the store pages through and claims."""
    assert set(store.pending_ids(channels.Job, 0, "default", limit=100)) == set(
        Notification.objects.due().values_list("pk", flat=True)
    )


def test_the_conditions_work_in_aggregates(rows):
    counts = Notification.objects.aggregate(
        failed=Count("pk", filter=NotificationQuerySet.FAILED),
        due=Count("pk", filter=NotificationQuerySet.DUE),
    )
    assert counts == {"failed": 1, "due": 2}


def test_the_queryset_chains_with_from_channel_and_keeps_the_1_3_order(rows):
    # 1.3.1 orders by created_at: stored in an order unlike the ids'.
    start = timezone.now() - datetime.timedelta(days=1)
    order = ["failed", "due", "new", "later", "claimed"]
    for minutes, key in enumerate(order):
        Notification.objects.filter(payload__kwargs__key=key).update(
            created_at=start + datetime.timedelta(minutes=minutes)
        )
    ordered = [row.payload["kwargs"]["key"] for row in Notification.from_channel(channels.Job)]
    assert ordered == order
    assert [row.payload["kwargs"]["key"] for row in Notification.objects.due()] == ["due", "new"]
    assert Notification.from_channel(channels.Job).failed().count() == 1
    assert not Notification.from_channel(channels.FailingJob).due().exists()


def test_the_database_that_serves_a_channel():
    assert notifications_alias() == "default"
    assert database_for(channels.Job) == "default"
    assert database_for(Elsewhere) == "other"
    with override_settings(DATABASE_ROUTERS=[NotificationsOnOther()]):
        assert notifications_alias() == "other"
        assert database_for(channels.Job) == "other"
